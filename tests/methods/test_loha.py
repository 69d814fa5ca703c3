"""LoHa numerics: h = W0 x + (alpha / r) ((W1a W1b) ⊙ (W2a W2b)) x."""
import pytest
import torch

import petkit as pk
from toys import One, perturb


def test_forward_and_merge_are_the_hadamard_closed_form():
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.LohaConfig(r=2, alpha=3.0, targets=["proj"]))
    w = m.proj
    assert w.hada_w1_a.shape == (5, 2) and w.hada_w1_b.shape == (2, 6) and not w.hada_w2_b.any()
    perturb(pk.trainable_parameters(m), scale=0.5)
    dw = 1.5 * (w.hada_w1_a @ w.hada_w1_b) * (w.hada_w2_a @ w.hada_w2_b)
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), (x @ (w0 + dw).T + b0).detach())
    pk.merge(m)
    torch.testing.assert_close(m.proj.base.weight, (w0 + dw).detach())


def test_hadamard_of_two_rank_one_pairs_is_rank_above_one():
    m = One()
    pk.attach(m, pk.LohaConfig(r=1, targets=["proj"]))
    perturb(pk.trainable_parameters(m), scale=1.0)
    assert torch.linalg.matrix_rank(m.proj.delta_weight()) == 1  # (ab^T) ⊙ (cd^T) = (a⊙c)(b⊙d)^T
    pk.detach(m, "default")
    pk.attach(m, pk.LohaConfig(r=2, targets=["proj"]))
    perturb(pk.trainable_parameters(m), scale=1.0)
    assert torch.linalg.matrix_rank(m.proj.delta_weight()) > 2  # up to r² = 4


def test_bad_rank_names_the_field():
    with pytest.raises(pk.ConfigError, match="r must be >= 1"):
        pk.LohaConfig(r=0)
