"""Bottleneck adapter numerics: serial h + s*up(act(down h)), parallel f(x) + s*up(act(down x))."""
import pytest
import torch
from torch import nn

import petkit as pk
from toys import perturb


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ffn = nn.Linear(8, 8)

    def forward(self, x):
        return self.ffn(x)


@pytest.mark.parametrize("variant", ["serial", "parallel"])
def test_closed_form(variant):
    m = Block()
    W, b = m.ffn.weight.detach().clone(), m.ffn.bias.detach().clone()
    pk.attach(m, pk.AdapterConfig(variant=variant, reduction_factor=4, activation="gelu", scale=0.5, targets=["ffn"]))
    a = m.ffn
    assert a.down.out_features == 2
    assert torch.count_nonzero(a.up.weight) == 0  # identity at init
    perturb(pk.trainable_parameters(m))
    x = torch.randn(3, 8)
    h = x @ W.T + b
    src = h if variant == "serial" else x
    z = torch.nn.functional.gelu(src @ a.down.weight.T + a.down.bias)
    expected = h + 0.5 * (z @ a.up.weight.T + a.up.bias)
    torch.testing.assert_close(m(x), expected.detach())


def test_houlsby_placement_on_llama():
    from toys import llama

    m = llama()
    pk.attach(m, pk.AdapterConfig())
    wrapped = [p for p, w in pk.core.delta.iter_deltas(m)]
    assert wrapped == [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")]


def test_bad_config():
    with pytest.raises(pk.ConfigError, match="variant must be one of"):
        pk.AdapterConfig(variant="sideways")
    with pytest.raises(pk.ConfigError, match="reduction_factor must be >"):
        pk.AdapterConfig(reduction_factor=0)
