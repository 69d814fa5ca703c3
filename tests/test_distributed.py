"""Distributed training on the CPU: torchrun, gloo, 2 processes, a tiny random Llama.

Each 2-process run is `tests/dist_worker.py` under `torchrun --standalone` (a free port); the
1-process references run here, with the same global batch. The trajectory must not depend on the
world size: same delta on both ranks, equal to one process to 1e-6, checkpoints that resume at
another world size, rank 0 writing single-process files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.models import tiny_model
from petkit.training.distributed import choose_mode, cut, launch

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import build, data  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"
# lr 1e-3: AdamW divides by sqrt(v), so float-rounding differences grow with the learning rate.
TRAIN = {"lr": 1e-3, "max_steps": 6, "batch_size": 6, "grad_accum": 2, "progress": False,
         "log_every": 1, "seed": 0}
TOL = 1e-6


def torchrun(specs: list[dict[str, Any]], nproc: int = 2, timeout: float = 240,
             collective_timeout: int = 180,
             rerun_crash: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the worker on `nproc` gloo processes; returns the finished process. A collective
    waits up to `collective_timeout` s (a starved rank on a loaded 2-core machine is no bug).
    `rerun_crash`: a run where a rank died of SIGABRT/SIGSEGV runs once more (below); off where
    a test kills a rank (gloo may then abort the survivor)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PETKIT_DIST_TIMEOUT": str(collective_timeout)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(WORKER), json.dumps(specs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if rerun_crash and proc.returncode != 0 and NATIVE_CRASH.search(proc.stderr):
        # A rank aborted inside native code (seen once in CI, on a 2-core machine; not
        # reproduced in 24 local runs of that test): rerun once and keep the crash in the log,
        # so a real, repeatable crash still fails and a one-off is recorded rather than hidden.
        warnings.warn(f"a rank died of a signal; rerunning once. First attempt:\n"
                      f"{crash_report(proc.stderr)}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


NATIVE_CRASH = re.compile(r"exitcode\s*:\s*-(6|11)\b")  # SIGABRT, SIGSEGV (tests inject SIGKILL)


def crash_report(err: str) -> str:
    """Where a rank died hard (C++ `terminate` or Python's fatal-error dump, whose module list
    would fill the tail) and the launcher's summary."""
    marks = [i for i in (err.find("terminate called"), err.find("Fatal Python error")) if i >= 0]
    head = err[max(0, min(marks) - 2000):min(marks) + 3000] if marks else ""
    return f"{head}\n...\n{err[-3000:]}"


def check_ok(proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        raise AssertionError(crash_report(proc.stderr))


def single(spec: dict[str, Any]) -> tuple[torch.nn.Module, pk.TrainResult]:
    """The 1-process run of `spec` in this process."""
    model = build(spec)
    return model, pk.train(model, data(), pk.TrainConfig(**spec["train"]))


def delta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pk.trainable_parameters(model).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def ranks(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]


def resume_from(source: Path, dest: Path, step: int) -> Path:
    """A copy of run `source` holding only its checkpoint `step-<step>` (as if stopped there)."""
    shutil.copytree(source / "checkpoints" / f"step-{step}",
                    dest / "checkpoints" / f"step-{step}")
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Uninterrupted 1-process runs (with a checkpoint at step 3) to compare against."""
    root = tmp_path_factory.mktemp("reference")
    fp32 = {"train": {**TRAIN, "output_dir": str(root / "fp32"), "save_every": 3,
                      "keep_checkpoints": 5}}
    model, result = single(fp32)
    return {"root": root, "fp32": delta(model), "fp32_result": result}


# --- pieces, no processes -------------------------------------------------------------------

def test_cut_weights_make_the_ranks_mean_the_whole_batch_loss():
    batch = {"input_ids": torch.arange(15).view(5, 3),
             "labels": torch.tensor([[-100, 1, 2], [0, 1, 2], [-100, -100, 2], [0, 1, -100],
                                     [0, 1, 2]])}
    shards = [cut(batch, r, 2, causal=True) for r in range(2)]
    assert [len(s.batch["input_ids"]) for s in shards] == [2, 3]
    # predicted tokens: rows 0-1 -> 2 + 2, rows 2-4 -> 1 + 1 + 2; W * units_r / units
    assert [s.weight for s in shards] == pytest.approx([2 * 4 / 8, 2 * 4 / 8])
    # one row for two ranks: rank 0 computes it at weight 0 (it still joins the reduction)
    alone = [cut({"labels": torch.tensor([3])}, r, 2, causal=False) for r in range(2)]
    assert [s.weight for s in alone] == [0.0, 2.0]
    assert all(len(s.batch["labels"]) == 1 for s in alone)


def test_modes_and_the_config_field():
    model = tiny_model("llama")[0]
    assert choose_mode(model, "auto") == "ddp"  # CPU: DDP
    assert choose_mode(model, "fsdp") == "fsdp"
    with pytest.raises(ConfigError, match="distributed"):
        pk.TrainConfig(distributed="zero3")
    with pytest.raises(ConfigError, match="nproc"):
        launch(0, [])


def test_nproc_relaunches_through_torchrun(monkeypatch):
    """`petkit train --nproc 2 ...` runs `python -m torch.distributed.run --standalone
    --nproc-per-node=2 -m petkit train ...` without --nproc, and returns its exit code."""
    import petkit.training.ranks as ranks_module
    from petkit.cli import main

    calls: list[list[str]] = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(ranks_module.subprocess, "call", lambda cmd, env: calls.append(cmd) or 3)
    assert main(["train", "--nproc", "2", "--steps", "3", "--train.distributed=fsdp"]) == 3
    assert calls[0][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "-m", "petkit", "train", "--steps", "3", "--train.distributed=fsdp"]
    launch(4, ["train", "--nproc=4"])
    assert calls[1][-2:] == ["petkit", "train"] and "--nproc-per-node=4" in calls[1]


def test_one_process_is_untouched(tmp_path):
    """Outside torchrun the loop's job is the single-process path (no group, rank 0 writes)."""
    model, result = single({"train": {**TRAIN, "max_steps": 2}})
    assert "world_size" not in result.report
    assert not torch.distributed.is_initialized()


# --- 2 processes ------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_equals_one_process_and_resumes_at_world_size_1(reference, tmp_path):
    """DDP (non-reentrant checkpointing on): same delta on both ranks, = 1 process to 1e-6; only
    the delta is reduced (one bucket pass per step: no_sync on the first micro-batch); the adapter
    is petkit's format with only adapter keys and reloads with equal logits; the step-3
    checkpoint resumes in 1 process to the uninterrupted result."""
    out = tmp_path / "ddp"
    spec = {"out": str(out), "checkpointing": True,
            "train": {**TRAIN, "output_dir": str(out / "run"), "save_every": 3,
                      "keep_checkpoints": 5, "distributed": "ddp"}}
    started = time.perf_counter()
    check_ok(torchrun([spec]))
    seconds = time.perf_counter() - started
    r0, r1 = ranks(out)
    assert max_diff(r0, r1) == 0.0
    assert max_diff(r0, reference["fp32"]) <= TOL
    report = json.loads((out / "rank0.json").read_text())["report"]
    numel = sum(v.numel() for v in r0.values())
    assert report["world_size"] == 2 and report["distributed"] == "ddp"
    assert report["reduced_tensors"] == len(r0)
    assert report["grad_bytes_per_step"] == 4 * numel
    # adapter: only adapter keys, petkit's format, reloads with equal logits
    adapter = out / "run" / "adapter"
    assert set(load_file(str(adapter / "adapter.safetensors"))) == set(r0)
    fresh = tiny_model("llama", seed=0)[0]
    pk.load_adapter(fresh, adapter)
    trained = build({})
    with torch.no_grad():
        for k, p in pk.trainable_parameters(trained).items():
            p.copy_(r0[k])
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    assert torch.equal(fresh(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
    # 2 -> 1: resume the 2-process step-3 checkpoint in this process
    again = resume_from(out / "run", tmp_path / "resumed", 3)
    model, _ = single({"train": {**TRAIN, "output_dir": str(again), "resume": True}})
    print(f"ddp 2 -> 1: max |resumed - uninterrupted| = "
          f"{max_diff(delta(model), reference['fp32']):.2e}")
    assert max_diff(delta(model), reference["fp32"]) <= TOL
    print(f"ddp 2-process run: {seconds:.1f}s; max |2 proc - 1 proc| = "
          f"{max_diff(r0, reference['fp32']):.2e}")


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint_and_equals_it(reference, tmp_path):
    """1 -> 2 under FSDP2 (gloo, CPU; non-reentrant checkpointing): the 1-process step-3
    checkpoint, continued on 2 ranks, ends at the uninterrupted delta; rank 0's checkpoint and
    adapter hold full tensors; a bf16 base with fp32 deltas trains under FSDP2 and DDP."""
    run = resume_from(reference["root"] / "fp32", tmp_path / "fsdp-run", 3)
    out = tmp_path / "fsdp"
    resume = {"out": str(out), "checkpointing": True,
              "train": {**TRAIN, "output_dir": str(run), "save_every": 3, "resume": True,
                        "distributed": "fsdp"}}
    bf16 = [{"out": str(tmp_path / f"bf16-{mode}"), "bf16_base": True, "checkpointing": True,
             "train": {**TRAIN, "precision": "bf16", "distributed": mode}}
            for mode in ("fsdp", "ddp")]
    check_ok(torchrun([resume, *bf16]))
    r0, r1 = ranks(out)
    assert max_diff(r0, r1) == 0.0
    print(f"fsdp 1 -> 2: max |2 proc - 1 proc| = {max_diff(r0, reference['fp32']):.2e}")
    assert max_diff(r0, reference["fp32"]) <= TOL
    saved = load_file(str(run / "checkpoints" / "step-6" / "trainable.safetensors"))
    assert max_diff(saved, r0) == 0.0
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert max_diff(adapter, r0) == 0.0
    for mode in ("fsdp", "ddp"):
        b0, b1 = ranks(tmp_path / f"bf16-{mode}")
        assert max_diff(b0, b1) == 0.0
        assert all(v.dtype == torch.float32 for v in b0.values())
        losses = [row["train_loss"] for row in
                  json.loads((tmp_path / f"bf16-{mode}" / "rank0.json").read_text())["history"]]
        assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_ddp_resumes_a_one_process_checkpoint(reference, tmp_path):
    """1 -> 2 under DDP: the 1-process step-3 checkpoint continued on 2 ranks. IST (blocks'
    requires_grad switched per step, its scores from gradient-free losses) under DDP too."""
    run = resume_from(reference["root"] / "fp32", tmp_path / "run", 3)
    out = tmp_path / "out"
    ist = {"train": {**TRAIN, "ist": {"top_k": 1, "every": 2}, "distributed": "ddp"}}
    check_ok(torchrun([{"out": str(out), "train": {**TRAIN, "output_dir": str(run),
                                                   "resume": True, "distributed": "ddp"}},
                       {**ist, "out": str(tmp_path / "ist")}]))
    r0, r1 = ranks(out)
    print(f"ddp 1 -> 2: max |2 proc - 1 proc| = {max_diff(r0, reference['fp32']):.2e}")
    assert max_diff(r0, r1) == 0.0 and max_diff(r0, reference["fp32"]) <= TOL
    i0, i1 = ranks(tmp_path / "ist")
    model, result = single(ist)
    print(f"ist: max |2 proc - 1 proc| = {max_diff(i0, delta(model)):.2e}")
    assert max_diff(i0, i1) == 0.0 and max_diff(i0, delta(model)) <= 1e-5
    report = json.loads((tmp_path / "ist" / "rank0.json").read_text())["report"]
    assert report["ist_layer_steps"] == {str(k): v for k, v in
                                         result.report["ist_layer_steps"].items()}


@pytest.mark.slow
def test_gradient_free_steppers_exchange_scalars(tmp_path):
    """MeZO: each forward all-reduces one float64 (2 per step) and matches 1 process (to 1e-5:
    the difference quotient magnifies rounding); CMA-ES
    splits its population of 8 over the ranks and all-gathers 4 fitness values per rank."""
    mezo = {"train": {**TRAIN, "optimizer": "mezo", "grad_accum": 1, "lr": 1e-3}}
    cma = {"train": {**TRAIN, "optimizer": "cma", "grad_accum": 1,
                     "stepper": {"name": "cma", "dim": 8, "popsize": 8, "sigma": 0.05}}}
    specs = [{**mezo, "out": str(tmp_path / "mezo")}, {**cma, "out": str(tmp_path / "cma")}]
    check_ok(torchrun(specs))
    # MeZO's (f+ - f-) / (2 eps) magnifies the losses' float rounding by 1 / (2 eps) = 500.
    for name, spec, tol in (("mezo", mezo, 1e-5), ("cma", cma, 1e-4)):
        r0, r1 = ranks(tmp_path / name)
        assert max_diff(r0, r1) == 0.0
        model, _ = single(spec)
        print(f"{name}: max |2 proc - 1 proc| = {max_diff(r0, delta(model)):.2e}")
        assert max_diff(r0, delta(model)) <= tol, name
    mezo_report = json.loads((tmp_path / "mezo" / "rank0.json").read_text())["report"]
    assert mezo_report["collective_bytes_per_step"] == 16.0  # f+ and f-: one float64 each
    cma_report = json.loads((tmp_path / "cma" / "rank0.json").read_text())["report"]
    assert cma_report["collective_bytes_per_step"] == 4 * 8.0


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["kill", "raise"])
def test_a_failing_rank_ends_the_job(tmp_path, fail):
    """Rank 1 dies (SIGKILL) or raises at its 3rd forward: non-zero exit, a clear message,
    well under 60 s."""
    spec = {"out": str(tmp_path), "fail_rank": 1, "fail_call": 3, "fail": fail,
            "train": {**TRAIN, "max_steps": 50, "distributed": "ddp"}}
    for _ in range(2):
        started = time.perf_counter()
        proc = torchrun([spec], timeout=120, collective_timeout=60, rerun_crash=False)
        ended, seconds = time.time(), time.perf_counter() - started
        text = proc.stdout + proc.stderr
        # torch's elastic agent can read a surviving rank's error file while @record is still
        # writing it and die of a JSONDecodeError itself (torch's race, seen once in CI): rerun
        if not ("_capture_process_failures" in text and "JSONDecodeError" in text):
            break
    assert proc.returncode != 0
    assert seconds < 60, seconds
    failed_at = float(re.search(r"failing at ([0-9.]+)", proc.stderr).group(1))
    assert "rank      : 1" in text or "rank: 1" in text, text[-3000:]
    assert ("Signal 9" in text or "SIGKILL" in text) if fail == "kill" else \
        "injected failure on rank 1" in text
    print(f"{fail}: exit {proc.returncode}, {ended - failed_at:.1f}s after the failure "
          f"({seconds:.1f}s in all)")
