"""Composition: stacking weights, weighted merges into a new adapter, hot-swap."""
import copy

import pytest
import torch

import petkit as pk
from petkit.core.adapter_merge import dare, svd_factors, ties
from toys import One, bert_cls, inputs, llama, perturb, run


def two(make=One, cfg_a=None, cfg_b=None):
    m = make()
    pk.attach(m, cfg_a or pk.LoraConfig(r=2, targets=["proj"]), name="a")
    perturb(pk.trainable_parameters(m), seed=1, scale=0.3)
    pk.attach(m, cfg_b or pk.LoraConfig(r=3, alpha=6.0, targets=["proj"]), name="b")
    perturb(pk.trainable_parameters(m), seed=2, scale=0.3)
    return m.eval()


def dw(m, name):
    """The (out, in) weight change of adapter `name` on One.proj."""
    w = next(w for _, w in pk.core.delta.iter_deltas(m) if w.adapter_name == name)
    return w.delta_weight()


# --- stacking weights -------------------------------------------------------------------------

def test_weighted_stack_is_the_weighted_sum_of_deltas_and_merges_to_it():
    m, x = two(), torch.randn(4, 6)
    w0, b0 = m.proj.base.base.weight.detach().clone(), m.proj.base.base.bias.detach()
    da, db = dw(m, "a"), dw(m, "b")
    pk.activate(m, ["a", "b"], weights=[1.0, 0.5])
    assert pk.adapter_weights(m) == {"a": 1.0, "b": 0.5}
    expected = x @ (w0 + da + 0.5 * db).T + b0
    torch.testing.assert_close(m(x), expected)
    pk.merge(m)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(pk.AdapterStateError, match="unmerge it before changing its weight"):
        pk.activate(m, ["a", "b"], weights=[1.0, 2.0])
    pk.unmerge(m)
    torch.testing.assert_close(m.proj.base.base.weight.detach(), w0, atol=1e-6, rtol=0)
    pk.detach(m, "a")  # the others keep their weights
    assert pk.adapter_weights(m) == {"b": 0.5}


@pytest.mark.parametrize("weights,match", [([1.0], "must be 2 finite numbers"),
                                           ([1.0, float("nan")], "must be 2 finite numbers"),
                                           ([1.0, "x"], "must be 2 finite numbers")])
def test_bad_weights_raise_and_change_nothing(weights, match):
    m, x = two(), torch.randn(2, 6)
    out = m(x)
    with pytest.raises(pk.ConfigError, match=match):
        pk.activate(m, ["a", "b"], weights=weights)
    assert pk.active_adapters(m) == ["b"] and pk.adapter_weights(m) == {"a": 1.0, "b": 1.0}
    torch.testing.assert_close(m(x), out, rtol=0, atol=0)


def test_methods_without_a_weight_knob_refuse_a_weight():
    m = llama()
    pk.attach(m, pk.AdapterConfig(), name="ad")
    pk.activate(m, ["ad"], weights=[1.0])  # 1.0 is always fine
    with pytest.raises(pk.ConfigError, match="cannot be weighted"):
        pk.activate(m, ["ad"], weights=[0.5])


# --- weighted merges into a new adapter -----------------------------------------------------------

def snapshot(m, names):
    return {n: {k: v.detach().clone() for k, v in pk.adapter_state(m, n).items()} for n in names}


def test_cat_is_exact_and_leaves_the_inputs_untouched():
    m, x = two(), torch.randn(4, 6)
    before = snapshot(m, ["a", "b"])
    pk.activate(m, ["a", "b"], weights=[0.7, -1.2])
    stacked = m(x)
    pk.merge_adapters(m, ["a", "b"], [0.7, -1.2], how="cat", name="ab")
    assert pk.active_adapters(m) == ["ab"] and pk.adapters(m)["ab"].config.r == 5
    torch.testing.assert_close(m(x), stacked, rtol=1e-5, atol=1e-6)
    after = snapshot(m, ["a", "b"])
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])
    assert pk.adapter_weights(m)["b"] == -1.2  # the inputs' own weights are kept too


def test_svd_is_the_best_rank_r_approximation():
    m = two()
    target = 0.5 * dw(m, "a") + 2.0 * dw(m, "b")
    pk.merge_adapters(m, ["a", "b"], [0.5, 2.0], how="svd", r=2, name="s2")
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young
    torch.testing.assert_close(dw(m, "s2"), best, rtol=1e-4, atol=1e-5)
    pk.merge_adapters(m, ["a", "b"], [0.5, 2.0], how="svd", r=5, name="s5")  # full rank: exact
    torch.testing.assert_close(dw(m, "s5"), target, rtol=1e-4, atol=1e-5)


def test_linear_is_the_factor_wise_weighted_sum():
    m = two(cfg_b=pk.LoraConfig(r=2, alpha=8.0, targets=["proj"]))
    wa, wb = m.proj.base, m.proj
    pk.merge_adapters(m, ["a", "b"], [0.25, 4.0], how="linear", name="lin")
    ca, cb = (0.25 * wa.scaling) ** 0.5, (4.0 * wb.scaling) ** 0.5
    a = ca * wa.lora_A + cb * wb.lora_A
    b = ca * wa.lora_B + cb * wb.lora_B
    torch.testing.assert_close(dw(m, "lin"), (b @ a).detach())


def test_ties_and_dare_reference_numbers():
    d = torch.tensor([[[3.0, -1.0, 0.2, 2.0]], [[-2.0, 4.0, 0.1, 1.0]]])
    # density 0.5 keeps the two largest of each: [3, 0, 0, 2] and [-2, 4, 0, 0]; signs of the sum
    # [+, +, 0 -> +, +]; agreeing weighted entries averaged: [3w0, 4w1, 0, 2w0]
    torch.testing.assert_close(ties(d, [1.0, 0.5], 0.5), torch.tensor([[3.0, 2.0, 0.0, 2.0]]))
    g = torch.Generator().manual_seed(0)
    full = torch.randn(200, 50)
    dropped = dare(full, 0.3, g)
    kept = dropped != 0
    assert 0.25 < kept.float().mean() < 0.35
    torch.testing.assert_close(dropped[kept], full[kept] / 0.3)
    torch.testing.assert_close(dare(full, 1.0, g), full)
    a, b = svd_factors(full, 50)
    torch.testing.assert_close(b @ a, full, rtol=1e-4, atol=1e-4)


def test_ties_and_dare_merge_any_weight_change_into_a_lora():
    m = two(cfg_b=pk.DoraConfig(r=2, targets=["proj"]))
    target = dw(m, "a") + dw(m, "b")
    pk.merge_adapters(m, ["a", "b"], how="dare", density=1.0, r=5, name="d")  # density 1: no drop
    torch.testing.assert_close(dw(m, "d"), target, rtol=1e-4, atol=1e-5)
    pk.merge_adapters(m, ["a", "b"], how="ties", density=0.5, r=5, name="t", seed=3)
    assert pk.adapters(m)["t"].config.method == "lora"
    with pytest.raises(pk.ConfigError, match="needs low-rank inputs"):
        pk.merge_adapters(m, ["a", "b"], how="cat", name="c")


def test_merge_adapters_errors_change_nothing():
    m = two()
    with pytest.raises(pk.ConfigError, match="how must be one of"):
        pk.merge_adapters(m, ["a", "b"], how="mean")
    with pytest.raises(pk.AdapterStateError, match="already attached"):
        pk.merge_adapters(m, ["a"], name="b")
    with pytest.raises(pk.AdapterStateError, match="unknown adapter"):
        pk.merge_adapters(m, ["a", "zz"])
    with pytest.raises(pk.ConfigError, match="r is the target rank"):
        pk.merge_adapters(m, ["a", "b"], how="cat", r=2)
    with pytest.raises(pk.ConfigError, match="one rank"):
        pk.merge_adapters(m, ["a", "b"], how="linear")
    pk.attach(m, pk.AdapterConfig(targets=["proj"]), name="ad")
    with pytest.raises(pk.ConfigError, match="not a weight change"):
        pk.merge_adapters(m, ["a", "ad"], how="svd")
    assert set(pk.adapters(m)) == {"a", "b", "ad"}


def test_trained_heads_are_combined_too():
    m, batch = bert_cls(), inputs("bert")
    for name, seed in (("a", 1), ("b", 2)):
        pk.attach(m, pk.LoraConfig(r=2, modules_to_save=["classifier"]), name=name)
        perturb(pk.trainable_parameters(m), seed=seed)
    copies = {n: w.copy.weight.detach() for _, w in pk.core.delta.iter_deltas(m) if hasattr(w, "copy")
              for n in [w.adapter_name]}
    head = m.classifier
    while hasattr(head, "base"):
        head = head.base
    pk.merge_adapters(m, ["a", "b"], [0.5, 0.5], how="cat", name="ab")
    new = next(w for _, w in pk.core.delta.iter_deltas(m) if w.adapter_name == "ab" and hasattr(w, "copy"))
    expected = head.weight + 0.5 * (copies["a"] - head.weight) + 0.5 * (copies["b"] - head.weight)
    torch.testing.assert_close(new.copy.weight.detach(), expected.detach())


# --- hot-swap ---------------------------------------------------------------------------------

def test_hot_swap_from_a_folder_and_a_state_dict_keeps_the_modules(tmp_path):
    base, batch = llama(), inputs("llama")
    src = copy.deepcopy(base)
    pk.attach(src, pk.LoraConfig(r=4))
    perturb(pk.trainable_parameters(src), seed=5)
    expected = run(src, batch)
    pk.save_adapter(src, tmp_path / "other")
    m = copy.deepcopy(base)
    pk.attach(m, pk.LoraConfig(r=4))
    params = {k: id(v) for k, v in pk.adapter_state(m, "default").items()}
    pk.swap_adapter(m, "default", tmp_path / "other")
    torch.testing.assert_close(run(m, batch), expected, rtol=0, atol=0)
    assert {k: id(v) for k, v in pk.adapter_state(m, "default").items()} == params
    pk.swap_adapter(m, "default", {k: torch.zeros_like(v) for k, v in pk.adapter_state(src, "default").items()})
    torch.testing.assert_close(run(m, batch), run(base, batch), rtol=0, atol=0)


def test_hot_swap_is_checked_like_load_adapter(tmp_path):
    base, batch = llama(), inputs("llama")
    other = copy.deepcopy(base)
    pk.attach(other, pk.LoraConfig(r=2))
    pk.save_adapter(other, tmp_path / "r2")
    m = copy.deepcopy(base)
    pk.attach(m, pk.LoraConfig(r=4))
    perturb(pk.trainable_parameters(m))
    out = run(m, batch)
    with pytest.raises(pk.AdapterLoadError, match=r"another config .*\['r'\]"):
        pk.swap_adapter(m, "default", tmp_path / "r2")
    state = {k: v.detach().clone() for k, v in pk.adapter_state(m, "default").items()}
    key = next(iter(state))
    with pytest.raises(pk.AdapterLoadError, match="has shape"):
        pk.swap_adapter(m, "default", {**state, key: torch.zeros(3, 3)})
    with pytest.raises(pk.AdapterLoadError, match="missing"):
        pk.swap_adapter(m, "default", {k: v for k, v in state.items() if k != key})
    pk.save_adapter(m, tmp_path / "r4")
    (tmp_path / "r4" / "adapter.safetensors").write_bytes(b"broken")
    with pytest.raises(pk.AdapterLoadError, match="not a safetensors file"):
        pk.swap_adapter(m, "default", tmp_path / "r4")
    pk.merge(m)
    with pytest.raises(pk.AdapterStateError, match="unmerge it before swapping"):
        pk.swap_adapter(m, "default", state)
    pk.unmerge(m)
    torch.testing.assert_close(run(m, batch), out, rtol=1e-5, atol=1e-6)
