"""KronA numerics: h = W0 x + s (A (x) B) x, computed without building A (x) B."""
import pytest
import torch
from torch import nn

import petkit as pk
from toys import gpt2, inputs, perturb, run


class One(nn.Module):
    def __init__(self, fan_in=8, fan_out=6):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(fan_in, fan_out)

    def forward(self, x):
        return self.proj(x)


def test_forward_is_the_kronecker_closed_form_with_configured_factor_shapes():
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.KronaConfig(a_out=3, a_in=2, scale=1.5, targets=["proj"]))
    a, b = m.proj.krona_A, m.proj.krona_B
    assert a.shape == (3, 2) and b.shape == (2, 4) and torch.count_nonzero(b) == 0
    perturb(pk.trainable_parameters(m), scale=0.5)
    x = torch.randn(2, 3, 8)
    expected = x @ (w0 + 1.5 * torch.kron(a, b)).T + b0
    torch.testing.assert_close(m(x), expected.detach())
    torch.testing.assert_close(m.proj.delta_weight(), 1.5 * torch.kron(a, b).detach())


def test_default_factors_are_near_the_square_root():
    m = One(fan_in=12, fan_out=10)
    pk.attach(m, pk.KronaConfig(targets=["proj"]))
    assert m.proj.krona_A.shape == (2, 3) and m.proj.krona_B.shape == (5, 4)


def test_forward_never_materialises_the_full_delta(monkeypatch):
    m = One(fan_in=64, fan_out=48)
    pk.attach(m, pk.KronaConfig(targets=["proj"]))
    perturb(pk.trainable_parameters(m))
    monkeypatch.setattr(torch, "kron", lambda *a, **k: pytest.fail("forward built A (x) B"))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(torch.randn(5, 64)).sum().backward()
    assert sizes and max(sizes) < 48 * 64  # nothing the size of the (48, 64) delta is kept for backward


def test_bad_factor_names_field_and_divisors():
    m = One()
    with pytest.raises(pk.ConfigError, match=r"a_out=4 does not divide the width 6 .* allowed: \[1, 2, 3, 6\]"):
        pk.attach(m, pk.KronaConfig(a_out=4, targets=["proj"]))
    assert not pk.adapters(m)
    with pytest.raises(pk.ConfigError, match="a_in must be >= 1"):
        pk.KronaConfig(a_in=0)


def test_conv1d_merge():
    m, batch = gpt2(), inputs("gpt2")
    pk.attach(m, pk.KronaConfig(targets=["c_attn"]))
    perturb(pk.trainable_parameters(m))
    w = m.transformer.h[0].attn.c_attn
    assert w.delta_weight().shape == w.base.weight.shape
    out = run(m, batch)
    pk.merge(m)
    torch.testing.assert_close(run(m, batch), out, rtol=1e-5, atol=1e-5)
