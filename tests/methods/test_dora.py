"""DoRA numerics against the closed form W' = m * (W0 + s B A) / ||W0 + s B A||_row."""
import pytest
import torch

import petkit as pk
from toys import One, gpt2, inputs, perturb, run


def reference(m, w0, b0, x):
    w = m.proj
    direction = w0 + w.scaling * (w.lora_B @ w.lora_A)
    weight = w.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    return x @ weight.T + b0


def test_magnitude_starts_at_row_norms_and_forward_is_closed_form():
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.DoraConfig(r=3, alpha=6.0, targets=["proj"]))
    torch.testing.assert_close(m.proj.magnitude.detach(), w0.norm(dim=1))
    perturb(pk.trainable_parameters(m), scale=0.3)
    x = torch.randn(4, 6)
    torch.testing.assert_close(m(x), reference(m, w0, b0, x).detach())
    merged = m.proj.delta_weight() + w0
    torch.testing.assert_close(x @ merged.T + b0, reference(m, w0, b0, x).detach())


def test_norm_is_detached_in_the_backward_pass():
    """DoRA section 4.3: gradients treat ||W0 + s B A|| as a constant."""
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.DoraConfig(r=2, targets=["proj"]))
    perturb(pk.trainable_parameters(m), scale=0.3)
    x = torch.randn(4, 6)
    m(x).pow(2).sum().backward()
    ours = m.proj.lora_B.grad.clone()
    w = m.proj
    b = w.lora_B.detach().clone().requires_grad_()
    direction = w0 + w.scaling * (b @ w.lora_A.detach())
    weight = w.magnitude.detach()[:, None] * direction / direction.norm(dim=1, keepdim=True).detach()
    (x @ weight.T + b0).pow(2).sum().backward()
    torch.testing.assert_close(ours, b.grad)


def test_stacked_on_lora_uses_the_plain_base_for_its_magnitude_term():
    m = One()
    x = torch.randn(4, 6)
    pk.attach(m, pk.LoraConfig(r=2, targets=["proj"]), name="l")
    pk.attach(m, pk.DoraConfig(r=2, targets=["proj"]), name="d")
    pk.activate(m, ["l", "d"])
    perturb(pk.trainable_parameters(m), scale=0.3)
    stacked = m(x)
    pk.merge(m)
    torch.testing.assert_close(m(x), stacked, rtol=1e-5, atol=1e-6)


def test_conv1d_merge_and_weight():
    m, batch = gpt2(), inputs("gpt2")
    pk.attach(m, pk.DoraConfig(r=2, targets=["c_attn"]))
    perturb(pk.trainable_parameters(m), scale=0.2)
    w = m.transformer.h[0].attn.c_attn
    assert w.magnitude.shape == (w.base.weight.shape[1],)  # one per output (Conv1D stores (in, out))
    out = run(m, batch)
    pk.merge(m)
    torch.testing.assert_close(run(m, batch), out, rtol=1e-5, atol=1e-5)
    pk.unmerge(m)
    pk.activate(m, ["default"], weights=[0.0])
    with pk.disabled(m):
        base = run(m, batch)
    torch.testing.assert_close(run(m, batch), base)


@pytest.mark.parametrize("field,value,match", [("r", 0, "r must be >= 1"), ("dropout", 1.0, "dropout must be <=")])
def test_bad_config_names_field_and_range(field, value, match):
    with pytest.raises(pk.ConfigError, match=match):
        pk.DoraConfig(**{field: value})
