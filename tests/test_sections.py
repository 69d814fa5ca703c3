"""The run's settings are sections: `TrainConfig` (what the loop trains: length, batch, lr and
schedule, evaluation, checkpoints, logs) and `RuntimeConfig` (where and how it executes). Old flat
keys (Python keyword arguments, recipe YAML, --train.<field> flags) keep working with a
DeprecationWarning that names the new place; the parts that read the runtime get only it."""
from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import yaml

import petkit as pk
from petkit.app.recipe import Recipe, apply_overrides, recipe_from_dict
from petkit.cli import _recipe, _split_dotted, build_parser
from petkit.core.errors import ConfigError
from petkit.training import placement, run_modes
from petkit.training.runtime import RUNTIME_FIELDS, RuntimeConfig


def _cli(argv: list[str]) -> Recipe:
    args, extra = build_parser().parse_known_args(argv)
    return _recipe(args, _split_dotted(extra))


def test_train_and_runtime_fields_are_disjoint_and_every_runtime_field_has_help():
    train = {f.name for f in dataclasses.fields(pk.TrainConfig)}
    assert not train & set(RUNTIME_FIELDS) and "runtime" in train
    assert {"lr", "max_steps", "batch_size", "eval_every", "save_every", "log_every"} <= train
    assert {"device", "precision", "compile", "activation_checkpointing", "activation_offload",
            "packing", "distributed"} <= set(RUNTIME_FIELDS)
    assert all(f.metadata.get("help") for f in dataclasses.fields(RuntimeConfig))


@pytest.mark.parametrize("key,value", [("device", "cpu"), ("precision", "fp32"),
                                       ("activation_checkpointing", "full"),
                                       ("distributed", "off"), ("loss_chunk", 0)])
def test_flat_runtime_keyword_warns_and_lands_in_the_runtime_section(key, value):
    with pytest.warns(DeprecationWarning, match=rf"runtime\.{key}"):
        cfg = pk.TrainConfig(max_steps=2, **{key: value})
    assert getattr(cfg.runtime, key) == value
    assert getattr(cfg, key) == value  # old reads go through the section
    assert cfg == pk.TrainConfig(max_steps=2, runtime=RuntimeConfig(**{key: value}))
    assert pk.TrainConfig.from_json(cfg.to_json()) == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling and a replace() of it: no warning
        assert cfg.replace(lr=1e-3).runtime == cfg.runtime


def test_runtime_values_are_checked_in_their_own_section():
    with pytest.raises(ConfigError, match=r"RuntimeConfig\.device .*--runtime\.device"):
        RuntimeConfig(device="tpu")
    with pytest.raises(ConfigError, match="activation_offload"):
        RuntimeConfig(compile=True, activation_offload=True)
    with pytest.raises(ConfigError, match="activation_budget"):
        RuntimeConfig(activation_budget=float("nan"), compile=True)
    with pytest.raises(ConfigError, match="runtime"):
        pk.TrainConfig(runtime={"devise": "cpu"})
    with pytest.raises(AttributeError):
        pk.TrainConfig().not_a_field  # noqa: B018


def test_recipe_runtime_section_round_trips_and_old_train_keys_still_load():
    recipe = recipe_from_dict({"train": {"max_steps": 3}, "runtime": {"device": "cpu"}})
    assert recipe.runtime == RuntimeConfig(device="cpu") and recipe.train.max_steps == 3
    text = recipe.to_yaml()
    assert "device" not in yaml.safe_load(text)["train"]
    assert recipe_from_dict(yaml.safe_load(text)) == recipe
    with pytest.warns(DeprecationWarning, match=r"runtime\.precision"):
        old = recipe_from_dict({"train": {"max_steps": 3, "precision": "fp32"}})
    assert old.runtime.precision == "fp32"
    with pytest.raises(ConfigError, match="devise"):
        recipe_from_dict({"runtime": {"devise": "cpu"}})


def test_overrides_and_flags_reach_the_runtime_section_in_each_spelling():
    assert apply_overrides(Recipe(), {"runtime.device": "cpu"}).runtime.device == "cpu"
    with pytest.warns(DeprecationWarning, match=r"runtime\.compile_scope"):
        old = apply_overrides(Recipe(), {"train.compile_scope": "blocks"})
    assert old.runtime.compile_scope == "blocks"
    with pytest.raises(ConfigError, match="device"):
        apply_overrides(Recipe(), {"runtime.devise": "cpu"})
    flags = _cli(["train", "--device", "cpu", "--precision", "fp32", "--checkpointing", "full",
                  "--runtime.loss_chunk=0", "--lr", "0.01"])
    assert (flags.runtime.device, flags.runtime.precision, flags.runtime.loss_chunk) == \
        ("cpu", "fp32", 0)
    assert flags.runtime.activation_checkpointing == "full" and flags.train.lr == 0.01


def test_the_runtime_parts_receive_only_the_runtime_section():
    """placement and run modes take a RuntimeConfig, not the whole TrainConfig."""
    for fn in (placement.place, run_modes.check_modes, run_modes.packed_collate,
               run_modes.RunModes.__init__):
        hints = inspect.signature(fn).parameters
        assert "config" not in hints or hints["config"].annotation == "RuntimeConfig", fn
    assert "RuntimeConfig" in str(inspect.signature(run_modes.packed_collate))


# Fields whose sample value needs another field set (the section's own cross-field checks).
NEEDS = {"save_every": {"train.output_dir": "out"}, "resume": {"train.output_dir": "out"},
         "activation_budget": {"runtime.compile": "true"},
         "activation_quantization": {"runtime.compile": "true"},
         "offload_dir": {"runtime.offload_optimizer": "nvme"},
         "activation_offload_fraction": {"runtime.activation_offload": "true"}}
# Text values for string / list fields (numbers and switches are derived from the default).
TEXT = {"optimizer": "sgd", "schedule": "cosine", "output_dir": "out", "report_to": "tensorboard",
        "label_token_ids": "5,6", "device": "cpu", "precision": "fp32", "delta_dtype": "bf16",
        "compile_scope": "blocks", "activation_checkpointing": "selective", "distributed": "off",
        "offload_optimizer": "cpu", "kernels": "fused", "liger": "rope",
        "activation_quantization": "fp8", "offload_dir": "state"}
NESTED = {"stepper", "ist", "objective", "runtime", "dp"}  # sections of their own (--train.stepper.F, --dp.F)


def _sample(field: dataclasses.Field) -> tuple[str, object]:
    """A non-default value of `field` as a flag's text, and the value the config should hold."""
    if field.name in TEXT:
        text = TEXT[field.name]
        return text, [int(t) for t in text.split(",")] if "," in text else text
    default = field.default
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if "int" in str(field.type).split(" | ")[0] or isinstance(default, int):
        value = (default or 0) + 3
        return str(value), value
    value = default / 2 if default else 0.5
    return repr(value), value


SECTION_FIELDS = [(section, f) for section, cls in (("train", pk.TrainConfig),
                                                    ("runtime", RuntimeConfig))
                  for f in dataclasses.fields(cls) if f.name not in NESTED]


@pytest.mark.parametrize("section,field", SECTION_FIELDS,
                         ids=[f"{s}.{f.name}" for s, f in SECTION_FIELDS])
def test_every_section_field_reaches_petkit_train(section, field):
    """Walk the sections' fields: each one, as --<section>.<field>=value, reaches the config
    `petkit train` runs with (the other commands: tests/test_cli_sections.py)."""
    text, want = _sample(field)
    dotted = {f"{section}.{field.name}": text, **NEEDS.get(field.name, {})}
    recipe = _cli(["train", *[f"--{k}={v}" for k, v in dotted.items()]])
    holder = recipe.runtime if section == "runtime" else recipe.train
    assert getattr(holder, field.name) == want
