"""`petkit predict`: an adapter's predictions for the rows of a file without labels.

Classification runs (verbaliser or head) add `prediction` (a label name) and one `score_<label>`
column per label (the softmax over the classes); instruction runs add `completion` (greedy
generation). Every input column is kept. The file is checked for the column the run read
(`data.text_column` / `data.prompt_column`) before the model loads; the output is written
atomically (a temp file renamed in) and an existing one is replaced only with `overwrite`.
"""
from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from petkit.app.adapter_base import task_info
from petkit.app.pipeline import Prepared, _is_encoder, load_with_adapter, needs_data
from petkit.app.recipe import Recipe
from petkit.core.errors import ConfigError
from petkit.data import collate, encode_classification, label_token_ids
from petkit.data.encode import _prompt_ids
from petkit.data.readers import read_records
from petkit.models.vision import is_vision_model
from petkit.training.objectives import Verbaliser

OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Predictions:
    """Where the predictions went, how many rows, and the count of each predicted label."""

    path: Path
    rows: int
    task_type: str
    counts: dict[str, int]


def task_type_of(recipe: Recipe) -> str:
    """The run's concrete task type ("auto" of an older adapter: head on encoders)."""
    kind = recipe.data.task_type
    if kind == "auto":
        return "head" if _is_encoder(recipe.model.name) else "verbaliser"
    return kind


def read_inputs(path: str | Path, column: str, flag: str | None) -> list[dict[str, Any]]:
    """The rows of `path`; every one must have a non-empty `column` (`flag`: the option that
    names another, when `column` is the run's own input column)."""
    rows = read_records(path)
    for i, row in enumerate(rows, start=1):
        if column not in row:
            run = ", the one this run read" if flag else ""
            fix = f"; rename it or pass {flag}" if flag else ""
            raise ConfigError(f"{path} has no column {column!r}{run} (its columns: "
                              f"{', '.join(map(str, row))}){fix}")
        if row[column] is None or not str(row[column]).strip():
            raise ConfigError(f"{path} row {i}: empty {column!r}")
    return rows


def claim_file(output: str | Path, overwrite: bool) -> Path:
    """`output` as a predictions file to write (.csv or .jsonl), refused if it exists unless
    `overwrite`."""
    path = Path(output)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {path}: write predictions to a {' or '.join(OUTPUT_SUFFIXES)} file")
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise ConfigError(f"--output {path} exists; choose a new file or pass --overwrite")
    return path


def _batches(encoded: list[dict], size: int, progress: bool) -> Iterator[list[int]]:
    """Row indices in batches of similar length (less padding), with a progress bar."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    yield from tqdm(chunks, desc="predict", unit="batch", disable=not progress, dynamic_ncols=True)


@torch.no_grad()
def classify(prep: Prepared, texts: list[str], info: dict[str, Any], max_length: int,
             batch_size: int, progress: bool) -> torch.Tensor:
    """(rows, classes) probabilities, rows in input order."""
    template = info.get("template", "{text}") if prep.task_type == "verbaliser" else "{text}"
    encoded = encode_classification([{"text": t, "label": 0} for t in texts], prep.tokenizer,
                                    max_length=max_length, template=template)
    score: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    if prep.task_type == "verbaliser":
        verbaliser = Verbaliser(label_token_ids(prep.tokenizer, info["label_words"]))
        score = lambda batch: verbaliser.class_logits(prep.model, batch)  # noqa: E731
    else:
        score = lambda batch: prep.model(input_ids=batch["input_ids"],  # noqa: E731
                                         attention_mask=batch["attention_mask"]).logits
    probs = torch.empty(len(texts), len(info["labels"]))
    for rows in _batches(encoded, batch_size, progress):
        batch = collate([encoded[i] for i in rows], prep.pad_id)
        probs[rows] = score(batch).float().softmax(dim=-1)
    return probs


@torch.no_grad()
def complete(prep: Prepared, prompts: list[str], max_length: int, max_new_tokens: int,
             batch_size: int, progress: bool) -> list[str]:
    """Greedy completions of `prompts` (encoded as the run encoded them), in input order."""
    encoded = [{"input_ids": _prompt_ids(prep.tokenizer, p)[0][-max_length:]} for p in prompts]
    out = [""] * len(prompts)
    for rows in _batches(encoded, batch_size, progress):
        ids = [encoded[i]["input_ids"] for i in rows]
        width = max(map(len, ids))  # left padding: every prompt ends where generation starts
        input_ids = torch.tensor([[prep.pad_id] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        generated = prep.model.generate(input_ids=input_ids, attention_mask=mask,
                                        max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=prep.pad_id)
        for i, row in zip(rows, generated[:, width:]):
            out[i] = prep.tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def _fresh(name: str, taken: set[str]) -> str:
    """`name`, or `name_pred` ... when the input already has a column of that name."""
    while name in taken:
        name += "_pred"
    return name


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` as CSV or JSONL, atomically (a temp file beside `path`, then a rename)."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            if path.suffix.lower() == ".jsonl":
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                fields = list(dict.fromkeys(k for r in rows for k in r))
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def predict_file(recipe: Recipe, adapter: str | Path, data: str | Path, output: str | Path, *,
                 batch_size: int = 16, max_new_tokens: int = 64, overwrite: bool = False,
                 progress: bool = True, column: str | None = None) -> Predictions:
    """Predictions of `adapter` for every row of `data`, written to `output` (see module doc);
    `column`: the file's input column, when it is not the one the run read."""
    if is_vision_model(recipe.model.name):
        raise ConfigError("petkit predict reads text rows; an image model's adapter is scored "
                          "with petkit eval")
    task_type = task_type_of(recipe)
    run_column, flag = (recipe.data.prompt_column, "--prompt-column") if task_type == "instruction" \
        else (recipe.data.text_column, "--text-column")
    rows = read_inputs(data, column or run_column, None if column else flag)
    column = column or run_column
    path = claim_file(output, overwrite)
    info = {} if task_type == "instruction" else task_info(recipe, adapter, task_type)
    prep = load_with_adapter(recipe, adapter, with_data=needs_data(recipe))
    prep.model.eval()
    inputs, taken = [str(r[column]) for r in rows], {str(k) for r in rows for k in r}
    length = recipe.data.max_length
    if task_type == "instruction":
        texts = complete(prep, inputs, length, max_new_tokens, batch_size, progress)
        name = _fresh("completion", taken)
        written = [{**r, name: t} for r, t in zip(rows, texts)]
        return Predictions(write_rows(path, written), len(rows), task_type, {})
    probs = classify(prep, inputs, info, length, batch_size, progress)
    labels = [str(label) for label in info["labels"]]
    names = [_fresh("prediction", taken)] + [_fresh(f"score_{label}", taken) for label in labels]
    predicted = [labels[int(i)] for i in probs.argmax(dim=-1)]
    written = [{**r, names[0]: p, **{n: round(float(v), 6) for n, v in zip(names[1:], row)}}
               for r, p, row in zip(rows, predicted, probs)]
    counts = {label: predicted.count(label) for label in labels}
    return Predictions(write_rows(path, written), len(rows), task_type, counts)
