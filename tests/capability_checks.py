"""What each capability Protocol promises, as one check per Protocol.

tests/test_contract.py runs the check of every Protocol a method claims in its config's
`capabilities`, on every row of the contract table. A check gets the base model, the model with a
trained adapter "a", a batch and a temp folder; it asserts behaviour, not the presence of names.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import petkit as pk
from petkit.core import capabilities as cap
from petkit.core.delta import DeltaModule, innermost, iter_deltas
from petkit.core.targets import is_linear, linear_dims
from petkit.training.step_hooks import StepHooks
from toys import run

Check = Callable[[nn.Module, nn.Module, dict, Path], None]


def wrappers(model: nn.Module, protocol: type) -> list[tuple[str, Any]]:
    return [(p, w) for p, w in iter_deltas(model) if w.adapter_name == "a" and isinstance(w, protocol)]


def _tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def wrapper_inputs(model: nn.Module, batch: dict, chosen: list[DeltaModule]) -> dict[int, tuple]:
    """The (args, kwargs) each chosen wrapper is called with in one forward of `model`."""
    seen: dict[int, tuple] = {}
    hooks = [w.register_forward_pre_hook(lambda m, a, k: seen.setdefault(id(m), (a, k)), with_kwargs=True)
             for w in chosen]
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_weighted(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """Weight 0.5 halves each wrapper's delta: its output minus its base's where the base is
    linear (so the output is linear in the weight change), and its merged weight change."""
    model.eval()
    chosen = [w for _, w in wrappers(model, cap.Weighted)]
    linear = [w for w in chosen if is_linear(innermost(w))]
    merging = [w for w in chosen if isinstance(w, cap.MergesOwnDeltas)]
    assert all(w in linear or w in merging for w in chosen), "a weighted wrapper neither check covers"
    seen = wrapper_inputs(model, batch, linear)
    with torch.no_grad():
        def deltas() -> list[torch.Tensor]:
            out = [_tensor(w(*seen[id(w)][0], **seen[id(w)][1])) - _tensor(w.base(*seen[id(w)][0], **seen[id(w)][1]))
                   for w in linear]
            return out + [d for w in merging for d in w.merge_deltas().values()]
        full = deltas()
        pk.activate(model, "a", weights=[0.5])
        half = deltas()
    assert pk.adapter_weights(model) == {"a": 0.5}
    for f, h in zip(full, half):
        assert f.abs().max() > 0
        torch.testing.assert_close(h, 0.5 * f, rtol=1e-4, atol=1e-5)


def check_lowrank(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """`lowrank()` factors give exactly the wrapper's merged weight delta: scale * B @ A."""
    for _, w in wrappers(model, cap.LowRank):
        a, b, scale = w.lowrank()
        expect = (scale * b @ a).detach()
        transposed = linear_dims(innermost(w))[2]
        torch.testing.assert_close(w.delta_weight(), expect.T if transposed else expect, rtol=1e-5, atol=1e-6)


def calls(model: nn.Module, batch: dict, protocol: type) -> list[tuple[Any, torch.Tensor, list, dict]]:
    """(wrapper, x, other args, kwargs) of each of adapter "a"'s `protocol` wrappers in one eval forward."""
    model.eval()
    chosen = [w for _, w in wrappers(model, protocol)]
    seen = wrapper_inputs(model, batch, chosen)
    return [(w, seen[id(w)][0][0], list(seen[id(w)][0][1:]), seen[id(w)][1]) for w in chosen]


def check_row_batchable(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """`row_terms()` rebuilds the wrapper's output: gain * base(x) + shift + scale * B A x."""
    with torch.no_grad():
        for w, x, rest, kwargs in calls(model, batch, cap.RowBatchable):
            a, b, scale, gain, shift = w.row_terms()
            expect = w.base(x, *rest, **kwargs)
            expect = expect if gain is None else expect * gain
            expect = (expect if shift is None else expect + shift) + scale * (x @ a.T @ b.T)
            torch.testing.assert_close(w(x, *rest, **kwargs), expect, rtol=1e-4, atol=1e-5)


def check_rank_settable(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """set_rank changes the output, is stored in the config, survives save/load; out of range raises."""
    model.eval()
    cfg = pk.adapters(model)["a"].config
    low, high = cfg.rank_range()
    assert low < high
    pk.set_rank(model, high, "a")
    at_high = run(model, batch)
    pk.set_rank(model, low, "a")
    at_low = run(model, batch)
    assert not torch.allclose(at_low, at_high)
    assert pk.adapters(model)["a"].config == cfg.at_rank(low)
    with pytest.raises(pk.ConfigError):
        pk.set_rank(model, high + 1, "a")
    torch.testing.assert_close(run(model, batch), at_low, rtol=0, atol=0)
    pk.save_adapter(model, tmp / "ranked", name="a")
    other = copy.deepcopy(base)
    pk.load_adapter(other, tmp / "ranked")
    torch.testing.assert_close(run(other.eval(), batch), at_low, rtol=0, atol=0)


def check_rank_range(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """`at_rank` accepts exactly the ranks of `rank_range()`."""
    cfg = pk.adapters(model)["a"].config
    low, high = cfg.rank_range()
    assert type(cfg.at_rank(low)) is type(cfg) and type(cfg.at_rank(high)) is type(cfg)
    for bad in (low - 1, high + 1):
        with pytest.raises(pk.ConfigError):
            cfg.at_rank(bad)


def check_expert_routed(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """After a forward every routed layer's expert shares sum to 1 (or less: capacity drops)."""
    with torch.no_grad():
        run(model, batch)
    load = pk.expert_load(model, "a", reset=True)
    assert load and len(load) == len(wrappers(model, cap.ExpertRouted))
    for shares in load.values():
        assert len(shares) >= 2 and abs(sum(shares) - 1.0) < 1e-6
    assert all(s == 0.0 for shares in pk.expert_load(model, "a").values() for s in shares)  # reset


def check_reports_metrics(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """A training forward gives finite numbers to the training log."""
    model.train()
    hooks = StepHooks(model)
    with torch.no_grad():
        run(model, batch)
    metrics = hooks.metrics()
    assert metrics and all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def check_step_hooked(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """With the step hooks called as the loop does, the delta still trains and the base does not."""
    model.train()
    hooks = StepHooks(model)
    assert len(hooks.steps) == len(wrappers(model, cap.StepHooked))
    params = pk.trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(params.values(), lr=0.5)
    hooks.on_step(0, 4)
    for step in range(1, 5):
        opt.zero_grad()
        run(model, batch).float().pow(2).mean().backward()
        opt.step()
        hooks.on_step(step, 4)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in params)
    assert any(not torch.equal(before[n], after[n]) for n in params)
    assert torch.isfinite(run(model, batch)).all()


def check_foldable(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """fold keeps the outputs, never adds parameters, and the folded adapter saves and loads."""
    model.eval()
    cfg = pk.adapters(model)["a"].config
    expected, size = run(model, batch), len(pk.trainable_parameters(model))
    pk.fold(model)
    assert pk.adapters(model)["a"].config == cfg.folded()
    assert len(pk.trainable_parameters(model)) <= size
    torch.testing.assert_close(run(model, batch), expected, rtol=1e-5, atol=1e-5)
    pk.save_adapter(model, tmp / "folded", name="a")
    other = copy.deepcopy(base)
    pk.load_adapter(other, tmp / "folded")
    torch.testing.assert_close(run(other.eval(), batch), run(model, batch), rtol=0, atol=0)


def check_foldable_config(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """`folded()` is a config of the same method and folding twice changes nothing more."""
    cfg = pk.adapters(model)["a"].config
    assert cfg.folded().method == cfg.method and cfg.folded().folded() == cfg.folded()


def check_merges_own_deltas(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """`merge_deltas()` names parameters of the innermost base (or a new bias) with their shapes."""
    for _, w in wrappers(model, cap.MergesOwnDeltas):
        inner = dict(innermost(w).named_parameters())
        deltas = w.merge_deltas()
        assert deltas
        for name, delta in deltas.items():
            assert name in inner or name == "bias"
            if name in inner:
                assert delta.shape == inner[name].shape
            assert torch.isfinite(delta).all()


def check_transforms_output(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """A LoRA stacked over a wrapper that transforms its base's output refuses to merge; else merges."""
    found = wrappers(model, cap.TransformsOutput)
    assert all(isinstance(w.transforms_output, bool) for _, w in found)
    for path, w in found:
        if not is_linear(innermost(w)):
            continue  # LoRA needs a linear base to stack over
        pk.attach(model, pk.LoraConfig(targets=[path]), name="b")
        if w.transforms_output:
            with pytest.raises(pk.AdapterStateError, match="transforms its base's output"):
                pk.merge(model, ["b"])
        else:
            pk.merge(model, ["b"])
        pk.detach(model, "b")


def check_input_scaled(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """With its scale set to 2, an input-scaled wrapper gives base(2x); an output-scaled one 2 * base(x)."""
    with torch.no_grad():
        for w, x, rest, kwargs in calls(model, batch, cap.InputScaled):
            for p in w.delta_parameters().values():
                p.fill_(2.0)
            expect = w.base(2 * x, *rest, **kwargs) if w.on_input else 2 * w.base(x, *rest, **kwargs)
            torch.testing.assert_close(w(x, *rest, **kwargs), expect, rtol=1e-5, atol=1e-5)


def _factor_delta_holds(w: Any, rank: int, scale_of: Callable[[Any], float]) -> None:
    """`load_factors` of random rank-`rank` factors gives the delta scale * b @ a exactly."""
    inp, out, transposed = linear_dims(innermost(w))
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)
    with torch.no_grad():
        w.load_factors(a, b, None)
    expect = scale_of(w) * b @ a
    torch.testing.assert_close(w.delta_weight(), expect.T if transposed else expect, rtol=1e-5, atol=1e-5)


def check_factor_loadable(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """A wrapper takes factors of a lower rank zero-padded: its delta is its scale * b @ a."""
    for _, w in wrappers(model, cap.FactorLoadable):
        a, b = w.trained_factors()
        assert isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and b.requires_grad
        _factor_delta_holds(w, 1, lambda w: w.lowrank()[2])
        assert a[1:].abs().max() == 0 and b[:, 1:].abs().max() == 0  # written into them, padded


def check_factor_target(base: nn.Module, model: nn.Module, batch: dict, tmp: Path) -> None:
    """`for_factors` makes an adapter at the same targets, scale 1, that holds any B @ A."""
    paths = sorted({p for p, _ in wrappers(model, cap.FactorLoadable)})
    cfg = type(pk.adapters(model)["a"].config).for_factors(2, paths, [], False)
    fresh = pk.attach(copy.deepcopy(base), cfg, name="f")
    built = [w for _, w in iter_deltas(fresh) if w.adapter_name == "f"]
    assert built and all(isinstance(w, cap.FactorLoadable) for w in built)
    for w in built:
        _factor_delta_holds(w, 2, lambda w: 1.0)


CHECKS: dict[type, Check] = {
    cap.Weighted: check_weighted, cap.LowRank: check_lowrank, cap.RowBatchable: check_row_batchable, cap.RankSettable: check_rank_settable,
    cap.RankRange: check_rank_range, cap.ExpertRouted: check_expert_routed,
    cap.ReportsMetrics: check_reports_metrics, cap.StepHooked: check_step_hooked,
    cap.Foldable: check_foldable, cap.FoldableConfig: check_foldable_config,
    cap.MergesOwnDeltas: check_merges_own_deltas, cap.TransformsOutput: check_transforms_output,
    cap.InputScaled: check_input_scaled, cap.FactorLoadable: check_factor_loadable,
    cap.FactorTarget: check_factor_target,
}
