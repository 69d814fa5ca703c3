"""Recipe -> result for preference pairs and prompts with references: `petkit train --objective
dpo|rpo|ipo|orpo|simpo|kto|grpo|sft` on a "preference" or "reference" task (docs/objectives.md).

The same steps as `pipeline.run_recipe` (load, attach, preflight, evaluate before, `train`,
evaluate after), with the data encoded for the objective and evaluation that fits the task:

    preference pairs   pair accuracy before / after; greedy generations of the test prompts
                       next to the chosen answers in samples.csv / samples.md
    prompt + reference --metric (exact | contains | module:function) on greedy generations
                       before / after, and the same sample table

`sft` trains on the chosen answers (pairs) or the references (prompts): the supervised baseline
on the same data and budget.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from petkit.app.pipeline import RunHooks, RunReport, load_recipe_task, run_recipe
from petkit.app.recipe import Recipe
from petkit.app.run_folder import DEFAULT_OUTPUT
from petkit.core.disk import folder_bytes
from petkit.core.errors import ConfigError
from petkit.core.io import load_adapter
from petkit.core.model import activate, attach, set_trainable
from petkit.core.state import active_adapters
from petkit.core.registry import make_config
from petkit.data import encode_instruction
from petkit.data.objective_tasks import OBJECTIVE_TASKS, load_objective_task
from petkit.models import load_model
from petkit.training.grpo import GRPOObjective, generate_texts, prompt_collate, prompt_rows
from petkit.training.grpo_rewards import load_scorer, load_scorers
from petkit.training.config import TrainConfig
from petkit.training.loop import TrainResult, preflight, train
from petkit.training.objectives_config import ObjectiveConfig
from petkit.training.objectives_eval import generation_score, pair_accuracy, write_samples
from petkit.training.objectives_preference import chosen_only, encode_pairs

Echo = Callable[[str], None]
KINDS = ("preference", "reference")
CONTROL = "control"  # MEET's control-token adapter


def objective_of(recipe: Recipe) -> ObjectiveConfig:
    """The recipe's objective (SFT when none is set)."""
    return recipe.train.objective or ObjectiveConfig()


def is_objective_run(recipe: Recipe) -> bool:
    """Whether `recipe` is served here: an objective is set (`--objective`, even sft: the data
    may be pairs), or the data is an embedded objective task."""
    return recipe.train.objective is not None or recipe.data.name in OBJECTIVE_TASKS


def objective_switch(recipe: Recipe, overrides: dict[str, str]) -> tuple[dict[str, str], str]:
    """Overrides that `--objective` implies: switching the recipe's objective to another drops
    the recipe's `beta` unless `--beta` is given, since each objective reads it on its own scale
    (SimPO's 2.0 is a reward scale, DPO's 0.1 a KL strength); the note says so ("" if none)."""
    pinned = recipe.train.objective
    new = overrides.get("train.objective.name")
    if pinned is None or pinned.beta is None or new in (None, pinned.name) \
            or "train.objective.beta" in overrides:
        return overrides, ""
    beta = ObjectiveConfig(name=new).effective_beta
    if beta == pinned.beta:
        return overrides, ""
    note = (f"beta {beta:g}: {new}'s default, not the "
            f"recipe's {pinned.beta:g} for {pinned.name} (--beta sets another)")
    return {**overrides, "train.objective.beta": "none"}, note


def _task(recipe: Recipe) -> Any:
    name, seed = recipe.data.name, recipe.train.seed
    task = load_objective_task(name, seed) if name in OBJECTIVE_TASKS \
        else load_recipe_task(recipe.data, seed)
    spec = objective_of(recipe)
    wanted = "preference" if spec.is_preference else "reference" if spec.name == "grpo" else None
    if (wanted and task.kind != wanted) or (task.kind not in KINDS and spec.name != "sft"):
        need = wanted or " or ".join(KINDS)
        raise ConfigError(f"--objective {spec.name} needs {need} data (prompt/chosen/rejected "
                          f"pairs, or prompt/reference rows); --data {name} holds {task.kind} "
                          f"rows (see docs/objectives.md)")
    return task


def _sized(rows: list[dict], size: int | None, seed: int) -> list[dict]:
    return rows if size is None or size >= len(rows) else random.Random(seed).sample(rows, size)


@dataclasses.dataclass
class _Data:
    """The task encoded for this run: training rows, test rows, their raw rows."""

    train: list[dict]
    test: list[dict]
    test_raw: list[dict]
    train_raw: list[dict]
    prompts: list[list[int]]  # test prompts' token ids (generation)


def _encode(recipe: Recipe, task: Any, tokenizer: Any) -> _Data:
    spec, data = objective_of(recipe), recipe.data
    train_raw = _sized(list(task.train), data.train_size, recipe.train.seed)
    test_raw = _sized(list(task.test), data.test_size, 0)
    if task.kind == "preference":
        _check_text_pairs(train_raw + test_raw)
        pairs = encode_pairs(train_raw, tokenizer, data.max_length)
        test = encode_pairs(test_raw, tokenizer, data.max_length)
        prompts = [[t for t, y in zip(p["input_ids"], p["labels"]) if y == -100] for p in test]
        train_rows = chosen_only(pairs) if spec.name == "sft" else pairs
        return _Data(train_rows, test, test_raw, train_raw, prompts)
    as_instruction = lambda rows: [{"prompt": r["prompt"], "completion": r["reference"]}  # noqa: E731
                                   for r in rows]
    encoded = encode_instruction(as_instruction(train_raw), tokenizer, max_length=data.max_length)
    test = encode_instruction(as_instruction(test_raw), tokenizer, max_length=data.max_length)
    prompts = [p["input_ids"] for p in prompt_rows(test)]
    train_rows = prompt_rows(encoded) if spec.name == "grpo" else encoded
    return _Data(train_rows, test, test_raw, train_raw, prompts)


def _check_text_pairs(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ConfigError(f"preference row {i}: message-list pairs are not yet trained by "
                              "--objective (text prompt/chosen/rejected only)")


def _evaluate(model: Any, tokenizer: Any, data: _Data, metric: Any, spec: ObjectiveConfig,
              pad_id: int) -> tuple[dict[str, float], list[str]]:
    """The metric on greedy generations (references) or pair accuracy (pairs, `metric` None),
    and the greedy test completions."""
    if metric is None:
        texts = generate_texts(model, tokenizer, data.prompts, spec.max_new_tokens)
        return {"pair_accuracy": pair_accuracy(model, data.test, pad_id)}, texts
    score, texts = generation_score(model, tokenizer, data.prompts, data.test_raw, metric,
                                    spec.max_new_tokens)
    return {metric.spec.split(":")[-1]: score}, texts


def _once(echo: Echo) -> Echo:
    """`echo` that prints a line only the first time (a module named by --reward and --metric)."""
    seen: set[str] = set()

    def echo_once(line: str) -> None:
        if line not in seen:
            seen.add(line)
            echo(line)

    return echo_once


def run_objective_recipe(recipe: Recipe, echo: Echo = print,
                         hooks: RunHooks | None = None) -> RunReport:
    """Train `recipe` with its objective; evaluate before and after; write the sample table.
    `--objective sft` on classification / instruction / chat data is `run_recipe`'s run."""
    started = time.perf_counter()
    spec = objective_of(recipe)
    recipe.method_config()
    output = Path(recipe.train.output_dir or DEFAULT_OUTPUT)
    task = _task(recipe)
    if task.kind not in KINDS:  # plain SFT on other data: the ordinary pipeline
        return run_recipe(recipe, echo, hooks)
    echo(f"loading {recipe.model.name} and {recipe.data.name} ...")
    torch.manual_seed(recipe.train.seed)
    model, tokenizer = load_model(recipe.model.name, task="causal-lm")
    pad_id = int(tokenizer.pad_token_id)
    data = _encode(recipe, task, tokenizer)
    echo = _once(echo)
    metric = load_scorer(spec.metric, echo) if task.kind == "reference" else None
    config = recipe.train.replace(output_dir=str(output))
    resolved = dataclasses.replace(recipe, train=config)
    if spec.control_tokens:
        _attach_control(model, spec, recipe.train.seed)
    else:
        attach(model, recipe.method_config())
    objective, collate = None, None
    if spec.name == "grpo":
        objective = GRPOObjective(spec, tokenizer, data.train_raw, load_scorers(spec.rewards, echo))
        collate = lambda b: prompt_collate(b, pad_id)  # noqa: E731
    preflight(model, data.train, config)
    for note in (getattr(task, "format_note", ""), *task.notes):
        if note:
            echo(note)
    echo(f"{spec.name} on {task.kind} data: {len(data.train)} train / {len(data.test)} test")
    before, before_texts = _evaluate(model, tokenizer, data, metric, spec, pad_id)
    echo(f"test before: {_format(before)}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.yaml").write_text(resolved.to_yaml(), encoding="utf-8")
    if spec.control_tokens:
        result = _meet(model, data.train, config, recipe, echo, pad_id)
    else:
        result = train(model, data.train, config, pad_id=pad_id, collate_fn=collate,
                       objective=objective)
    after, after_texts = _evaluate(model, tokenizer, data, metric, spec, pad_id)
    files = write_samples(output, data.test_raw, before_texts, after_texts)
    echo(f"samples (prompt, reference, before, after): {files[1]}")
    adapter = Path(result.adapter_path or output / "adapter")
    return RunReport(resolved, before, after, result, folder_bytes(adapter),
                     time.perf_counter() - started)


def evaluate_objective_adapter(recipe: Recipe, adapter: str | Path, echo: Echo = print
                               ) -> tuple[int, dict[str, float]] | None:
    """`petkit eval` of an adapter trained on pairs or prompts with references: the recipe's
    test rows (or --data's), pair accuracy or --metric on greedy generations, as training
    reports them; (rows, metrics). None when the data is of another kind (the plain pipeline
    scores it). A folder of several adapters (MEET's control + meet) loads them all, active."""
    task = _task(recipe)
    if task.kind not in KINDS:
        return None
    spec = objective_of(recipe)
    model, tokenizer = load_model(recipe.model.name, task="causal-lm")
    data = _encode(recipe, task, tokenizer)
    metric = load_scorer(spec.metric, echo) if task.kind == "reference" else None
    folder = Path(adapter)
    parts = [folder] if (folder / "adapter.json").is_file() or not folder.is_dir() else \
        sorted(p for p in folder.iterdir()  # dot names: saved versions, temps
               if not p.name.startswith(".") and (p / "adapter.json").is_file()) or [folder]
    names: list[str] = []
    for part in parts:
        load_adapter(model, str(part))  # attached and made the one active adapter
        names += active_adapters(model)
    activate(model, names)
    for note in (getattr(task, "format_note", ""), *task.notes):
        if note:
            echo(note)
    metrics, _ = _evaluate(model, tokenizer, data, metric, spec, int(tokenizer.pad_token_id))
    return len(data.test), metrics


def _attach_control(model: Any, spec: ObjectiveConfig, seed: int) -> None:
    """MEET's first adapter: `spec.control_tokens` virtual tokens (prompt tuning), "control"."""
    attach(model, make_config("prompt", num_virtual_tokens=spec.control_tokens, seed=seed),
           CONTROL)


def _meet(model: Any, rows: list[dict], config: TrainConfig, recipe: Recipe, echo: Echo,
          pad_id: int) -> TrainResult:
    """MEET's two steps, half the steps each, both with the preference objective: (1) the
    control tokens (attached by `_attach_control`) at `control_lr`, its log in OUTPUT/step1;
    (2) the recipe's method at the recipe's lr, the control tokens fixed and still active. Both
    adapters are saved at the end, OUTPUT/adapter/control and OUTPUT/adapter/meet."""
    spec = objective_of(recipe)
    total = config.max_steps
    if total is None or total < 2:
        raise ConfigError("MEET (--train.objective.control_tokens) splits --steps between its "
                          f"two steps: give --steps >= 2 (got {total})")
    first = total // 2
    output = Path(config.output_dir or DEFAULT_OUTPUT)
    echo(f"MEET step 1: {spec.control_tokens} control tokens (prompt tuning), {first} steps, "
         f"lr {spec.control_lr}")
    train(model, rows, config.replace(max_steps=first, lr=spec.control_lr,
                                      output_dir=str(output / "step1")), pad_id=pad_id)
    set_trainable(model, CONTROL, False)
    attach(model, recipe.method_config(), "meet")
    activate(model, [CONTROL, "meet"])
    echo(f"MEET step 2: {recipe.method_name} with the control tokens fixed, {total - first} "
         f"steps, lr {config.lr}")
    return train(model, rows, config.replace(max_steps=total - first), pad_id=pad_id)


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
