"""Recipe -> result: load model and task, encode, attach, evaluate before/after, train.

What `petkit train | eval | inspect` do, as library functions the CLI only calls (merge and
export: `app.export`; predictions: `app.predict`).
A run writes its resolved recipe to `output_dir/recipe.yaml`, so `eval`/`merge` of
`output_dir/adapter` rebuild the same model, task type and encoding without flags.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.core.disk import folder_bytes
from petkit.training.evaluate import evaluate, format_metrics
from petkit.training.loop import TrainResult, preflight, train
from petkit.training.placement import check_device
from petkit.app.results import write_results
from petkit.app.recipe import DataSpec, Recipe
from petkit.app.run_folder import DEFAULT_OUTPUT
from petkit.core.durable import write_folder
from petkit.core.io import describe_base, load_adapter
from petkit.core.model import attach
from petkit.core.registry import make_config
from petkit.data import (Columns, ReadOptions, encode_classification, encode_instruction,
                         label_token_ids, load_task, load_test_file, split_validation)
from petkit.data.chat import encode_chat
from petkit.data.hf import is_dataset_folder
from petkit.data.images import collate_images, encode_images, is_image_task, load_image_folder
from petkit.models.quantize import quantize
from petkit.models import head_module_names, load_model, resolve_model
from petkit.models.vision import is_vision_model, load_vision_model

ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "xlm-roberta", "mpnet", "camembert", "modernbert"}
Echo = Callable[[str], None]
Examples = list[dict[str, Any]]


@dataclass
class Prepared:
    """A model ready for a delta and the task encoded for its task type."""

    model: nn.Module
    tokenizer: Any
    task_type: str
    train: Examples
    validation: Examples
    test: Examples
    label_token_ids: list[int] | None
    pad_id: int
    notes: list[str] = field(default_factory=list)  # where each split came from, its size

    collate: Callable[[Examples], dict[str, torch.Tensor]] | None = None  # image tasks: pixels


@dataclass
class RunHooks:
    """A regime that reshapes the model around training (pruning: `petkit.compress.cli`)."""

    attached: Callable[[Prepared], None]  # after the delta is attached, before training
    trained: Callable[[Prepared, Path], dict[str, Any]]  # after training, before the final test;
    # what it returns joins the training result's report


@dataclass
class RunReport:
    """Before/after test metrics of a run, its training result and the adapter's size."""

    recipe: Recipe
    before: dict[str, float]
    after: dict[str, float]
    result: TrainResult
    adapter_bytes: int
    seconds: float


def _is_encoder(model_name: str) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(model_name))
    except (OSError, ValueError):
        return False  # load_model reports a missing model properly later
    return config.model_type in ENCODER_TYPES


def resolve_task_type(recipe: Recipe, task_kind: str) -> str:
    """The concrete task type: "auto" becomes instruction / head (encoders) / verbaliser."""
    wanted = recipe.data.task_type
    if task_kind == "chat":  # a causal LM on the trained turns, like instruction data
        task_kind = "instruction"
    if task_kind == "instruction" or wanted == "instruction":
        if task_kind != "instruction" or wanted not in ("auto", "instruction"):
            raise ConfigError(f"data.task_type={wanted!r} does not fit task {recipe.data.name!r} "
                              f"(a {task_kind} task)")
        return "instruction"
    if wanted != "auto":
        return wanted
    return "head" if _is_encoder(recipe.model.name) else "verbaliser"


def _subset(examples: Examples, size: int | None, seed: int) -> Examples:
    if size is None or size >= len(examples):
        return list(examples)
    return random.Random(seed).sample(list(examples), size)


def encode_examples(examples: Examples, prep: Prepared, task: Any, max_length: int,
                    spec: DataSpec | None = None, split: str = "train") -> Examples:
    """Tokenise raw examples for this run's task type (classification, instruction or chat:
    chat rows, and instruction rows when a --chat-template is named, go through the template;
    rows cut to max_length are counted in `prep.notes`)."""
    spec = spec or DataSpec()
    if task.kind == "chat" or prep.task_type == "instruction" and spec.chat_template:
        encoded, stats = encode_chat(examples, prep.tokenizer, max_length=max_length,
                                     template=spec.chat_template, train_on=spec.train_on)
        note = stats.note(split, max_length)
        prep.notes += [note] if note else []
        return encoded
    if prep.task_type == "instruction":
        return encode_instruction(examples, prep.tokenizer, max_length=max_length)
    template = task.template if prep.task_type == "verbaliser" else "{text}"
    return encode_classification(examples, prep.tokenizer, max_length=max_length,
                                 template=template)


def _by_length(examples: Examples) -> Examples:
    """Order for evaluation: similar lengths share a batch, so less padding is computed."""
    return sorted(examples, key=lambda e: len(e["input_ids"]))


def load_recipe_task(spec: DataSpec, seed: int = 0, test_only: bool = False) -> Any:
    """The recipe's task; `test_only` with a test file reads just that file (all of it)."""
    if Path(spec.name).is_dir() and not is_dataset_folder(spec.name):  # images per class
        return load_image_folder(Path(spec.name), spec.test_fraction, seed)
    columns = Columns(spec.text_column, spec.label_column, spec.prompt_column,
                      spec.completion_column)
    if test_only and spec.test_file:
        options = ReadOptions(columns, spec.format, bad_rows=spec.bad_rows)
        return load_test_file(Path(spec.test_file), columns, spec.labels, options)
    return load_task(spec.name, text_column=spec.text_column, label_column=spec.label_column,
                     prompt_column=spec.prompt_column, completion_column=spec.completion_column,
                     test_fraction=spec.test_fraction, seed=seed, test_file=spec.test_file,
                     validation_file=spec.validation_file, labels=spec.labels,
                     format=spec.format, split=spec.split, config=spec.config,
                     bad_rows=spec.bad_rows)


def _sized(what: str, examples: Examples, size: int | None, seed: int, flag: str,
           notes: list[str]) -> Examples:
    """A seeded subset of `size` (None: all); a cap that bites is stated in `notes`."""
    chosen = _subset(examples, size, seed)
    if len(chosen) < len(examples):
        notes.append(f"{what}: {len(chosen):,} of {len(examples):,} examples ({flag})")
    return chosen


def prepare(recipe: Recipe, *, with_train: bool = True,
            test_only: bool = False) -> tuple[Prepared, Any]:
    """Load the task (checked before the model loads), then the model; encode the
    train/validation/test subsets. `test_only` (eval) reads only a test file when one is set."""
    spec, seed = recipe.data, recipe.train.seed
    task = load_recipe_task(spec, test_only=test_only)
    notes = [n for n in (getattr(task, "format_note", ""), *task.notes) if n]
    train_raw = _sized("train", task.train, spec.train_size, seed, "--train-size",
                       notes) if with_train else []
    val_raw: Examples = list(task.validation) if with_train else []
    if with_train and spec.validation_size and not val_raw:
        if spec.validation_size >= len(train_raw):
            raise ConfigError(f"data.validation_size={spec.validation_size} leaves no training "
                              f"examples (there are {len(train_raw)})")
        train_raw, val_raw = split_validation(train_raw, spec.validation_size / len(train_raw),
                                              seed)
        notes.append(f"validation: {len(val_raw):,} examples held out of the training examples "
                     f"(data.validation_size)")
    # The test subset is fixed (seed 0), whatever the training seed.
    test_raw = _sized("test", task.test, spec.test_size, 0, "--test-size", notes)
    if is_image_task(task):  # a ViT classifier on pixels (models.vision, data.images)
        model = load_vision_model(recipe.model.name, task.num_labels, image_size=spec.image_size)
        describe_run(model, recipe, task, "head")
        collate = functools.partial(collate_images, image_size=spec.image_size)
        return Prepared(model, None, "head", encode_images(train_raw), encode_images(val_raw),
                        encode_images(test_raw), None, 0, notes, collate), task
    task_type = resolve_task_type(recipe, task.kind)
    model, tokenizer = load_base(recipe.model.name, task_type, len(task.label_names))
    describe_run(model, recipe, task, task_type)
    ids = label_token_ids(tokenizer, task.label_words) if task_type == "verbaliser" else None
    prep = Prepared(model, tokenizer, task_type, [], [], [], ids, int(tokenizer.pad_token_id),
                    notes)
    prep.train = encode_examples(train_raw, prep, task, spec.max_length, spec)
    prep.validation = _by_length(encode_examples(val_raw, prep, task, spec.max_length, spec,
                                                 "validation"))
    prep.test = _by_length(encode_examples(test_raw, prep, task, spec.max_length, spec, "test"))
    return prep, task


def load_base(name: str, task_type: str, num_labels: int = 0) -> tuple[nn.Module, Any]:
    """The base model and tokenizer for `task_type` (a head task: with a new `num_labels` head)."""
    if task_type == "head":
        return load_model(name, task="seq-cls", num_labels=num_labels)
    return load_model(name, task="causal-lm")


def describe_run(model: nn.Module, recipe: Recipe, task: Any, task_type: str) -> None:
    """Record the base's name and the task on `model`: every adapter saved from it carries them
    in adapter.json (`core.io.describe_base`), so it needs no run folder to be used."""
    spec = recipe.data
    files = _absolute_files(spec)
    info: dict[str, Any] = {"type": task_type, "data": files.get("name", spec.name),
                            "test_file": files.get("test_file")}
    if task.kind == "classification":
        info["labels"] = list(task.label_names)
        if not is_image_task(task):
            info.update(input_column=spec.text_column, target_column=spec.label_column)
        if task_type == "verbaliser":
            info.update(label_words=list(task.label_words), template=task.template)
    elif task.kind == "instruction":
        info.update(input_column=spec.prompt_column, target_column=spec.completion_column)
    name = recipe.model.name
    describe_base(model, str(Path(name).resolve()) if Path(name).is_dir() else name, info)


def method_config(recipe: Recipe, prep: Prepared) -> Any:
    """The recipe's method config; a head task also trains the new head (`modules_to_save`)."""
    fields = {k: v for k, v in recipe.method.items() if k != "name"}
    if prep.task_type == "head":
        extra = [m for m in head_module_names(prep.model)
                 if m not in fields.get("modules_to_save", ())]
        fields["modules_to_save"] = [*fields.get("modules_to_save", ()), *extra]
    return make_config(recipe.method_name, **fields)


def test_metrics(prep: Prepared, recipe: Recipe, label: str = "test") -> dict[str, float]:
    """Metrics of the current model on the prepared test subset (a progress bar named `label`
    when the pass takes more than a few seconds and the run shows progress)."""
    return evaluate(prep.model, prep.test, batch_size=recipe.train.eval_batch_size or 16,
                    pad_id=prep.pad_id, label_token_ids=prep.label_token_ids,
                    precision=recipe.train.precision, collate_fn=prep.collate,
                    progress=label if recipe.train.progress else None)


def run_recipe(recipe: Recipe, echo: Echo = print, hooks: RunHooks | None = None,
               command: list[str] | None = None) -> RunReport:
    """Train as `recipe` says; evaluate on the fixed test subset before and after; write
    `results.json` (metrics, `command`, versions, times) into the run folder."""
    started = time.perf_counter()
    recipe.method_config()  # a bad method name or field fails before minutes of loading
    check_device(recipe.train.device)  # likewise a device this machine does not have
    times: dict[str, float] = {}
    output = Path(recipe.train.output_dir or DEFAULT_OUTPUT)
    echo(f"loading {recipe.model.name} and {recipe.data.name} ...")
    torch.manual_seed(recipe.train.seed)  # a new head's and the delta's init follow the seed
    prep, task = prepare(recipe)
    labels = list(task.label_names) or None  # eval / merge of this run map labels the same way
    resolved = dataclasses.replace(recipe, data=dataclasses.replace(
        recipe.data, task_type=prep.task_type, labels=labels, **_absolute_files(recipe.data)))
    config = resolved.train.replace(output_dir=str(output), label_token_ids=prep.label_token_ids)
    resolved = dataclasses.replace(resolved, train=config)
    if recipe.model.quantize:  # QLoRA-style: the wrappers call the 4/8-bit layers
        quantize(prep.model, recipe.model.quantize)
    attach(prep.model, method_config(resolved, prep))
    if hooks is not None:
        hooks.attached(prep)
    preflight(prep.model, prep.train, config)  # a bad set-up fails before the baseline evaluation
    for note in prep.notes:
        echo(note)
    echo(f"{prep.task_type} on {len(prep.train)} train / {len(prep.validation)} validation / "
         f"{len(prep.test)} test examples; {_plan(config, len(prep.train))}")
    times["load_s"] = time.perf_counter() - started
    before = test_metrics(prep, resolved, "test before")
    times["test_before_s"] = time.perf_counter() - started - sum(times.values())
    echo(f"test before: {format_metrics(before)}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.yaml").write_text(resolved.to_yaml(), encoding="utf-8")
    result = train(prep.model, prep.train, config, eval_data=prep.validation or None,
                   pad_id=prep.pad_id, collate_fn=prep.collate)
    times["train_s"] = result.seconds
    if hooks is not None:
        result.report.update(hooks.trained(prep, output))
    mark = time.perf_counter()
    after = test_metrics(prep, resolved, "test after")
    times["test_after_s"] = time.perf_counter() - mark
    adapter = Path(result.adapter_path or output / "adapter")
    report = RunReport(resolved, before, after, result, folder_bytes(adapter),
                       time.perf_counter() - started)
    write_results(output / "results.json", report, times, command, len(prep.test))
    return report


def _absolute_files(spec: DataSpec) -> dict[str, str]:
    """The user's data files as absolute paths, so eval / merge of the run work from any folder."""
    from petkit.data import is_data_file

    files = {"name": spec.name} if is_data_file(spec.name) or Path(spec.name).is_dir() else {}
    files.update({k: v for k in ("test_file", "validation_file") if (v := getattr(spec, k))})
    return {k: str(Path(v).resolve()) for k, v in files.items()}


def _plan(config: Any, n_train: int) -> str:
    """How much of the training data the run sees: steps x examples per step, in epochs."""
    from petkit.training.batching import total_steps

    steps, per_step = total_steps(n_train, config), config.batch_size * config.grad_accum
    epochs = steps * per_step / n_train
    hint = "" if config.epochs is not None or epochs >= 1 else " (--epochs N: N full passes)"
    noun = "step" if steps == 1 else "steps"
    return f"{steps} {noun} of {per_step} = {epochs:.2f} epochs{hint}"


def load_with_adapter(recipe: Recipe, adapter: str | Path | None,
                      with_data: bool = True) -> Prepared:
    """Model (and test data) of `recipe`, with the adapter folder loaded and active. Without
    data, the model is built from the recipe alone (a head model: from `data.labels`)."""
    prep, _ = prepare(recipe, with_train=False, test_only=True) if with_data \
        else (model_only(recipe), None)
    if recipe.model.quantize:  # the base the adapter was trained on (its fingerprint says so)
        quantize(prep.model, recipe.model.quantize)
    if adapter is not None:
        load_adapter(prep.model, str(adapter))
    return prep


def needs_data(recipe: Recipe) -> bool:
    """True when the model cannot be built without reading the task: an image model, or a head
    model whose number of labels the recipe does not give."""
    spec = recipe.data
    task_type = "head" if spec.task_type == "auto" and _is_encoder(recipe.model.name) else spec.task_type
    return is_vision_model(recipe.model.name) or (task_type == "head" and not spec.labels)


def model_only(recipe: Recipe) -> Prepared:
    """The recipe's base model and tokenizer, with no data read (see `needs_data`)."""
    spec = recipe.data
    task_type = spec.task_type
    if task_type == "auto":
        task_type = "head" if _is_encoder(recipe.model.name) else "verbaliser"
    model, tokenizer = load_base(recipe.model.name, task_type, len(spec.labels or ()))
    return Prepared(model, tokenizer, task_type, [], [], [], None, int(tokenizer.pad_token_id))


def save_folder(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """`save_pretrained` of `model` and of its tokenizer, if it has one (a ViT has none: its
    pixels come from `data.images`), written atomically: a full disk keeps the previous folder."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    need = sum(p.numel() * p.element_size() for p in model.state_dict().values()) + (1 << 20)
    return write_folder(folder, fill, need_bytes=need)


def sample_batch(prep: Prepared, size: int = 8) -> dict[str, torch.Tensor]:
    """Up to `size` test examples cut to a common length: inputs to measure a merge's error on."""
    rows = [e["input_ids"] for e in prep.test[-size:]]  # sorted by length: the longest
    length = min(len(r) for r in rows)
    return {"input_ids": torch.tensor([list(r[:length]) for r in rows])}
