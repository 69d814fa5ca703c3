"""The harness's PEFT arm for every method PEFT has (built from the method's PEFT layout), and
method entries of `kind: peft` (PEFT's implementation alone, e.g. PEFT's default LoRA); both arms
of a method start from the same adapter; PEFT's AdaLoRA twin runs PEFT's rank allocation."""
from __future__ import annotations

import pytest
import torch

from torch.optim.optimizer import _global_optimizer_post_hooks

import petkit.benchmark as bench
from petkit.benchmark.arms import ArmContext, make_arm
from petkit.core.errors import ConfigError
from petkit.training import TrainConfig, train
from test_bench import grid, toy  # noqa: F401 - the tiny Llama / BERT + toy task fixture
from toys import bert_cls

peft = pytest.importorskip("peft")

ARMS = [{"name": "vera", "r": 16}, {"name": "vera", "arm": "peft:vera", "kind": "peft", "r": 16},
        {"name": "lily", "r": 4}, {"name": "lily", "arm": "peft:lily", "kind": "peft", "r": 4},
        {"name": "loha", "r": 2}, {"name": "loha", "arm": "peft:loha", "kind": "peft", "r": 2},
        {"name": "lora", "arm": "peft-default", "kind": "peft", "r": 8, "alpha": 8,
         "targets": ["query", "value"]}]


def test_peft_kind_entries_parse_and_refuse_bad_fields(toy):  # noqa: F811
    spec = bench.spec_from_dict(grid(toy, methods=ARMS))
    assert [(a.name, a.kind) for a in spec.arms][-2:] == [("peft:loha", "peft"), ("peft-default", "peft")]
    with pytest.raises(ConfigError, match="kind must be petkit or peft"):
        bench.spec_from_dict(grid(toy, methods=[{"name": "lora", "kind": "adapters"}]))
    with pytest.raises(ConfigError, match="kind: peft.*quantize"):
        bench.spec_from_dict(grid(toy, methods=[{"name": "lora", "kind": "peft", "quantize": "nf4"}]))


def test_peft_twins_of_new_methods_train_the_same_parameters(toy, tmp_path):  # noqa: F811
    spec = grid(toy, model="bert", seeds=[0], methods=ARMS, validation={"fraction": 0},
                train={"lr": 1e-2, "max_steps": 2, "batch_size": 8})
    report = bench.run(spec, tmp_path / "run", progress=False, echo=lambda s: None)
    assert not report.failed, [r["error"] for r in report.failed]
    rows = {r["arm"]: r for r in report.records}
    head = 32 * 2 + 2  # the new classifier trains in every arm
    assert rows["vera"]["trainable_params"] == rows["peft:vera"]["trainable_params"] \
        == 2 * 2 * (32 + 16) + head  # d (out) and b (r) per query / value layer
    assert rows["loha"]["trainable_params"] == rows["peft:loha"]["trainable_params"] \
        == 2 * 2 * 2 * (2 * 32 + 2 * 32) + head
    assert rows["peft-default"]["trainable_params"] == 2 * 2 * (32 + 32) * 8 + head
    assert all(0 <= r["test_metric"] <= 1 for r in rows.values())
    # both arms of a method start from the same adapter (one seed, the same draws) and train alike
    for method in ("loha", "lily"):
        assert rows[method]["test_loss"] == pytest.approx(rows[f"peft:{method}"]["test_loss"], rel=1e-6)


def test_peft_adalora_twin_reallocates_rank_over_the_cells_steps(toy):  # noqa: F811
    """PEFT's AdaLoRA moves rank only through `update_and_allocate`, which the PEFT arm calls after
    each optimiser step: at the end only target_r ranks per layer (on average) are left."""
    arm = make_arm(bench.spec_from_dict(grid(toy, methods=[
        {"name": "adalora", "arm": "peft:adalora", "kind": "peft", "init_r": 4, "target_r": 2,
         "tinit": 1, "tfinal": 2}])).arms[0])
    hooks = len(_global_optimizer_post_hooks)
    model = arm.setup(bert_cls(), ArmContext("head", ("classifier",), 0, None, 6))
    assert model.peft_config["default"].total_step == 6
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 60, (8,), generator=gen).tolist(), "labels": i % 2} for i in range(16)]
    train(model, data, TrainConfig(max_steps=6, batch_size=8, lr=1e-2), parameters=arm.parameters(model))
    arm.finish(model)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(m) for m in pattern.values()) == 2 * len(pattern)
    assert len(_global_optimizer_post_hooks) == hooks  # finish removed the arm's hook
