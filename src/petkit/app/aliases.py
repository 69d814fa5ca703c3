"""The one table of short flags of the recipe sections: each names the field it sets (`--lr`
is `train.lr`).

Every command that offers such a flag maps it through this table (`petkit train`'s flags in
`cli_flags.py`; `petkit continual` and `petkit fed` in their own flag modules, where a flag may
be spelt differently, e.g. fed's `--local-steps` is the row `steps`); any field without a short
flag is `--section.field` (`petkit.cli_sections`). A regime's own section keeps its flags beside
it (`fed/flags.py`: `--clients` is `fed.clients`). Kept free of imports, so the parsers that read
it load nothing.
"""

ALIASES = {"method": "method.name", "model": "model.name", "data": "data.name",
           "validation_file": "data.validation_file", "test_file": "data.test_file",
           "text_column": "data.text_column", "label_column": "data.label_column",
           "prompt_column": "data.prompt_column", "completion_column": "data.completion_column",
           "task_type": "data.task_type", "steps": "train.max_steps", "epochs": "train.epochs",
           "lr": "train.lr", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
           "warmup": "train.warmup_steps", "schedule": "train.schedule",
           "eval_every": "train.eval_every", "precision": "runtime.precision",
           "rank": "method.r", "alpha": "method.alpha", "max_length": "data.max_length",
           "train_size": "data.train_size", "test_size": "data.test_size", "seed": "train.seed",
           "output": "train.output_dir", "ist_top_k": "train.ist.top_k",
           "ist_every": "train.ist.every", "optimizer": "train.optimizer",
           "eps": "train.stepper.eps", "n_spsa": "train.stepper.n_spsa",
           "dim": "train.stepper.dim", "popsize": "train.stepper.popsize",
           "quantize": "model.quantize", "prune": "model.prune", "sparsity": "model.sparsity",
           "device": "runtime.device", "compile": "runtime.compile",
           "compile_scope": "runtime.compile_scope",
           "checkpointing": "runtime.activation_checkpointing", "packing": "runtime.packing",
           "format": "data.format", "data_split": "data.split", "data_config": "data.config",
           "chat_template": "data.chat_template", "train_on": "data.train_on",
           "bad_rows": "data.bad_rows", "report_to": "train.report_to",
           # objectives (training/objectives_config.py, docs/objectives.md)
           "objective": "train.objective.name", "beta": "train.objective.beta",
           "group_size": "train.objective.group_size", "kl": "train.objective.kl",
           "max_new_tokens": "train.objective.max_new_tokens",
           "temperature": "train.objective.temperature", "metric": "train.objective.metric"}


def named_overrides(values: dict[str, object], flags: dict[str, str] | None = None) -> dict[str, str]:
    """{"section.field": text} of the short flags given: `values` maps a flag's name (or its
    argparse dest, through `flags`: dest -> flag name) to its value; None is not given."""
    flags = flags or {}
    out = {}
    for dest, value in values.items():
        name = flags.get(dest, dest)
        if value is not None and name in ALIASES:
            out[ALIASES[name]] = str(value)
    return out
