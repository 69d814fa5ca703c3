"""Wrappers with two forward paths compute the same thing on both, in value and gradients:
- the full-matrix deltas (LoHa, LoKr, HiRA, SHiRA) fold dW into the weight on a plain nn.Linear,
  one product with W0 + dW, against base(x) + x dW^T (the path taken with dropout, on other
  bases, or when dW's dtype differs from the weight's);
- HRA reflects the weight's rows when a plain nn.Linear gets more tokens than it has outputs,
  against reflecting the tokens."""
from collections.abc import Callable

import pytest
import torch
from torch import nn

import petkit as pk
from petkit.methods.family.dense import DenseDelta, DroppedDelta, RotatedInput
from petkit.methods.hra import HraLinear

CONFIGS = {"loha": {"r": 2, "alpha": 4.0}, "lokr": {"r": 1}, "hira": {"r": 2}, "shira": {"r": 2}}


def attached(method: str, **config) -> tuple[nn.Module, list[nn.Parameter]]:
    """A Linear(16, 12) under `method`, its trained tensors drawn away from the identity init."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    pk.attach(model, pk.make_config(method, targets=["0"], **config))
    params = list(pk.trainable_parameters(model).values())
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.3)
    return model[0], params


def assert_paths_agree(layer: nn.Module, params: list[nn.Parameter],
                       other: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`layer(x)` and `other(x)` on 15 tokens (more than the 12 outputs): the same output and
    gradients; returns the output."""
    x = torch.randn(3, 5, 16, requires_grad=True)

    def run(forward: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        for t in (*params, x):
            t.grad = None
        out = forward(x)
        out.pow(2).sum().backward()
        return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in params)]

    got = run(layer)
    for a, b in zip(got, run(other)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    merged = nn.functional.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias)
    torch.testing.assert_close(got[0], merged.detach(), atol=1e-5, rtol=1e-5)
    return got[0]


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_folded_forward_equals_the_two_products(method: str) -> None:
    layer, params = attached(method, **CONFIGS[method])
    assert isinstance(layer, DenseDelta)
    assert_paths_agree(layer, params, lambda t: DroppedDelta.forward(layer, t))


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [2, 3])
def test_hra_weight_path_equals_token_path(apply_gs: bool, r: int) -> None:
    layer, params = attached("hra", r=r, apply_gs=apply_gs)
    assert isinstance(layer, HraLinear)
    assert_paths_agree(layer, params, lambda t: RotatedInput.forward(layer, t))


def test_a_bf16_base_with_an_fp32_delta_keeps_two_products() -> None:
    """W0 + dW in the base's bf16 would round a small dW away: the delta is added to the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16)
    pk.attach(model, pk.make_config("loha", targets=["0"], r=2, alpha=4.0))
    for p in pk.trainable_parameters(model).values():
        p.data = p.data.float()  # as a bf16 run keeps its deltas (delta_dtype fp32)
    calls = []
    original = DroppedDelta.forward
    DroppedDelta.forward = lambda self, t: (calls.append(1), original(self, t))[1]
    try:
        model[0](torch.randn(2, 16, dtype=torch.bfloat16))
    finally:
        DroppedDelta.forward = original
    assert calls
