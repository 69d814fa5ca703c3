"""LoRA numerics against the closed form h = W0 x + s * B A x."""
import math

import pytest
import torch
from torch import nn

import petkit as pk
from toys import gpt2, inputs, perturb, run


class One(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 5)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("rslora,scale", [(False, 12.0 / 3), (True, 12.0 / math.sqrt(3))])
def test_forward_is_closed_form(rslora, scale):
    m = One()
    W0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.LoraConfig(r=3, alpha=12.0, rslora=rslora, targets=["proj"]))
    A, B = m.proj.lora_A, m.proj.lora_B
    assert torch.count_nonzero(B) == 0 and A.shape == (3, 6) and B.shape == (5, 3)
    perturb(pk.trainable_parameters(m))
    x = torch.randn(4, 6)
    expected = x @ W0.T + b0 + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(m(x), expected.detach())
    torch.testing.assert_close(m.proj.delta_weight(), scale * (B @ A).detach())


@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6), (3, 2, 6, 4)])
def test_forward_and_gradients_are_closed_form_for_any_leading_dims(shape):
    m = One()
    W0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.LoraConfig(r=3, alpha=6.0, targets=["proj"]))
    perturb(pk.trainable_parameters(m))
    A, B = m.proj.lora_A, m.proj.lora_B
    x = torch.randn(shape, requires_grad=True)
    x_in = x.transpose(-1, -2) if len(shape) == 4 else x  # a non-contiguous input too
    out = m(x_in)
    A2, B2, x2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    x2_in = x2.transpose(-1, -2) if len(shape) == 4 else x2
    expected = x2_in @ W0.T + b0 + 2.0 * (x2_in @ A2.T @ B2.T)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    for got, want in ((A.grad, A2.grad), (B.grad, B2.grad), (x.grad, x2.grad)):
        torch.testing.assert_close(got, want)


def test_a_base_returning_another_dtype_gets_the_promoted_sum():
    m = One()  # its layer returns float64 here, as some quantised layers return another dtype
    m.proj.register_forward_hook(lambda mod, args, y: y.double())
    pk.attach(m, pk.LoraConfig(r=2, alpha=2.0, targets=["proj"]))
    perturb(pk.trainable_parameters(m))
    x = torch.randn(3, 6)
    out = m(x)
    assert out.dtype == torch.float64
    lora = m.proj
    expected = lora.base(x) + (x @ lora.lora_A.T @ lora.lora_B.T).double()
    torch.testing.assert_close(out, expected.detach())


def test_conv1d_merge_uses_transposed_layout():
    m, batch = gpt2(), inputs("gpt2")
    pk.attach(m, pk.LoraConfig(r=2, targets=["c_attn"]))
    perturb(pk.trainable_parameters(m))
    w = m.transformer.h[0].attn.c_attn
    assert w.delta_weight().shape == w.base.weight.shape  # (in, out) like Conv1D
    out = run(m, batch)
    pk.merge(m)
    torch.testing.assert_close(run(m, batch), out, rtol=1e-5, atol=1e-5)


def test_no_dropout_op_when_p_is_zero():
    m = One()
    pk.attach(m, pk.LoraConfig(r=2, targets=["proj"]))
    assert m.proj.dropout is None
    assert not any(isinstance(x, nn.Dropout) for x in m.modules())


def test_bias_options():
    m = One()
    pk.attach(m, pk.LoraConfig(r=2, targets=["proj"], bias="lora_only"))
    assert set(pk.trainable_parameters(m)) == {"proj.lora_A", "proj.lora_B", "proj.lora_bias"}
    with pytest.raises(pk.ConfigError, match="bias must be one of"):
        pk.LoraConfig(bias="some")


@pytest.mark.parametrize("field,value,match", [("r", 0, "r must be >= 1"), ("alpha", 0, "alpha must be >"),
                                               ("dropout", 1.5, "dropout must be <="), ("r", 2.5, "r must be int")])
def test_bad_config_names_field_and_range(field, value, match):
    with pytest.raises(pk.ConfigError, match=match):
        pk.LoraConfig(**{field: value})


def test_compiles_without_graph_breaks():
    m = One()
    pk.attach(m, pk.LoraConfig(r=2, targets=["proj"], dropout=0.0))
    explain = torch._dynamo.explain(m)(torch.randn(3, 6))
    assert explain.graph_break_count == 0
    m2 = One()
    pk.attach(m2, pk.LoraConfig(r=2, targets=["proj"], dropout=0.1))
    assert torch._dynamo.explain(m2)(torch.randn(3, 6)).graph_break_count == 0
