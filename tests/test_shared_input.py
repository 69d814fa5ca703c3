"""The shared-input pass (`training.shared_input`): low-rank factors that read one input become
one linear over their concatenation, with the same values and gradients; nothing else is
touched."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petkit.training.shared_input import MAX_ROWS, fuse_shared_input_linears


class Siblings(nn.Module):
    """A frozen base linear, three rank-4 factors reading x, one reading another input, one
    trained weight too tall to be a factor, one factor with a bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(8, 8, bias=False).requires_grad_(False)
        self.a = nn.ParameterList(nn.Parameter(torch.randn(4, 8)) for _ in range(3))
        self.other = nn.Parameter(torch.randn(4, 8))
        self.tall = nn.Parameter(torch.randn(MAX_ROWS + 1, 8))
        self.biased = nn.Parameter(torch.randn(4, 8))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x).sum(-1)
        for a in self.a:
            y = y + F.linear(x, a).square().sum(-1)
        y = y + F.linear(x * 2, self.other).sum(-1) + F.linear(x, self.tall).sum(-1)
        return y + F.linear(x, self.biased, self.bias).sum(-1)


def test_factors_reading_one_input_become_one_linear_with_the_same_values_and_gradients() -> None:
    model, x = Siblings(), torch.randn(2, 5, 8)
    seen: dict[str, Any] = {}

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        before = [n for n in gm.graph.nodes if n.target is F.linear]
        seen["fused"] = fuse_shared_input_linears(gm.graph)
        gm.recompile()
        seen["linears"] = (len(before), len([n for n in gm.graph.nodes if n.target is F.linear]))
        return gm.forward

    ref = model(x).sum()
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = torch.compile(model, backend=backend, fullgraph=True)(x).sum()
    out.backward()
    assert seen["fused"] == 1
    assert seen["linears"] == (7, 5)  # the three factors on x are one linear; the rest stay
    torch.testing.assert_close(out, ref)
    for key, grad in ref_grads.items():
        torch.testing.assert_close(model.get_parameter(key).grad, grad, msg=key)
    assert model.base.weight.grad is None


def test_frozen_weights_and_mixed_dtypes_are_left_alone() -> None:
    """Concatenating frozen base weights would copy them every step; factors of two dtypes
    cannot share one GEMM."""
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.ParameterList(nn.Parameter(torch.randn(4, 8), requires_grad=False)
                                           for _ in range(2))
            self.a = nn.Parameter(torch.randn(4, 8))
            self.b = nn.Parameter(torch.randn(4, 8, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            frozen = sum(F.linear(x, w).sum() for w in self.frozen)
            return frozen + F.linear(x, self.a).sum() + F.linear(x.double(), self.b).sum()

    fused = []

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        fused.append(fuse_shared_input_linears(gm.graph))
        return gm.forward

    model, x = Mixed(), torch.randn(3, 8)
    assert torch.compile(model, backend=backend)(x).item() == pytest.approx(model(x).item(), rel=1e-6)
    assert fused == [0]


def test_the_installed_hook_is_one_callable_that_keeps_an_earlier_pass() -> None:
    """torch 2.11's inductor calls `pre_grad_custom_pass` as one callable (a list fails there):
    the hook installed is one, and it runs a pass already set before this one."""
    import torch._inductor.config as inductor_config

    from petkit.training.shared_input import shared_input_lowrank

    ran = []
    with inductor_config.patch(pre_grad_custom_pass=lambda graph: ran.append("earlier")):
        with shared_input_lowrank():
            hook = inductor_config.pre_grad_custom_pass
            assert callable(hook) and not isinstance(hook, (list, tuple))
            hook(torch.fx.Graph())
    assert ran == ["earlier"]


@pytest.mark.slow  # compiles a block with inductor on the CPU
def test_a_compiled_run_with_the_pass_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched on for training (`run_modes.SHARED_INPUT_LOWRANK`), the pass fuses the factors
    of q and v (LoRA's default targets on a Llama) in every compiled block, with eager's losses."""
    import sys
    from pathlib import Path

    from petkit.training import RuntimeConfig, run_modes, shared_input

    sys.path.insert(0, str(Path(__file__).parent))
    from test_activations import lora_losses

    fused = []
    fuse = shared_input.fuse_shared_input_linears
    monkeypatch.setattr(shared_input, "fuse_shared_input_linears",
                        lambda graph: fused.append(fuse(graph)) or fused[-1])
    monkeypatch.setattr(run_modes, "SHARED_INPUT_LOWRANK", True)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(3, 60, (12, 16))]
    eager = lora_losses(data, layers=2, steps=3)
    runtime = RuntimeConfig(compile=True, compile_scope="blocks", precision="fp32",
                            activation_checkpointing="elementwise")
    torch._dynamo.reset()
    try:
        compiled = lora_losses(data, layers=2, steps=3, runtime=runtime)
    finally:
        torch._dynamo.reset()  # no later test reuses graphs compiled with the pass
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert sum(fused) >= 1, fused
