"""HRA's two forward paths agree: reflecting the tokens (few tokens, or a base that is not a plain
nn.Linear) and reflecting the weight's rows (more tokens than outputs), in value and gradients."""
import pytest
import torch
from torch import nn

import petkit as pk
from petkit.methods.family.dense import RotatedInput
from petkit.methods.hra import HraLinear


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [2, 3])
def test_weight_path_equals_token_path(apply_gs: bool, r: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 6))
    pk.attach(model, pk.HraConfig(r=r, apply_gs=apply_gs, targets=["0"]))
    layer = model[0]
    assert isinstance(layer, HraLinear)
    with torch.no_grad():
        layer.hra_u.normal_()  # away from the identity init
    x = torch.randn(4, 5, 16, requires_grad=True)  # 20 tokens > 6 outputs: the weight path

    def run(forward) -> tuple[torch.Tensor, ...]:
        layer.hra_u.grad = x.grad = None
        out = forward(x)
        out.pow(2).sum().backward()
        return out.detach(), layer.hra_u.grad.clone(), x.grad.clone()

    weight_path = run(layer)
    token_path = run(lambda t: RotatedInput.forward(layer, t))
    for got, want in zip(weight_path, token_path):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    merged = torch.nn.functional.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias)
    torch.testing.assert_close(weight_path[0], merged.detach(), atol=1e-5, rtol=1e-5)
