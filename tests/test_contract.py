"""The contract table: every registered method x toy model runs through the same properties.

A new method passes by adding a row to CASES — no per-method `if` in any test below.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import petkit as pk
from capability_checks import CHECKS
from petkit.core import capabilities as cap
from petkit.core.delta import DeltaModule, iter_deltas
from toys import TOYS, inputs, perturb, run


@dataclass(frozen=True)
class Case:
    method: str
    toy: str
    kwargs: dict[str, Any]
    identity: bool  # identity at initialisation (the paper's init)
    mergeable: bool

    @property
    def id(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.method}[{extra}]-{self.toy}" if extra else f"{self.method}-{self.toy}"


CASES = [
    Case("lora", "mlp", {}, True, True),
    Case("lora", "llama", {}, True, True),
    Case("lora", "gpt2", {"rslora": True, "bias": "lora_only"}, True, True),
    Case("lora", "bert", {"targets": "all-linear", "dropout": 0.1}, True, True),
    Case("lora", "llama", {"init": "pissa"}, True, True),
    Case("lora", "gpt2", {"init": "olora", "dropout": 0.1}, True, True),
    Case("adapter", "mlp", {}, True, False),
    Case("adapter", "llama", {}, True, False),
    Case("adapter", "gpt2", {"variant": "parallel"}, True, False),
    Case("adapter", "bert", {}, True, False),
    Case("adapter", "llama", {"variant": "pfeiffer", "activation": "gelu"}, True, False),
    Case("adapter", "bert", {"variant": "parallel", "reduction_factor": 4, "activation": "tanh"}, True, False),
    Case("prompt", "llama", {"num_virtual_tokens": 4}, False, False),
    Case("prompt", "gpt2", {"num_virtual_tokens": 3, "init": "random"}, False, False),
    Case("prompt", "bert", {"num_virtual_tokens": 2}, False, False),
    Case("prefix", "llama", {"num_virtual_tokens": 3}, False, False),
    Case("prefix", "gpt2", {"num_virtual_tokens": 2, "projection_dim": 8, "init": "random"}, False, False),
    Case("prefix", "bert", {"num_virtual_tokens": 2}, False, False),
    Case("prefix", "llama", {"num_virtual_tokens": 2, "positions": "after_prefix"}, False, False),  # PEFT's
    Case("adaptive-prefix", "llama", {"num_virtual_tokens": 3, "projection_dim": 4}, False, False),
    Case("adaptive-prefix", "gpt2", {"num_virtual_tokens": 2}, False, False),
    Case("adaptive-prefix", "bert", {"num_virtual_tokens": 2, "init": "random"}, False, False),
    Case("prefix-propagation", "llama", {"num_virtual_tokens": 3}, False, False),
    Case("prefix-propagation", "gpt2", {"num_virtual_tokens": 2, "init": "random"}, False, False),
    Case("prefix-propagation", "bert", {"num_virtual_tokens": 2}, False, False),
    Case("bitfit", "mlp", {}, True, True),
    Case("bitfit", "llama", {}, True, True),
    Case("bitfit", "gpt2", {}, True, True),
    Case("bitfit", "bert", {}, True, True),
    Case("ia3", "mlp", {"targets": ["fc1"], "feedforward_targets": ["fc2"]}, True, True),
    Case("ia3", "llama", {}, True, True),
    Case("ia3", "gpt2", {}, True, True),
    Case("ia3", "bert", {}, True, True),
    Case("ln-tuning", "mlp", {}, True, True),
    Case("ln-tuning", "llama", {}, True, True),
    Case("ln-tuning", "gpt2", {"bias": False}, True, True),
    Case("ln-tuning", "bert", {}, True, True),
    Case("residual-prompt", "llama", {"num_virtual_tokens": 3}, False, False),
    Case("residual-prompt", "gpt2", {"num_virtual_tokens": 2, "init": "random", "layer_norm": False}, False, False),
    Case("residual-prompt", "bert", {"num_virtual_tokens": 2, "bottleneck": 8}, False, False),
    Case("late-prompt", "llama", {"num_virtual_tokens": 3}, False, False),
    Case("late-prompt", "gpt2", {"num_virtual_tokens": 2, "pooling": "max"}, False, False),
    Case("late-prompt", "bert", {"num_virtual_tokens": 2, "layer": 1}, False, False),
    Case("dora", "mlp", {}, True, True),
    Case("dora", "llama", {}, True, True),
    Case("dora", "gpt2", {"rslora": True}, True, True),
    Case("dora", "bert", {"targets": "all-linear", "dropout": 0.1}, True, True),
    Case("dylora", "mlp", {"r": 4}, True, True),
    Case("dylora", "llama", {"r": 4, "min_rank": 2, "eval_rank": 3}, True, True),
    Case("dylora", "gpt2", {"update": "last"}, True, True),
    Case("dylora", "bert", {"targets": "all-linear", "dropout": 0.1}, True, True),
    Case("krona", "mlp", {"a_out": 2, "a_in": 4}, True, True),
    Case("krona", "llama", {}, True, True),
    Case("krona", "gpt2", {"scale": 2.0}, True, True),
    Case("krona", "bert", {"targets": "all-linear"}, True, True),
    Case("cola", "mlp", {"r": 2, "links": 2}, True, True),
    Case("cola", "llama", {}, True, True),
    Case("cola", "gpt2", {"links": 2, "link_steps": 5}, True, True),
    Case("cola", "bert", {"targets": "all-linear", "dropout": 0.1}, True, True),
    Case("sira", "mlp", {}, True, False),
    Case("sira", "llama", {"layer_experts": [2, 3], "top_k": 1}, True, False),
    Case("sira", "gpt2", {"capacity_factor": None, "expert_dropout": 0.1}, True, False),
    Case("sira", "bert", {"num_experts": 3, "top_k": 3}, True, False),
    Case("vpt", "vit", {"num_virtual_tokens": 3}, False, False),
    Case("vpt", "vit", {"num_virtual_tokens": 2, "deep": True, "dropout": 0.1}, False, False),
    Case("lora", "vit", {}, True, True),
    Case("dora", "vit", {}, True, True),
    Case("adapter", "vit", {}, True, False),
    Case("ia3", "vit", {}, True, True),
    Case("bitfit", "vit", {}, True, True),
    Case("ln-tuning", "vit", {}, True, True),
    Case("late-prompt", "vit", {"num_virtual_tokens": 2, "layer": 1}, False, False),
    Case("dylora", "vit", {"r": 4}, True, True),
    Case("krona", "vit", {}, True, True),
    Case("cola", "vit", {}, True, True),
    Case("sira", "vit", {}, True, False),
    Case("peqa", "vit", {}, False, True),
    Case("vera", "vit", {"r": 4}, True, True),
    Case("oft", "vit", {"block_size": 8}, True, True),
    Case("hra", "vit", {}, False, True),
    Case("hira", "vit", {}, True, True),
    Case("shira", "vit", {"r": 2}, True, True),
    Case("loha", "vit", {}, True, True),
    Case("lokr", "vit", {}, True, True),
    Case("adalora", "vit", {}, True, True),
    Case("peqa", "mlp", {}, False, True),  # init = the RTN-quantised base (tests/methods/test_peqa.py)
    Case("peqa", "llama", {"bits": 3, "group_size": 8}, False, True),
    Case("peqa", "gpt2", {"group_size": 16}, False, True),
    Case("peqa", "bert", {"bits": 4}, False, True),
    Case("loha", "mlp", {"r": 2}, True, True),
    Case("loha", "llama", {}, True, True),
    Case("loha", "gpt2", {"r": 4, "alpha": 2.0}, True, True),
    Case("loha", "bert", {"targets": "all-linear"}, True, True),
    Case("lokr", "mlp", {"r": 2, "decompose_both": True}, True, True),
    Case("lokr", "llama", {}, True, True),
    Case("lokr", "gpt2", {"r": 1, "factor": 4}, True, True),
    Case("lokr", "bert", {"targets": "all-linear"}, True, True),
    Case("hira", "mlp", {"r": 2}, True, True),
    Case("hira", "llama", {}, True, True),
    Case("hira", "gpt2", {"dropout": 0.1}, True, True),
    Case("hira", "bert", {"targets": "all-linear"}, True, True),
    Case("shira", "mlp", {"r": 2}, True, True),
    Case("shira", "llama", {"r": 4}, True, True),
    Case("shira", "gpt2", {"r": 2, "random_seed": 3}, True, True),
    Case("shira", "bert", {"r": 2, "targets": "all-linear"}, True, True),
    Case("vera", "mlp", {"r": 4}, True, True),
    Case("vera", "llama", {"r": 16}, True, True),  # a file with r above the widths is refused (adapter_check)
    Case("vera", "gpt2", {"r": 8, "dropout": 0.1, "d_initial": 0.5}, True, True),
    Case("vera", "bert", {"r": 32, "targets": "all-linear", "projection_prng_key": 7}, True, True),
    Case("oft", "mlp", {"block_size": 4, "targets": ["fc2", "out"]}, True, True),
    Case("oft", "llama", {"block_size": 8}, True, True),
    Case("oft", "gpt2", {"block_size": 16, "block_share": True, "neumann_terms": 0}, True, True),
    Case("oft", "bert", {"block_size": 4, "targets": "all-linear"}, True, True),
    Case("boft", "llama", {"block_size": 4, "butterfly_factor": 2}, True, True),
    Case("boft", "gpt2", {"block_size": 8}, True, True),
    Case("boft", "vit", {"block_size": 4}, True, True),
    # HRA's identity init is a product of pairs of equal reflections: I up to rounding (test_hra.py)
    Case("hra", "mlp", {"r": 2}, False, True),
    Case("hra", "llama", {}, False, True),
    Case("hra", "gpt2", {"r": 3}, False, True),
    Case("hra", "bert", {"r": 4, "apply_gs": True, "targets": "all-linear"}, False, True),
    Case("trainable-tokens", "llama", {"token_indices": [3, 5, 7]}, True, True),
    Case("trainable-tokens", "gpt2", {"token_indices": [4, 9]}, True, True),  # tied head
    Case("trainable-tokens", "bert", {"token_indices": [10]}, True, True),
    # MoE experts as 3-D parameters (PEFT's target_parameters; the router as modules_to_save: test_moe.py)
    Case("lora", "mixtral", {"targets": ["q_proj", "v_proj"],
                             "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}, True, True),
    Case("lora", "qwen2_moe", {"targets": ["o_proj"], "target_parameters": ["experts.down_proj"],
                               "experts": [0, 2], "rslora": True}, True, True),
    # Lily: not mergeable (the mix of the shared B's depends on the batch)
    Case("lily", "mlp", {"r": 2}, True, False),
    Case("lily", "llama", {"r": 4, "stride_A": 2, "num_B": 3}, True, False),
    Case("lily", "gpt2", {"r": 4, "scaling": 0.5}, True, False),
    Case("lily", "bert", {"r": 4, "targets": "all-linear", "stride_A": 2}, True, False),
    Case("lily", "vit", {"r": 4}, True, False),
    Case("adalora", "mlp", {"init_r": 4, "target_r": 2}, True, True),
    Case("adalora", "llama", {}, True, True),
    Case("adalora", "gpt2", {"tinit": 1, "tfinal": 1, "delta_t": 2, "dropout": 0.1}, True, True),
    Case("adalora", "bert", {"targets": "all-linear", "init_r": 6, "target_r": 3}, True, True),
]
ids = [c.id for c in CASES]


CLAIMS = [(c, p) for c in CASES for p in pk.get_method(c.method).config_cls.capabilities]


def test_every_registered_method_has_a_row():
    assert {m for m, *_ in pk.list_methods()} <= {c.method for c in CASES}


def fresh(case: Case, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    base = TOYS[case.toy](seed)
    model = copy.deepcopy(base)
    pk.attach(model, pk.make_config(case.method, **case.kwargs), name="a")
    return base, model, inputs(case.toy)


def trained(case: Case, seed: int = 0):
    base, model, batch = fresh(case, seed)
    perturb(pk.trainable_parameters(model), seed=seed + 10)
    return base, model, batch


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    deltas = {id(p) for m in model.modules() if isinstance(m, DeltaModule) for p in m.delta_parameters().values()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in deltas}


@pytest.mark.parametrize("case", [c for c in CASES if c.identity], ids=[c.id for c in CASES if c.identity])
def test_identity_at_init(case):
    base, model, batch = fresh(case)
    torch.testing.assert_close(run(model, batch), run(base, batch), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_only_the_delta_trains(case):
    _, model, batch = fresh(case)
    model.train()
    params = pk.trainable_parameters(model)
    assert params and all(p.requires_grad for p in params.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in params)
    before_base, before_delta = base_state(model), {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        run(model, batch).float().pow(2).mean().backward()
        opt.step()
    after = base_state(model)
    assert all(torch.equal(before_base[n], after[n]) for n in before_base)
    assert any(not torch.equal(before_delta[n], p) for n, p in params.items())


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_delta_changes_output_and_disabled_gives_base_exactly(case):
    base, model, batch = trained(case)
    expected = run(base, batch)
    assert not torch.allclose(run(model, batch), expected)
    with pk.disabled(model):
        torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(run(model, batch), expected)  # restored after


@pytest.mark.parametrize("case", [c for c in CASES if c.mergeable], ids=[c.id for c in CASES if c.mergeable])
def test_merge_equals_unmerged_and_unmerge_restores(case):
    base, model, batch = trained(case)
    model.eval()
    unmerged = run(model, batch)
    weights = base_state(model)
    pk.merge(model)
    torch.testing.assert_close(run(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    pk.merge(model)  # second merge is a no-op
    torch.testing.assert_close(run(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    with pk.disabled(model):
        torch.testing.assert_close(run(model, batch), run(base, batch), rtol=1e-5, atol=1e-5)
    pk.unmerge(model)
    after = base_state(model)
    assert weights.keys() == after.keys()
    assert all(torch.allclose(weights[n], after[n], atol=1e-6) for n in weights)
    torch.testing.assert_close(run(model, batch), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if not c.mergeable], ids=[c.id for c in CASES if not c.mergeable])
def test_merge_of_unmergeable_method_raises_and_changes_nothing(case):
    _, model, batch = trained(case)
    out = run(model, batch)
    with pytest.raises(pk.AdapterStateError, match="not mergeable"):
        pk.merge(model)
    torch.testing.assert_close(run(model, batch), out, rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.mergeable], ids=[c.id for c in CASES if c.mergeable])
def test_merge_with_nan_raises_and_changes_nothing(case):
    _, model, batch = trained(case)
    out = run(model, batch)
    with torch.no_grad():
        next(iter(pk.trainable_parameters(model).values())).view(-1)[0] = float("nan")
    weights = base_state(model)
    with pytest.raises(pk.AdapterStateError, match="NaN"):
        pk.merge(model)
    after = base_state(model)
    assert all(torch.equal(weights[n], after[n]) for n in weights)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_a_seeded_attach_draws_the_same_delta_whatever_ran_before(case):
    """attach(seed=...): the initial delta depends on the seed only, and the caller's random
    state is untouched (arms trained one after another in a process start alike)."""
    base = TOYS[case.toy](0)
    deltas = []
    for draws_before in (0, 7):
        torch.manual_seed(draws_before)
        torch.rand(draws_before)
        state = torch.random.get_rng_state()
        model = pk.attach(copy.deepcopy(base), pk.make_config(case.method, **case.kwargs), seed=3)
        assert torch.equal(torch.random.get_rng_state(), state)
        deltas.append({n: p.detach().clone() for n, p in pk.trainable_parameters(model).items()})
    assert deltas[0].keys() == deltas[1].keys()
    assert all(torch.equal(deltas[0][n], deltas[1][n]) for n in deltas[0])
    # a method whose init is random at all (global generator, or its config's own `seed`, as
    # prompt tokens drawn from the vocabulary) takes that randomness from attach's seed
    config = pk.make_config(case.method, **case.kwargs)
    unseeded = []
    for state in (1, 2):
        torch.manual_seed(state)
        unseeded.append(pk.trainable_parameters(pk.attach(copy.deepcopy(base), config)))
    random_init = any(not torch.equal(unseeded[0][n], unseeded[1][n]) for n in unseeded[0])
    if random_init or "seed" in {f.name for f in dataclasses.fields(config)}:
        other = pk.trainable_parameters(pk.attach(copy.deepcopy(base), config, seed=4))
        assert any(not torch.equal(other[n], deltas[0][n]) for n in other), "seed ignored"
    with pytest.raises(pk.ConfigError, match="seed"):
        pk.attach(copy.deepcopy(base), pk.make_config(case.method, **case.kwargs), seed=-1)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_save_load_round_trip_is_exact(case, tmp_path):
    base, model, batch = trained(case)
    expected = run(model, batch)
    pk.save_adapter(model, tmp_path / "ad", name="a")
    other = copy.deepcopy(base)
    pk.load_adapter(other, tmp_path / "ad")
    assert pk.active_adapters(other) == ["a"]
    torch.testing.assert_close(run(other, batch), expected, rtol=0, atol=0)
    assert not pk.trainable_parameters(other)  # loaded frozen by default
    pk.detach(other, "a")
    pk.load_adapter(other, tmp_path / "ad", name="again", trainable=True)
    assert pk.trainable_parameters(other)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_several_adapters_switch_exactly(case):
    base, model, batch = trained(case, seed=0)
    only_a = run(model, batch)
    pk.attach(model, pk.make_config(case.method, **case.kwargs), name="b")
    perturb(pk.trainable_parameters(model), seed=99)
    only_b = run(model, batch)
    assert not torch.allclose(only_a, only_b)
    pk.activate(model, "a")
    torch.testing.assert_close(run(model, batch), only_a, rtol=0, atol=0)
    pk.activate(model, ["a", "b"])  # stacked: differs from each alone
    both = run(model, batch)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    pk.detach(model, "a")
    assert pk.active_adapters(model) == ["b"]
    torch.testing.assert_close(run(model, batch), only_b, rtol=0, atol=0)
    pk.detach(model, "b")
    torch.testing.assert_close(run(model, batch), run(base, batch), rtol=0, atol=0)
    assert not any(isinstance(m, DeltaModule) for m in model.modules())


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_unload_leaves_no_petkit_modules(case):
    base, model, batch = trained(case)
    merge = case.mergeable
    expected = run(model, batch) if merge else run(base, batch)
    plain = pk.unload(model, merge=merge)
    assert not any(isinstance(m, DeltaModule) for m in plain.modules())
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    torch.testing.assert_close(run(plain, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_user_mistakes_raise_and_leave_model_unchanged(case):
    _, model, batch = trained(case)
    out = run(model, batch)
    cfg = pk.make_config(case.method, **case.kwargs)
    with pytest.raises(pk.AdapterStateError, match="already attached"):
        pk.attach(model, cfg, name="a")
    with pytest.raises(pk.AdapterStateError, match="unknown adapter"):
        pk.activate(model, ["a", "nope"])
    with pytest.raises(pk.AdapterStateError, match="unknown adapter"):
        pk.detach(model, "nope")
    with pytest.raises(pk.ConfigError, match="unknown method"):
        pk.make_config(case.method + "x")
    with pytest.raises(pk.ConfigError, match="no field"):
        pk.make_config(case.method, not_a_field=1)
    assert pk.active_adapters(model) == ["a"]
    torch.testing.assert_close(run(model, batch), out, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_config_round_trips_through_json(case):
    import json

    cfg = pk.make_config(case.method, **case.kwargs)
    again = pk.core.registry.config_from_json(json.loads(cfg.to_json()))
    assert again == cfg


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_declared_capabilities_are_what_the_wrappers_and_config_satisfy(case):
    _, model, _ = fresh(case)
    cfg = pk.adapters(model)["a"].config
    found = {p for p in cap.WRAPPER_CAPABILITIES if any(isinstance(w, p) for _, w in iter_deltas(model))}
    found |= {p for p in cap.CONFIG_CAPABILITIES if isinstance(cfg, p)}
    assert set(type(cfg).capabilities) == found
    assert all(case.method in cap.capable(p) for p in found)


@pytest.mark.parametrize("case,protocol", CLAIMS, ids=[f"{c.id}-{p.__name__}" for c, p in CLAIMS])
def test_each_claimed_capability_behaves(case, protocol, tmp_path):
    base, model, batch = trained(case)
    CHECKS[protocol](base, model, batch, tmp_path)
