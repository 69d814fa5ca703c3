"""Bottleneck adapter numerics: serial h + s*up(act(down h)), parallel f(x) + s*up(act(down x)),
and where each variant (houlsby / pfeiffer / parallel) sits on Llama, GPT-2 and BERT."""
import copy

import pytest
import torch
from torch import nn

import petkit as pk
from petkit.core.delta import iter_deltas
from toys import bert_cls, gpt2, llama, perturb

ACTS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ffn = nn.Linear(8, 8)

    def forward(self, x):
        return self.ffn(x)


def bottleneck(a, src):
    """up(act(down src)) from the adapter's own weights, by hand."""
    z = ACTS[a.act.__class__.__name__.lower()](src @ a.down.weight.T + a.down.bias)
    return z @ a.up.weight.T + a.up.bias


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_closed_form(variant, activation):
    m = Block()
    W, b = m.ffn.weight.detach().clone(), m.ffn.bias.detach().clone()
    cfg = pk.AdapterConfig(variant=variant, reduction_factor=4, activation=activation, scale=0.5, targets=["ffn"])
    pk.attach(m, cfg)
    a = m.ffn
    assert a.down.out_features == 2
    assert torch.count_nonzero(a.up.weight) == 0  # identity at init
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), x @ W.T + b, rtol=0, atol=0)
    perturb(pk.trainable_parameters(m))
    h = x @ W.T + b
    src = x if variant == "parallel" else h
    expected = h + 0.5 * bottleneck(a, src)
    torch.testing.assert_close(m(x), expected.detach())


@pytest.mark.parametrize("factor,width", [(1, 8), (3, 3), (16, 1), (100, 1)])
def test_reduction_factor_sets_bottleneck_width(factor, width):
    m = Block()
    pk.attach(m, pk.AdapterConfig(reduction_factor=factor, targets=["ffn"]))
    assert m.ffn.down.out_features == width and m.ffn.up.in_features == width


PLACES = {
    ("llama", "houlsby"): ["self_attn.o_proj", "mlp.down_proj"],
    ("llama", "pfeiffer"): ["mlp.down_proj"],
    ("llama", "parallel"): ["mlp"],
    ("gpt2", "houlsby"): ["attn.c_proj", "mlp.c_proj"],
    ("gpt2", "pfeiffer"): ["mlp.c_proj"],
    ("gpt2", "parallel"): ["mlp"],
    ("bert", "houlsby"): ["attention.output.dense", "output.dense"],
    ("bert", "pfeiffer"): ["output.dense"],
    ("bert", "parallel"): ["output.dense"],
}
STEMS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer"}
TOYS = {"llama": llama, "gpt2": gpt2, "bert": bert_cls}


@pytest.mark.parametrize("arch,variant", sorted(PLACES))
def test_default_placement_per_architecture(arch, variant):
    m = TOYS[arch]()
    pk.attach(m, pk.AdapterConfig(variant=variant))
    wrapped = [p for p, _ in iter_deltas(m)]
    assert wrapped == [f"{STEMS[arch]}.{i}.{s}" for i in range(2) for s in PLACES[arch, variant]]


def test_parallel_beside_llama_mlp_matches_closed_form():
    base = llama()
    m = copy.deepcopy(base)
    pk.attach(m, pk.AdapterConfig(variant="parallel", activation="silu", scale=2.0))
    perturb(pk.trainable_parameters(m), scale=0.3)
    x = torch.randn(2, 5, 32)
    a = m.model.layers[1].mlp
    expected = base.model.layers[1].mlp(x) + 2.0 * bottleneck(a, x)
    torch.testing.assert_close(a(x), expected)
    assert a.down.in_features == 32 and a.up.out_features == 32 and a.down.out_features == 2


def test_pfeiffer_has_half_the_parameters_of_houlsby_on_llama():
    sizes = {}
    for variant in ("houlsby", "pfeiffer"):
        m = llama()
        pk.attach(m, pk.AdapterConfig(variant=variant))
        sizes[variant] = sum(p.numel() for p in pk.trainable_parameters(m).values())
    assert sizes["houlsby"] == 2 * sizes["pfeiffer"]


def test_bad_config():
    with pytest.raises(pk.ConfigError, match="variant must be one of"):
        pk.AdapterConfig(variant="sideways")
    with pytest.raises(pk.ConfigError, match="reduction_factor must be >"):
        pk.AdapterConfig(reduction_factor=0)
    with pytest.raises(pk.ConfigError, match="activation must be one of"):
        pk.AdapterConfig(activation="softmax")
    with pytest.raises(pk.TargetError, match="cannot wrap"):
        pk.attach(nn.Sequential(nn.ReLU()), pk.AdapterConfig(targets=["0"]))
