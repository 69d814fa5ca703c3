"""What an adapter folder says about the run it came from: base model, task type, labels.

`eval`, `merge`, `export`, `predict` and `inspect` take an adapter folder. Inside its run folder
the run's `../recipe.yaml` rebuilds everything. An adapter copied out of it is read from its
`adapter.json`: `base_model` and `task` (type, labels, label words, template, input column),
which petkit records since adapters carry them. An older adapter without them needs `--model`;
its task type is then read from its tensors (a trained classification head in
`modules_to_save` means a head model, and its rows are the number of labels).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from petkit.app.recipe import DataSpec, ModelSpec, Recipe, load_recipe
from petkit.core.adapter_schema import check_meta, read_json
from petkit.core.safetensors_header import read_header
from petkit.core.errors import ConfigError
from petkit.core.io import META, TENSORS
from petkit.data.embedded import EMBEDDED_TASKS
from petkit.models.embedded import EMBEDDED_MODELS
from petkit.models.loading import KNOWN_HEAD_NAMES


def adapter_meta(adapter: str | Path) -> dict[str, Any]:
    """The checked `adapter.json` of an adapter folder (`ConfigError` if it is not one)."""
    folder = Path(adapter)
    if not (folder / META).is_file():
        raise ConfigError(f"{folder} is not an adapter folder (no {META})")
    return check_meta(read_json(folder / META), str(folder / META))


def head_labels(adapter: str | Path, meta: dict[str, Any]) -> int:
    """Rows of the trained classification head among the adapter's tensors (0: none)."""
    saved = [m for m in meta["config"].get("modules_to_save") or ()
             if str(m).split(".")[-1] in KNOWN_HEAD_NAMES]
    if not saved:
        return 0
    header = read_header(Path(adapter) / TENSORS).tensors
    rows = [info.shape[0] for key, info in header.items()
            if any(key.startswith(f"{m}.copy.") for m in saved) and key.endswith("weight")]
    return max(rows, default=0)


def _task_spec(adapter: str | Path, meta: dict[str, Any]) -> DataSpec:
    """The data section an adapter's record implies (task type, labels, columns, task name)."""
    task = meta.get("task")
    if task is None:  # older adapter: a trained head says "head", anything else is left to auto
        n = head_labels(adapter, meta)
        labels = [str(i) for i in range(n)] if n >= 2 else None
        return DataSpec(task_type="head" if n else "auto", labels=labels)
    columns = ("prompt_column", "completion_column") if task["type"] == "instruction" else \
        ("text_column", "label_column")
    fields: dict[str, Any] = {"task_type": task["type"], "labels": task.get("labels") or None}
    if task.get("data"):  # eval without --data scores this task (a vanished file: an error)
        fields.update(name=task["data"], test_file=task.get("test_file"))
        if task["data"] not in EMBEDDED_TASKS:  # an embedded task's columns are its own
            for field, key in zip(columns, ("input_column", "target_column")):
                if task.get(key):
                    fields[field] = task[key]
    return DataSpec(**fields)


def recipe_for_adapter(adapter: str | Path, model_given: bool = False) -> Recipe:
    """The recipe that rebuilds `adapter`'s model: its run's `../recipe.yaml`, else its
    `adapter.json` record. An adapter that names no base needs `--model` (`model_given`)."""
    meta = adapter_meta(adapter)
    saved = Path(adapter).parent / "recipe.yaml"
    if saved.is_file():
        return load_recipe(saved)
    base = meta.get("base_model")
    if base is None and not model_given:
        raise ConfigError(f"{adapter} does not say which base model it was trained on (an "
                          f"adapter from an older petkit, outside its run folder): pass --model "
                          f"NAME ({', '.join(EMBEDDED_MODELS)}, a folder or a hub id)")
    recipe = Recipe(data=_task_spec(adapter, meta))
    return dataclasses.replace(recipe, model=ModelSpec(name=base)) if base else recipe


def task_record(adapter: str | Path) -> dict[str, Any]:
    """The adapter's recorded task ({} for an older adapter)."""
    return dict(adapter_meta(adapter).get("task") or {})


def task_info(recipe: Recipe, adapter: str | Path, task_type: str) -> dict[str, Any]:
    """The task of `task_type` with its labels (and label words, template for a verbaliser):
    the adapter's record, else (an older adapter) read from the recipe's task."""
    info = {**task_record(adapter), "type": task_type}
    if task_type == "instruction" or (info.get("labels") and (
            task_type == "head" or info.get("label_words"))):
        return info
    if task_type == "head" and recipe.data.labels:
        return {**info, "labels": list(recipe.data.labels)}
    from petkit.app.pipeline import load_recipe_task  # the pipeline imports this module

    task = load_recipe_task(recipe.data)
    return {**info, "labels": list(task.label_names), "label_words": list(task.label_words),
            "template": task.template}
