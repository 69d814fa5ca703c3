"""The `petkit train / eval / merge` flags: the recipe field each one sets, its help text and
metavar, and the groups `--help` shows them in (used by `petkit.cli` to build its parser).
Any recipe field without a named flag is reachable as --section.field."""

from petkit.app.aliases import ALIASES
from petkit.data.chat import TEMPLATES
from petkit.data.embedded import DATASETS
from petkit.data.formats import FORMATS
from petkit.models.embedded import MODELS

FLAGS = ALIASES  # the one table of short flags (app/aliases.py)
COLUMNS = ("text_column", "label_column", "prompt_column", "completion_column")
DATA = ("data", "validation_file", "test_file", *COLUMNS, "task_type", "max_length",
        "train_size", "test_size", "format", "data_split", "data_config", "chat_template",
        "train_on", "bad_rows")
TRAINING = ("steps", "epochs", "lr", "batch_size", "grad_accum", "warmup", "schedule",
            "eval_every", "precision", "seed", "output", "device", "compile", "compile_scope",
            "checkpointing", "packing", "report_to")
METHOD = ("method", "rank", "alpha", "model", "quantize", "prune", "sparsity")
OPTIMISERS = ("optimizer", "ist_top_k", "ist_every", "eps", "n_spsa", "dim", "popsize")
HELP = {"device": "auto (the GPU when there is one) | cpu | cuda | cuda:N",
        "compile": "true: torch.compile the forward and loss (docs/training-gpu.md)",
        "compile_scope": "model: one graph of forward + loss | blocks: each transformer block "
                         "compiled once (far shorter compile on deep models)",
        "checkpointing": "activation checkpointing: off | full | every-K | selective | elementwise",
        "packing": "true: several causal-LM examples per row, isolated by position ids",
        "report_to": "also log to tensorboard and/or mlflow (comma-separated; pip install "
                     "petkit[tensorboard] / petkit[mlflow]; docs/tracking.md)",
        "data": f"embedded task ({DATASETS.names()}; `petkit embedded`), an image folder (one sub-folder per class), your training file "
                "(.csv .jsonl .json .parquet), a saved Hugging Face dataset folder or a hub "
                "dataset id (org/name): all its rows train unless --train-size is given",
        "format": "row layout: auto (recognised from the columns) | " + " | ".join(FORMATS)
                  + " (docs/data.md)",
        "data_split": "datasets: the split that trains (default: train; a 'test' split tests)",
        "data_config": "hub datasets: the configuration (subset) name",
        "chat_template": "chat data: model (the model's own, default) | " + " | ".join(TEMPLATES)
                         + " | a Jinja file",
        "train_on": "chat data: which tokens carry the loss: assistant (default) | last "
                    "(the last answer) | all",
        "bad_rows": "malformed rows: error (default; each named) | skip (train on the rest, "
                    "each skipped row named)",
        "validation_file": "your validation file: picks the best step (with --eval-every)",
        "test_file": "your test file, scored in full before and after training (without it, "
                     "20%% of the training file is held out and the output says so)",
        "text_column": "column holding the text (default: text)",
        "label_column": "column holding the label, words or integers (default: label)",
        "prompt_column": "instruction data: column holding the prompt (default: prompt)",
        "completion_column": "instruction data: column holding the answer (default: completion)",
        "task_type": "auto | verbaliser | head | instruction",
        "max_length": "tokens per example (longer texts are cut)",
        "train_size": "train on a seeded subset of this many examples",
        "test_size": "score a fixed subset of this many test examples",
        "steps": "optimiser steps", "epochs": "passes over the training data (instead of --steps)",
        "lr": "learning rate (default: the method's suggested rate)",
        "batch_size": "examples per optimiser step", "grad_accum": "micro-batches per step",
        "warmup": "warm-up steps (train.warmup_steps)", "schedule": "linear | cosine | constant",
        "eval_every": "validate every N steps and keep the best (needs validation data)",
        "precision": "auto | fp32 | bf16", "seed": "seed of data order and initialisation",
        "output": "output folder (adapter, logs, checkpoints)",
        "method": "registered method name (see `petkit methods`)",
        "rank": "rank r of LoRA-family methods (method.r)",
        "alpha": "scaling alpha of LoRA-family methods (method.alpha)",
        "model": f"embedded model ({MODELS.names()}), a local folder or a hub id",
        "ist_top_k": "IST: update only this many importance-sampled layers per step",
        "ist_every": "IST: re-score layer importance every this many steps (default 10)",
        "optimizer": "adamw | sgd (backprop), mezo | zo-adam (zeroth-order), cma (CMA-ES)",
        "eps": "zeroth-order perturbation scale (train.stepper.eps)",
        "n_spsa": "zeroth-order perturbations per step (train.stepper.n_spsa)",
        "dim": "CMA-ES subspace dimension d (train.stepper.dim)",
        "popsize": "CMA-ES population size (train.stepper.popsize)",
        "quantize": "nf4 | fp4 | int8: quantise the base's linear layers first (QLoRA; pip install bitsandbytes)",
        "prune": "loraprune | apt: prune heads and MLP channels while tuning a LoRA (Llama-style "
                 "decoders; BERT-style encoders: MLP channels only); the pruned model is saved "
                 "to OUTPUT/pruned (docs/compressed.md)",
        "sparsity": "with --prune: fraction of block parameters removed (default 0.5)"}
METAVARS = {"data": "TASK|FILE|FOLDER|HUB_ID", "format": "NAME", "data_split": "SPLIT",
            "data_config": "NAME", "chat_template": "NAME|FILE", "train_on": "WHICH",
            "bad_rows": "POLICY", "warmup": "STEPS", "eval_every": "STEPS", "n_spsa": "N",
            "grad_accum": "N", "epochs": "N", "output": "DIR", "method": "NAME", "model": "NAME",
            "schedule": "NAME", "precision": "NAME", "optimizer": "NAME", "rank": "R",
            "alpha": "ALPHA", "steps": "N", "report_to": "TRACKERS", "eps": "EPS", "dim": "D", "popsize": "N"}
DOTTED = ("Every recipe field is an option too, written --SECTION.FIELD=VALUE with SECTION one of "
          "method, model, data, train, runtime (listed above per section): --method.dropout=0.1 "
          "--train.weight_decay=0.01 --data.validation_size=100 --train.stepper.eps=1e-3 "
          "--runtime.device=cpu. Order of precedence: --recipe "
          "(default: the shipped 'default'), then the flags above, then dotted options. An "
          "unknown field's error lists the fields of its section.")
# Objectives: train.objective (training/objectives_config.py, docs/objectives.md); --reward is
# repeatable and set by the CLI itself.
OBJECTIVE = ("objective", "beta", "group_size", "kl", "max_new_tokens", "temperature", "metric")
HELP.update({
    "objective": "sft (default) | dpo | rpo | ipo | orpo | simpo | kto (preference pairs) | "
                 "grpo (prompts + --reward)",
    "beta": "dpo/rpo/ipo/kto: strength of the pull to the reference (default 0.1; dpo 0.5); "
            "simpo: reward scale (default 2.0)",
    "group_size": "grpo: completions sampled per prompt (default 4)",
    "kl": "grpo: weight of the KL estimate against the reference (default 0.04)",
    "max_new_tokens": "grpo sampling and generation evaluation: tokens per completion "
                      "(default 16)",
    "temperature": "grpo: sampling temperature (default 1.0)",
    "metric": "generation evaluation: exact | contains | module:function (default exact)"})
METAVARS.update({"objective": "NAME", "beta": "BETA", "group_size": "G", "kl": "WEIGHT",
                 "max_new_tokens": "N", "temperature": "T", "metric": "NAME|MODULE:FUNCTION"})
REWARD_HELP = ("grpo: a reward function module:function[=weight] taking (prompts, completions, "
               "rows) and returning one number per completion; repeat for a weighted sum "
               "(the module's file is printed before it is imported)")



def _flag_names() -> dict[str, str]:
    """Dotted field -> the flag a user types for it ("train.max_steps" -> "--steps")."""
    return {dotted: "--" + name.replace("_", "-") for name, dotted in FLAGS.items()}


def _known(section: str, field: str) -> bool:
    """Whether `section.field` is a recipe field (so "model.safetensors" stays a file name)."""
    import dataclasses

    from petkit.app.recipe import DataSpec, ModelSpec
    from petkit.training.config import TrainConfig

    if section == "method":
        return True
    top = field.split(".")[0]
    if section == "train" and "." in field:
        return top in ("stepper", "ist", "objective")
    cls = {"train": TrainConfig, "data": DataSpec, "model": ModelSpec}[section]
    return top in {f.name for f in dataclasses.fields(cls)}


def speak_flags(message: str) -> str:
    """A library message in the words of the command line: `TrainConfig.max_steps`,
    `LoraConfig.r` and `data.text_column` become `--steps`, `--rank` and `--text-column`; a field
    without a named flag becomes its dotted option (`--train.weight_decay`)."""
    import re

    from petkit.core.registry import METHODS

    flags = _flag_names()
    method_classes = {info.config_cls.__name__ for info in METHODS.values()}

    def flag(match: re.Match[str]) -> str:
        owner, field = match.group(1), match.group(2)
        section = ("train" if owner == "TrainConfig" else
                   "method" if owner in method_classes else owner)
        if section not in ("train", "data", "model", "method") or not _known(section, field):
            return match.group(0)
        dotted = f"{section}.{field}"
        return flags.get(dotted, "--" + dotted)

    return re.sub(r"(?<![\w./=-])([A-Za-z]\w*)\.([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?)\b",
                  flag, message)
