"""Hub kernels (the `kernels` package, a dependency of transformers >= 5.25) and torch.compile:
the checkpointed blocks of a model compile without graph breaks with `kernels` installed and
without it, and compiling petkit's loss raises no Dynamo warning about petkit's own code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from petkit.training.hub_kernels import plain_forwards

TESTS = Path(__file__).resolve().parent


def _toy_kernelized() -> tuple[type[nn.Module], nn.Module]:
    """A block holding a module whose class `kernels.use_kernelized_func` wraps, as transformers
    wraps LlamaAttention (skipped without `kernels`)."""
    kernels = pytest.importorskip("kernels")

    @kernels.use_kernel_forward_from_hub("PetkitToyScale")
    def scale(x: torch.Tensor) -> torch.Tensor:
        return 3 * x

    @kernels.use_kernelized_func(scale)
    class Attention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return scale(x) + 1

    block = nn.Sequential(nn.Identity(), Attention())
    return Attention, block


def test_plain_forwards_unwraps_an_unused_kernel_wrapper_and_restores_it() -> None:
    attention_cls, block = _toy_kernelized()
    attention = block[1]
    x = torch.arange(4.0)
    assert "forward" not in vars(attention)  # the class's (wrapped) forward
    with plain_forwards([block]) as switched:
        assert switched == 1
        assert vars(attention)["forward"].__func__ is attention_cls.forward.__wrapped__
        torch.testing.assert_close(block(x), 3 * x + 1)
    assert "forward" not in vars(attention)
    torch.testing.assert_close(block(x), 3 * x + 1)


def test_a_kernelized_module_and_an_own_forward_are_left_alone() -> None:
    _, block = _toy_kernelized()
    attention = block[1]
    func = next(iter(attention._kernel_funcs.values()))
    func.forward = func.forward  # what kernelize() does: an instance forward on the function
    with plain_forwards([block]) as switched:
        assert switched == 0
    del func.forward
    attention.forward = attention.forward  # someone else's instance forward: not ours to replace
    with plain_forwards([block]) as switched:
        assert switched == 0 and "forward" in vars(attention)
    with plain_forwards([nn.Linear(2, 2)]) as switched:
        assert switched == 0


SCRIPT = """
import json, sys, warnings
if sys.argv[1] == "blocked":
    sys.modules["kernels"] = None  # as if not installed: transformers falls back to its stubs
sys.path.insert(0, sys.argv[2])
import torch
import petkit as pk
from petkit.data import collate
from petkit.training.activations import activation_checkpointing
from petkit.training.lm_loss import HeadBypass
from petkit.training.objectives import ModelLoss
from test_contract import CASES
from toys import llama

ids = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(0))
batch = collate([{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}
                 for row in ids], pad_id=0)
for method in sys.argv[3:]:
    case = next(c for c in CASES if c.toy == "llama" and c.method == method)
    model = pk.attach(llama(), pk.make_config(method, **case.kwargs))
    model.train()
    with warnings.catch_warnings(record=True) as caught, activation_checkpointing(model, 1), \\
            HeadBypass(model, 5).installed():
        warnings.simplefilter("always")
        explained = torch._dynamo.explain(lambda b: ModelLoss()(model, b).loss)(batch)
    torch._dynamo.reset()
    print(json.dumps({"method": method, "breaks": explained.graph_break_count,
                      "reasons": [str(r.reason).splitlines()[0] for r in explained.break_reasons],
                      "wrapped": any("_kernel_funcs" in vars(m) for m in model.modules()),
                      "warnings": [str(w.message).splitlines()[0] for w in caught]}))
"""


@pytest.mark.slow  # a fresh interpreter and ~5 s of tracing per method, twice
@pytest.mark.parametrize("kernels", ["installed", "blocked"])
def test_checkpointed_blocks_compile_without_breaks_with_and_without_kernels(kernels: str) -> None:
    """LoRA on a tiny Llama, every block checkpointed, the chunked loss: one graph under Dynamo.
    With `kernels` installed transformers wraps LlamaAttention (the wrapper stores a global,
    which broke each checkpointed block's graph); without it there is no wrapper. Neither LoRA
    nor the input-extension methods (prefix, late-prompt: their graph breaks are
    test_train_modes.py's) make Dynamo warn about petkit's code."""
    if kernels == "installed":
        pytest.importorskip("kernels")
    methods = ["lora", "prefix", "late-prompt"] if kernels == "installed" else ["lora"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(TESTS.parent / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, kernels, str(TESTS), *methods], env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in map(json.loads, proc.stdout.strip().splitlines()[-len(methods):])}
    assert rows["lora"]["wrapped"] == (kernels == "installed")
    assert rows["lora"]["breaks"] == 0, rows["lora"]["reasons"]
    for row in rows.values():
        assert not [w for w in row["warnings"] if "petkit" in w or ".py:" in w], row
