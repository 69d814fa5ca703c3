"""The full-matrix deltas (LoHa, LoKr, HiRA, SHiRA) fold dW into the weight on a plain nn.Linear:
one product with W0 + dW, the same output and gradients as base(x) + x dW^T (the path taken with
dropout, on other bases, or when dW's dtype differs from the weight's)."""
import pytest
import torch
from torch import nn

import petkit as pk
from petkit.methods.family.dense import DenseDelta, DroppedDelta

CONFIGS = {"loha": {"r": 2, "alpha": 4.0}, "lokr": {"r": 1}, "hira": {"r": 2}, "shira": {"r": 2}}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_folded_forward_equals_the_two_products(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    pk.attach(model, pk.make_config(method, targets=["0"], **CONFIGS[method]))
    layer = model[0]
    assert isinstance(layer, DenseDelta)
    params = list(pk.trainable_parameters(model).values())
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.3)  # a delta away from zero
    x = torch.randn(3, 5, 16, requires_grad=True)

    def run(forward) -> list[torch.Tensor]:
        for t in (*params, x):
            t.grad = None
        out = forward(x)
        out.pow(2).sum().backward()
        return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in params)]

    folded = run(layer)
    two = run(lambda t: DroppedDelta.forward(layer, t))
    for got, want in zip(folded, two):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    merged = torch.nn.functional.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias)
    torch.testing.assert_close(folded[0], merged.detach(), atol=1e-6, rtol=1e-6)


def test_a_bf16_base_with_an_fp32_delta_keeps_two_products() -> None:
    """W0 + dW in the base's bf16 would round a small dW away: the delta is added to the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16)
    pk.attach(model, pk.make_config("loha", targets=["0"], r=2, alpha=4.0))
    layer = model[0]
    for p in pk.trainable_parameters(model).values():
        p.data = p.data.float()  # as a bf16 run keeps its deltas (delta_dtype fp32)
    calls = []
    original = DroppedDelta.forward
    DroppedDelta.forward = lambda self, t: (calls.append(1), original(self, t))[1]
    try:
        layer(torch.randn(2, 16, dtype=torch.bfloat16))
    finally:
        DroppedDelta.forward = original
    assert calls
