"""HiRA numerics: dW = W0 ⊙ (B A), high-rank at LoRA's size; unmerge restores W0."""
import torch

import petkit as pk
from toys import One, perturb


def test_forward_is_the_hadamard_with_the_frozen_weight():
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.HiraConfig(r=1, targets=["proj"]))
    perturb(pk.trainable_parameters(m), scale=0.5)
    a, b = m.proj.hira_A.detach(), m.proj.hira_B.detach()
    dw = w0 * (b @ a)
    x = torch.randn(4, 6)
    torch.testing.assert_close(m(x), x @ (w0 + dw).T + b0)
    assert torch.linalg.matrix_rank(dw) > 1  # rank-1 B A, yet a high-rank update


def test_merge_then_unmerge_gives_back_the_base_weight():
    m = One()
    w0 = m.proj.weight.detach().clone()
    pk.attach(m, pk.HiraConfig(r=2, targets=["proj"]))
    perturb(pk.trainable_parameters(m), scale=0.5)
    expected = w0 + w0 * (m.proj.hira_B @ m.proj.hira_A).detach()
    pk.merge(m)
    torch.testing.assert_close(m.proj.base.weight, expected)
    pk.unmerge(m)
    torch.testing.assert_close(m.proj.base.weight, w0, rtol=0, atol=1e-7)
