"""Nothing lost: atomic adapter saves under SIGKILL and concurrent writers, one run per run
folder, resume from the newest intact checkpoint, refused schedule changes, exact resume for
every optimiser (CMA-ES included)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import petkit as pk
from petkit.core.run_lock import RunLock
from petkit.core.errors import CheckpointError
from petkit.training import TrainConfig, train
from test_train import LABEL_IDS, collate, lora_model, separable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from durability import ForkedSavers, fresh, leftovers, saver  # noqa: E402  (the benchmark's savers)
from durability import version as loaded_version  # noqa: E402


@pytest.mark.slow
def test_sigkill_during_overwriting_saves_never_loses_the_adapter(tmp_path: Path) -> None:
    folder, rng, kills = tmp_path / "ad", random.Random(0), 15
    versions, savers = [], ForkedSavers()  # forks of one process: no interpreter start per kill
    for _ in range(kills):
        child = savers.start(folder, 1.0, 10**9)  # the first save of this child is complete
        time.sleep(rng.uniform(0.0, 0.3))
        savers.kill(child)
        versions.append(loaded_version(folder))  # always a complete adapter
    savers.close()
    # The next save cleans what the killed savers left behind.
    model = pk.load_adapter(fresh(), folder)
    pk.save_adapter(model, folder, name="a")
    assert leftovers(folder) == []
    assert all(v >= 1 for v in versions)


@pytest.mark.slow
def test_two_writers_and_a_reader_share_one_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ad"
    writers = [saver(folder, 1.0, 40), saver(folder, -1.0, 40)]
    reads = 0
    while any(w.poll() is None for w in writers):
        if folder.exists():  # published: from now on never missing
            loaded_version(folder)  # never missing, never a mix
            reads += 1
    for w in writers:
        out, err = w.communicate()
        assert w.returncode == 0, err
        assert out.split()[-1] == "40"
    assert abs(loaded_version(folder)) == 40 and leftovers(folder) == []
    assert reads > 0


def test_a_save_cut_between_its_renames_is_read_from_the_aside_copy(tmp_path: Path) -> None:
    """The state a kill between `rename old aside` and `rename new in` leaves behind."""
    model = pk.attach(fresh(), pk.LoraConfig(r=2, targets=["0"]), name="a")
    folder = pk.save_adapter(model, tmp_path / "ad", name="a")
    aside = tmp_path / ".ad.petkit-old-123"
    os.replace(folder, aside)
    (tmp_path / ".ad.petkit-tmp-456").mkdir()  # a half-written new version
    pk.load_adapter(fresh(), folder)
    pk.save_adapter(model, folder, name="a")
    assert leftovers(folder) == [] and folder.is_dir()


def test_a_saver_that_cannot_get_its_turn_gets_a_petkit_error(tmp_path: Path, monkeypatch) -> None:
    from petkit.core import durable

    model = pk.attach(fresh(), pk.LoraConfig(r=2, targets=["0"]), name="a")
    monkeypatch.setattr(durable, "LOCK_TIMEOUT_S", 0.2)
    with durable.folder_lock(tmp_path):  # another saver holds the folder
        with pytest.raises(pk.PetkitError, match="another process has been saving into"):
            pk.save_adapter(model, tmp_path / "ad", name="a")
    assert leftovers(tmp_path / "ad") == []


# --- run folders ------------------------------------------------------------------------------


def _cfg(out: Path, **cfg: Any) -> TrainConfig:
    base = {"lr": 1e-2, "progress": False, "label_token_ids": LABEL_IDS, "output_dir": str(out),
            "max_steps": 6, "batch_size": 8}
    return TrainConfig(**{**base, **cfg})


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {os.getpid()} on host"):
            train(lora_model(), separable(16), _cfg(tmp_path), collate_fn=collate)
    train(lora_model(), separable(16), _cfg(tmp_path), collate_fn=collate)  # free again
    assert not (tmp_path / RunLock.NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / RunLock.NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                     "since": time.time()}))
    with pytest.warns(UserWarning, match=f"stale run lock of pid {dead.pid}.*no longer running"):
        train(lora_model(), separable(16), _cfg(tmp_path), collate_fn=collate)


# --- resume -----------------------------------------------------------------------------------


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    data, cfg = separable(32), dict(max_steps=8, save_every=2, keep_checkpoints=4)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(lora_model(dropout=0.1), data, _cfg(full, **cfg), collate_fn=collate)
    for step in (2, 4):
        shutil.copytree(full / "checkpoints" / f"step-{step}", cut / "checkpoints" / f"step-{step}")
    (cut / "checkpoints" / "step-4" / "state.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="step-4 is damaged"):
        train(lora_model(dropout=0.1), data, _cfg(cut, resume=True, **cfg), collate_fn=collate)
    a, b = _adapter(full), _adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change", [{"max_steps": 10}, {"lr": 5e-2}, {"schedule": "cosine"},
                                    {"batch_size": 4}, {"grad_accum": 2}])
def test_a_changed_schedule_setting_is_refused_unless_overridden(tmp_path: Path, change) -> None:
    data, cfg = separable(32), dict(max_steps=4, save_every=2)
    train(lora_model(), data, _cfg(tmp_path, **cfg), collate_fn=collate)
    (field,) = change
    with pytest.raises(CheckpointError, match=f"would change {field}"):
        train(lora_model(), data, _cfg(tmp_path, resume=True, **{**cfg, **change}), collate_fn=collate)
    result = train(lora_model(), data, _cfg(tmp_path, resume=True, resume_override=True,
                                            **{**cfg, **change}), collate_fn=collate)
    assert result.steps == change.get("max_steps", 4)


OPTIMIZERS = [("adamw", {}), ("sgd", {}), ("mezo", {}), ("zo-adam", {}),
              ("cma", {"stepper": {"name": "cma", "dim": 8, "popsize": 6, "sigma": 0.05}})]


@pytest.mark.parametrize("optimizer,extra", OPTIMIZERS, ids=[o for o, _ in OPTIMIZERS])
def test_resume_is_bit_exact_for_every_optimizer(tmp_path: Path, optimizer: str, extra) -> None:
    data = separable(40)
    cfg = dict(max_steps=6, save_every=2, keep_checkpoints=5, eval_every=2, batch_size=6,
               optimizer=optimizer, **extra)
    full, part = tmp_path / "full", tmp_path / "part"
    train(lora_model(dropout=0.1), data[:32], _cfg(full, **cfg), eval_data=data[32:], collate_fn=collate)
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    train(lora_model(dropout=0.1), data[:32], _cfg(part, resume=True, **cfg), eval_data=data[32:],
          collate_fn=collate)
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (part / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def test_cma_resume_keeps_the_batched_scoring_choice(tmp_path: Path) -> None:
    """The batched-vs-one-by-one decision is restored, not re-made after a resume."""
    from petkit.training.steppers.cma_es import CmaStepper

    x = torch.nn.Parameter(torch.zeros(30))
    stepper = CmaStepper({"x": x}, dim=5, sigma=0.3, seed=1)
    stepper.batched = True
    other = CmaStepper({"x": torch.nn.Parameter(torch.zeros(30))}, dim=5, sigma=0.3, seed=1)
    other.load_state_dict(stepper.state_dict())
    assert other.batched is True
