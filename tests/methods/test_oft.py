"""OFT numerics: h = base(x R), R block-diagonal Cayley transforms of skew-symmetric blocks."""
import pytest
import torch

import petkit as pk
from petkit.methods.oft import cayley, skew
from toys import mlp, perturb


def test_exact_cayley_is_orthogonal_and_the_forward_rotates_the_input():
    m = mlp()
    w0, b0 = m.fc2.weight.detach().clone(), m.fc2.bias
    pk.attach(m, pk.OftConfig(block_size=4, neumann_terms=0, targets=["fc2"]))
    perturb(pk.trainable_parameters(m), scale=0.3)
    q = skew(m.fc2.oft_R.detach(), 4)
    eye = torch.eye(4)
    blocks = [(eye - qi) @ torch.linalg.inv(eye + qi) for qi in q]
    r = torch.block_diag(*blocks)
    torch.testing.assert_close(r @ r.T, torch.eye(16), rtol=0, atol=1e-5)
    x = torch.randn(3, 16)
    torch.testing.assert_close(m.fc2(x), (x @ r @ w0.T).detach())
    assert b0 is None
    torch.testing.assert_close(m.fc2.delta_weight(), (w0 @ r.T - w0).detach())


def test_neumann_series_is_peft_s_truncation():
    q = skew(torch.randn(2, 3) * 0.1, 3)
    eye = torch.eye(3)
    torch.testing.assert_close(cayley(q, 5), eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q)
    torch.testing.assert_close(cayley(q, 2), eye + 2 * q)
    # PEFT's series sums (I + Q)(I - Q)^-1, the transpose (= inverse) of its exact path's
    # (I - Q)(I + Q)^-1; both kept as PEFT has them, so that adapters exchange either way
    torch.testing.assert_close(cayley(q, 40), cayley(q, 0).transpose(-1, -2), rtol=0, atol=1e-6)


def test_block_share_trains_one_block_and_a_bad_block_size_raises():
    m = mlp()
    pk.attach(m, pk.OftConfig(block_size=8, block_share=True, targets=["fc2"]))
    assert m.fc2.oft_R.shape == (1, 28)
    with pytest.raises(pk.ConfigError, match="block_size=3 does not divide the input width 16"):
        pk.attach(mlp(), pk.OftConfig(block_size=3, targets=["fc2"]))
