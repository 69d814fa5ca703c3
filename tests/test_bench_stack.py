"""Stacked arms of the benchmark harness: a method entry's `stack` attaches more methods beside the
arm's own, all trained together, each stacked method at its own `lr` (the backprop stepper's
`adapter_lr`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import petkit as pk
import petkit.benchmark as bench
from petkit.core.errors import ConfigError
from test_bench import grid, lora_qv_params, toy  # noqa: F401 - the tiny Llama + toy task fixture

IA3 = {"name": "ia3", "train": {"lr": 1e-2}}
STACKED = {**IA3, "arm": "ia3+lora", "stack": [{"name": "lora", "r": 8, "alpha": 16, "lr": 1e-3}]}


def test_a_stack_parses_into_adapters_and_a_rate_per_adapter(toy):  # noqa: F811
    spec = bench.spec_from_dict(grid(toy, methods=[IA3, STACKED], baselines={"peft": True}))
    arms = {a.name: a for a in spec.arms}
    stacked = arms["ia3+lora"]
    assert stacked.stack == ({"name": "lora", "adapter": "lora", "options": {"r": 8, "alpha": 16}, "lr": 1e-3},)
    config = spec.train_config(next(c for c in spec.cells() if c.arm.name == "ia3+lora"))
    assert config.lr == 1e-2 and config.stepper.adapter_rates() == {"lora": 1e-3}
    assert sorted(n for n in arms if n.startswith("peft:")) == ["peft:ia3"]  # no twin of a stacked arm
    one, two = (next(c for c in spec.cells() if c.arm.name == n and c.seed == 0) for n in ("ia3", "ia3+lora"))
    assert spec.fingerprint(one) != spec.fingerprint(two)
    # an arm without a stack keeps the fingerprint it had before stacking existed
    plain = spec.train_config(one).to_dict()
    assert "adapter_lr" not in plain["stepper"]


@pytest.mark.parametrize("stack, match", [
    ([{"r": 8}], "needs a method name"),
    ([{"name": "lora", "adapter": "default"}], "adapter must be a name not used"),
    ([{"name": "lora"}, {"name": "lora"}], "adapter must be a name not used"),
    ([{"name": "lora", "lr": 0}], r"lr must be a number in \(0, 10\]"),
    ([{"name": "lora", "lr": True}], r"lr must be a number"),
    ([{"name": "lora", "rank": 8}], "rank"),
    ([{"name": "no-such-method"}], "no-such-method"),
    ([], "non-empty list"),
    ("lora", "non-empty list"),
])
def test_a_bad_stack_entry_is_refused_before_anything_runs(toy, stack, match):  # noqa: F811
    with pytest.raises(ConfigError, match=match):
        bench.spec_from_dict(grid(toy, methods=[{**IA3, "stack": stack}]))


def test_a_stack_refuses_arms_it_cannot_join(toy):  # noqa: F811
    with pytest.raises(ConfigError, match="plain petkit arm"):
        bench.spec_from_dict(grid(toy, methods=[{**STACKED, "kind": "peft"}]))
    with pytest.raises(ConfigError, match="backprop stepper"):
        bench.spec_from_dict(grid(toy, methods=[{**STACKED, "train": {"optimizer": "mezo", "stepper": "zo"}}]))


def test_a_stacked_arm_trains_both_adapters_at_their_rates_and_saves_each(toy, tmp_path):  # noqa: F811
    methods = [IA3, {"name": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
               {**STACKED, "stack": [{**STACKED["stack"][0], "targets": ["q_proj", "v_proj"]}]}]
    report = pk.bench(grid(toy, methods=methods, seeds=[0], validation={"fraction": 0}),
                      tmp_path / "run", progress=False, echo=lambda s: None)
    assert not report.failed, [r.get("error") for r in report.failed]
    rec = {r["arm"]: r for r in report.records}
    assert rec["ia3+lora"]["trainable_params"] == rec["ia3"]["trainable_params"] + lora_qv_params(8)
    folder = next(Path(report.folder, "cells").glob("*ia3+lora*")) / "adapter"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["default", "lora"]
    methods_saved = {p.name: json.loads((p / "adapter.json").read_text())["method"] for p in folder.iterdir() if not p.name.startswith(".")}
    assert methods_saved == {"default": "ia3", "lora": "lora"}
    assert rec["ia3+lora"]["adapter_bytes"] > rec["ia3"]["adapter_bytes"]
