"""DyLoRA numerics: h = W0 x + (alpha / b) B[:, :b] A[:b] x at the chosen or sampled rank b."""
import copy

import pytest
import torch

import petkit as pk
from toys import One, inputs, llama, perturb, run


def closed_form(m, w0, b0, x, b):
    w = m.proj
    return x @ w0.T + b0 + (w.alpha / b) * (x @ w.lora_A[:b].T @ w.lora_B[:, :b].T)


def attached(**kw):
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.DyLoraConfig(targets=["proj"], **kw))
    perturb(pk.trainable_parameters(m), scale=0.3)
    return m.eval(), w0, b0


def test_every_rank_in_the_range_is_the_closed_form_and_set_rank_needs_no_retraining():
    m, w0, b0 = attached(r=4, min_rank=1, alpha=8.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), closed_form(m, w0, b0, x, 4).detach())  # eval_rank None: r
    for b in (1, 2, 3, 4):
        pk.set_rank(m, b)
        torch.testing.assert_close(m(x), closed_form(m, w0, b0, x, b).detach())
        torch.testing.assert_close(m.proj.delta_weight() + w0, w0 + (8.0 / b) * (m.proj.lora_B[:, :b] @ m.proj.lora_A[:b]).detach())
    assert pk.adapters(m)["default"].config.eval_rank == 4


def test_set_rank_checks_its_range_and_method():
    m, _, _ = attached(r=4, min_rank=2)
    x = torch.randn(2, 6)
    out = m(x)
    with pytest.raises(pk.ConfigError, match=r"eval_rank must be >= 2"):
        pk.set_rank(m, 1)
    with pytest.raises(pk.ConfigError, match=r"eval_rank must be <= 4"):
        pk.set_rank(m, 5)
    torch.testing.assert_close(m(x), out, rtol=0, atol=0)
    lora = One()
    pk.attach(lora, pk.LoraConfig(targets=["proj"]))
    with pytest.raises(pk.ConfigError, match="fixed rank"):
        pk.set_rank(lora, 2)


def test_training_samples_one_rank_per_forward_over_the_whole_range():
    m = llama()
    pk.attach(m, pk.DyLoraConfig(r=4, min_rank=2))
    wrappers = [w for w in m.modules() if type(w).__name__ == "DyLoraLinear"]
    m.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        run(m, inputs("llama"))
        ranks = {w.train_rank for w in wrappers}
        assert len(ranks) == 1  # one rank for the whole model per forward
        seen |= ranks
    assert seen == {2, 3, 4}


def test_frozen_mode_updates_only_row_b():
    m, w0, b0 = attached(r=4, update="last")
    m.train()
    m._forward_pre_hooks.clear()  # no sampler: pin the rank as it would set it
    m.proj.train_rank = 3
    m(torch.randn(5, 6)).pow(2).sum().backward()
    ga, gb = m.proj.lora_A.grad, m.proj.lora_B.grad
    assert torch.count_nonzero(ga[[0, 1, 3]]) == 0 and torch.count_nonzero(ga[2]) > 0
    assert torch.count_nonzero(gb[:, [0, 1, 3]]) == 0 and torch.count_nonzero(gb[:, 2]) > 0


def test_saved_at_a_rank_loads_at_that_rank_and_exports_as_a_plain_lora(tmp_path):
    base = llama()
    m, batch = copy.deepcopy(base), inputs("llama")
    pk.attach(m, pk.DyLoraConfig(r=4))
    perturb(pk.trainable_parameters(m))
    pk.set_rank(m, 2)
    at2 = run(m, batch)
    pk.save_adapter(m, tmp_path / "dy")
    other = copy.deepcopy(base)
    pk.load_adapter(other, tmp_path / "dy")
    torch.testing.assert_close(run(other, batch), at2, rtol=0, atol=0)
    pk.merge_adapters(m, ["default"], how="cat", name="lora2")  # rank-2 LoRA of the same delta
    assert pk.adapters(m)["lora2"].config.r == 2
    torch.testing.assert_close(run(m, batch), at2, rtol=1e-5, atol=1e-5)


def test_a_frozen_dylora_keeps_its_rank_in_training_mode():
    m, w0, b0 = attached(r=4, alpha=8.0)
    pk.set_rank(m, 2)
    pk.set_trainable(m, "default", False)
    m.train()
    x = torch.randn(3, 6)
    for _ in range(5):
        torch.testing.assert_close(m(x), closed_form(m, w0, b0, x, 2).detach())
