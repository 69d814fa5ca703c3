"""SHiRA numerics: r (out + in) entries of W train; the mask is PEFT's seeded random mask."""
import pytest
import torch

import petkit as pk
from toys import One, perturb


def peft_mask(out, inp, r, seed):
    """PEFT's `random_mask`, written out: first r(out+in) of a seeded permutation."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    idx = torch.randperm(out * inp, generator=gen)[: r * (out + inp)]
    return torch.zeros(out * inp, dtype=torch.bool).index_fill(0, idx, True).view(out, inp)


@pytest.mark.parametrize("seed", [None, 5])
def test_delta_sits_on_the_mask_and_the_forward_is_closed_form(seed):
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.ShiraConfig(r=1, random_seed=seed, targets=["proj"]))
    assert m.proj.shira_weight.shape == (11,)
    perturb(pk.trainable_parameters(m), scale=0.5)
    dw = m.proj.delta_weight()
    mask = peft_mask(5, 6, 1, seed)
    assert torch.equal(dw != 0, mask)
    torch.testing.assert_close(dw[mask], m.proj.shira_weight.detach())  # row-major order
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), (x @ (w0 + dw).T + b0).detach())


def test_too_many_entries_raise_and_leave_the_model_alone():
    m = One()
    with pytest.raises(pk.ConfigError, match="r=3 asks for 33 trained entries"):
        pk.attach(m, pk.ShiraConfig(r=3, targets=["proj"]))
    assert not pk.adapters(m)
