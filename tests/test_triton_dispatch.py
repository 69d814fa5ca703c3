"""`--runtime.kernels=triton` where petkit's Triton kernel does not run (no Triton, a CPU, fp32):
the fused layers fall back to the torch function with the same numbers and say why; the plan
(`triton`, `auto`'s one constant, refused combinations); the benchmark's loss-curve comparison.
None of these needs Triton (the kernel's own numerics: tests/test_triton_delta.py)."""

from __future__ import annotations

import pytest
import torch

import petkit as pk
from petkit.training import fused_delta
from petkit.training.fused_delta import fused_deltas
from test_fused_delta import CPU, _loss_and_grads, _lora_llama, _train
from toys import llama


def test_the_triton_kernel_falls_back_to_the_torch_function_and_says_why(monkeypatch) -> None:
    """`kernel="triton"` on layers its kernel does not take: the torch fused path, same numbers."""
    import importlib.util

    model = _lora_llama()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _loss_and_grads(model, ids)
    with fused_deltas(model, torch.float32, CPU, kernel="triton") as report:
        loss1, grads1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    for key, grad in grads0.items():
        torch.testing.assert_close(grads1[key], grad, rtol=1e-4, atol=1e-6)
    assert report.fused == 14 and report.triton == 0
    reason = "triton kernel on cpu" if importlib.util.find_spec("triton") else \
        "triton is not installed"
    assert report.note() == f"fused delta on 14 of 14 delta layers (triton kernel on 0; " \
                            f"torch on 14: {reason})"
    monkeypatch.setattr(fused_delta, "find_spec", lambda name: None)  # no Triton installed
    with fused_deltas(_lora_llama(), torch.float32, CPU, kernel="triton") as report:
        assert report.torch_only == {"triton is not installed": 14}
    # with dropout active, a layer the kernel does not take keeps its own forward, saying why
    with fused_deltas(_lora_llama(dropout=0.1), torch.float32, CPU, kernel="triton") as report:
        assert report.fused == 0 and report.skipped == {"dropout, triton is not installed": 14}
    assert report.note() == "fused delta on 0 of 14 delta layers (triton kernel on 0) " \
                            "(eager: 14 dropout, triton is not installed)"


def test_kernels_triton_plans_the_fused_delta_on_its_kernel_and_auto_keeps_one_constant() -> None:
    from petkit.core.errors import ConfigError
    from petkit.training import kernels

    model = llama()
    plan = kernels.plan_kernels("triton", "flce", model, torch.device("cuda"), None)
    assert plan.fused and plan.kernel == "triton" and not plan.liger
    assert kernels.plan_kernels("fused", "flce", model, torch.device("cuda"), None).kernel == \
        "torch"
    auto = kernels.plan_kernels("auto", "flce", model, torch.device("cuda"), None)
    assert auto.fused == (kernels.AUTO_DELTA is not None)
    assert auto.kernel == (kernels.AUTO_DELTA or "torch")
    cpu = kernels.plan_kernels("triton", "flce", model, torch.device("cpu"), None)
    assert not cpu.fused and cpu.note() == \
        "eager delta; liger off; fused delta off on cpu (it runs on cuda)"
    with pytest.raises(ConfigError, match="triton in place of fused"):
        kernels.kernel_parts("fused,triton")
    with pytest.raises(ConfigError, match="did you mean 'triton'"):
        pk.RuntimeConfig(kernels="trition")


def test_train_with_triton_on_the_cpu_equals_eager_and_says_which_path_ran(tmp_path,
                                                                          monkeypatch) -> None:
    monkeypatch.setattr(fused_delta, "FUSED_DEVICES", CPU)
    _, eager = _train("none", tmp_path / "eager")
    _, fused = _train("triton", tmp_path / "triton")
    assert fused.report["kernels"].startswith("fused delta on 14 of 14 delta layers (triton "
                                              "kernel on 0; torch on 14: ")
    losses = [[h["train_loss"] for h in r.history if "train_loss" in h] for r in (eager, fused)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_the_benchmarks_loss_curve_comparison_measures_against_the_first_case(
        monkeypatch) -> None:
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from gpu_train_runs import curve_gaps, curves_table

    rows = [{"case": "eager", "losses": [2.0, 1.0, 0.5]},
            {"case": "failed", "error": "out of memory"},
            {"case": "fused", "losses": [2.0, 1.004, 0.5]},
            {"case": "triton", "losses": [2.02, 1.0, 0.499]}]
    gaps = curve_gaps(rows)
    assert [g["case"] for g in gaps] == ["fused", "triton"]
    assert gaps[0]["max_gap"] == pytest.approx(0.004) and gaps[0]["within_goal"]
    assert gaps[1]["max_gap"] == pytest.approx(0.01) and not gaps[1]["within_goal"]
    assert gaps[1]["last_gap"] == pytest.approx(0.002) and gaps[1]["reference"] == "eager"
    assert "| triton | eager | 3 | 1.000% | 0.200% | no |" in curves_table(gaps)
    assert curve_gaps(rows[:2]) == []


@pytest.mark.slow  # a fresh interpreter
def test_planning_the_triton_kernel_does_not_import_triton() -> None:
    """The base install never loads Triton: only installing the kernel on a layer does."""
    import subprocess
    import sys

    code = ("import sys, torch, petkit as pk; from petkit.training import kernels; "
            "pk.RuntimeConfig(kernels='triton'); "
            "kernels.plan_kernels('triton', 'flce', torch.nn.Linear(2, 2), torch.device('cuda'), "
            "None); print('triton' in sys.modules, 'petkit.training.triton_delta' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
