"""LoRA's B-product in place under torch.compile (`core.accumulate`, on by default; the tests set
the switch themselves): the op runs where the out-of-place addmm ran, also with fp32 factors under
bf16 autocast (a bf16 GPU run's layout), with the same loss and gradients as the compiled
out-of-place path; eager mode never uses it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import profile

import petkit as pk
from petkit.core import accumulate
from petkit.core.accumulate import in_place_ok
from petkit.methods.family import lowrank


class TwoProjections(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.v_proj = nn.Linear(32, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(self.q_proj(x)) * self.v_proj(x)).float().sum()


def bf16_base_fp32_factors() -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """LoRA on both projections; frozen weights in bf16, factors fp32 and non-zero (as `place`
    leaves a bf16 run with delta_dtype fp32)."""
    torch.manual_seed(0)
    model = pk.attach(TwoProjections(), pk.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    params = pk.trainable_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.bfloat16()
        for p in params.values():
            p.normal_()
    return model, params


def run(forward: Any, params: dict[str, nn.Parameter], x: torch.Tensor
        ) -> tuple[float, dict[str, torch.Tensor], dict[str, int]]:
    for p in params.values():
        p.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16), profile() as prof:
        loss = forward(x)
        loss.backward()
    ops = {e.key: e.count for e in prof.key_averages() if "addmm" in e.key}
    return float(loss), {k: p.grad.clone() for k, p in params.items()}, ops


@pytest.mark.slow  # compiles twice with inductor on the CPU (~15 s)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp32_factors_under_bf16_autocast_take_the_in_place_op(
        device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accumulate, "IN_PLACE", True)
    model, params = bf16_base_fp32_factors()
    model.to(device)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, device=device)
    eager = run(model, params, x)
    torch._dynamo.reset()
    compiled = run(torch.compile(model), params, x)
    monkeypatch.setattr(accumulate, "IN_PLACE", False)
    torch._dynamo.reset()
    copied = run(torch.compile(model), params, x)
    torch._dynamo.reset()
    assert "petkit::addmm_into" not in eager[2] and "petkit::addmm_into" not in copied[2]
    assert compiled[2]["petkit::addmm_into"] >= 2 and "aten::addmm" not in compiled[2]
    assert compiled[0] == copied[0]
    for key, grad in copied[1].items():
        assert compiled[1][key].dtype == torch.float32  # the factors' own dtype
        torch.testing.assert_close(compiled[1][key], grad, rtol=2e-2, atol=1e-2 * grad.abs().max().item())


def test_outside_compile_nothing_is_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accumulate, "IN_PLACE", True)
    y, h, b = torch.randn(4, 8), torch.randn(4, 2), torch.randn(8, 2)
    assert not in_place_ok(y, h, b)
    out = lowrank.add_lowrank(y, h, b, 0.5)
    assert out.data_ptr() != y.data_ptr()
    torch.testing.assert_close(out, y + 0.5 * h @ b.T)
