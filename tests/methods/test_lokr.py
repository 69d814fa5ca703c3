"""LoKr numerics: dW = (alpha / r) W1 ⊗ W2, factor shapes by PEFT's factorisation rule."""
import pytest
import torch
from torch import nn

import petkit as pk
from petkit.methods.lokr import factorization
from toys import perturb


class Wide(nn.Module):
    def __init__(self, fan_in=16, fan_out=12):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(fan_in, fan_out)

    def forward(self, x):
        return self.proj(x)


def test_factorisation_matches_the_documented_examples():
    assert factorization(256) == (16, 16) and factorization(128) == (8, 16)
    assert factorization(127) == (1, 127) and factorization(128, 4) == (4, 32)


def test_full_and_low_rank_factors_give_the_kronecker_closed_form():
    m = Wide()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.LokrConfig(r=1, alpha=2.0, targets=["proj"]))
    w = m.proj  # out 12 = 3 x 4, in 16 = 4 x 4; r = 1 < 4 / 2: W2 is a rank-1 pair, W1 full
    assert w.lokr_w1.shape == (3, 4) and w.lokr_w2_a.shape == (4, 1) and w.lokr_w2_b.shape == (1, 4)
    assert not w.lokr_w1.any()
    perturb(pk.trainable_parameters(m), scale=0.5)
    dw = 2.0 * torch.kron(w.lokr_w1, w.lokr_w2_a @ w.lokr_w2_b)
    x = torch.randn(2, 16)
    torch.testing.assert_close(m(x), (x @ (w0 + dw).T + b0).detach())
    torch.testing.assert_close(w.delta_weight(), dw.detach())


def test_decompose_both_writes_w1_as_a_pair_and_factor_picks_the_split():
    m = Wide(fan_in=64, fan_out=64)
    pk.attach(m, pk.LokrConfig(r=1, decompose_both=True, factor=4, targets=["proj"]))
    names = set(pk.trainable_parameters(m))
    assert {n.rsplit(".", 1)[1] for n in names} == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert m.proj.lokr_w1_a.shape == (4, 1) and m.proj.lokr_w2_b.shape == (1, 16)


def test_bad_factor_names_the_field():
    with pytest.raises(pk.ConfigError, match="factor must be >= 1"):
        pk.LokrConfig(factor=0)
