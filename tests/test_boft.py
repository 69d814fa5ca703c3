"""BOFT against its closed form: R built as dense matrices with PEFT's own permutation helpers
(P_i diag(C_i) P_i^T multiplied out), orthogonal, identity at init; merge == unmerged."""
import pytest
import torch

import petkit as pk
from petkit.core.delta import iter_deltas
from petkit.methods.boft import BoftLinear
from toys import inputs, llama, perturb, run

peft = pytest.importorskip("peft")
from peft.tuners.boft.layer import BOFTLayer  # noqa: E402


def dense_reference(w: BoftLinear) -> torch.Tensor:
    """R as PEFT multiplies it: B_{m-1} ... B_0, B_i = P_i blockdiag(C_i) P_i^T."""
    n, m = w.fan_in, w.boft_R.shape[0]
    total = torch.eye(n)
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, n, w.blocks // 2 ** i, w.block_size // 2, m - 1)
        p = BOFTLayer.perm2mat(None, perm)
        q = w.boft_R[i].detach()
        s = 0.5 * (q - q.transpose(-2, -1))
        eye = torch.eye(w.block_size).expand_as(s)
        c = torch.linalg.inv(eye + s).transpose(-2, -1) @ (eye - s).transpose(-2, -1)  # (I - S)(I + S)^-1, transposed
        total = (p @ torch.block_diag(*c.transpose(-2, -1)) @ p.T) @ total
    return total


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_boft_rotation_is_the_butterfly_product_and_orthogonal(factors):
    model, batch = llama(), inputs("llama")
    expected = run(model, batch)
    pk.attach(model, pk.BoftConfig(block_size=4, butterfly_factor=factors, targets=["q_proj", "v_proj"]))
    torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)
    perturb(pk.trainable_parameters(model), seed=2, scale=0.3)
    for _, w in iter_deltas(model):
        x, r = torch.randn(3, w.fan_in), dense_reference(w)
        torch.testing.assert_close(w.rotate(x), x @ r, atol=1e-5, rtol=0)
        torch.testing.assert_close(r @ r.T, torch.eye(w.fan_in), atol=1e-5, rtol=0)
    out = run(model, batch)
    pk.merge(model)
    torch.testing.assert_close(run(model, batch), out, atol=1e-5, rtol=0)


def test_boft_block_mistakes_name_the_flags():
    with pytest.raises(pk.ConfigError, match="--method.block_size=5"):
        pk.attach(llama(), pk.BoftConfig(block_size=5, targets=["q_proj"]))
    with pytest.raises(pk.ConfigError, match="butterfly_factor"):
        pk.BoftConfig(butterfly_factor=0)
