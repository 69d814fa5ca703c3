"""Full disks: an adapter save, a checkpoint, a merged-model export and a federated round's store
that run out of space keep the previous version intact and loadable, leave no partial file, and
end with a `DiskFullError` naming the folder and the space needed; a run resumes from its last
good checkpoint once space is freed.

Two ways to run out: a real size-limited tmpfs (`mount -t tmpfs`, skipped with the reason where
this machine does not allow mounting) and a file-size limit (`RLIMIT_FSIZE` in a subprocess:
writes past it fail with EFBIG), which runs everywhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import petkit as pk
from petkit.app.pipeline import save_folder
from petkit.core.durable import DiskFullError, resolve_folder, write_folder
from petkit.fed.report import append_row, write_report
from petkit.training import TrainConfig, train
from petkit.training.checkpoint import TrainerState, intact_checkpoint, save_checkpoint
from test_train import LABEL_IDS, collate, lora_model, separable

MIB = 1 << 20


def linear(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width))


def tiny_llama(hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2))


# --- the four save paths: (save a version of `size` "small"/"big" into `where`, check the
# version there is the small one) -----------------------------------------------------------


def adapter_save(where: Path, size: str) -> None:
    model = pk.attach(linear(256), pk.LoraConfig(r=1 if size == "small" else 256, targets=["0"]), name="a")
    pk.save_adapter(model, where / "adapter", name="a")


def adapter_check(where: Path) -> None:
    model = pk.load_adapter(linear(256), where / "adapter")
    assert pk.adapters(model)["a"].config.r == 1


def checkpoint_save(where: Path, size: str) -> None:
    width = 8 if size == "small" else 512 * 512
    params = {"w": torch.ones(width)}
    state = TrainerState(step=1 if size == "small" else 2)
    save_checkpoint(where, state, params, None, {"m": torch.zeros(width)}, TrainConfig(keep_checkpoints=2))


def checkpoint_check(where: Path) -> None:
    path = intact_checkpoint(where, {"w": (8,)})
    assert path is not None and path.name == "step-1"


def merged_save(where: Path, size: str) -> None:
    save_folder(tiny_llama(16 if size == "small" else 256), None, where / "merged")


def merged_check(where: Path) -> None:
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(where / "merged").config.hidden_size == 16


def fed_save(where: Path, size: str) -> None:
    """A federated server's store of a round: its metrics row, the report, the global adapter."""
    rows = 1 if size == "small" else 40_000
    append_row(where, {"round": rows, "loss": 0.5, "note": "x" * (1 if size == "small" else 64)})
    write_report(where, {"rounds": [{"round": i, "loss": 0.5} for i in range(rows)]})
    adapter_save(where, size)


def fed_check(where: Path) -> None:
    assert len(json.loads((where / "report.json").read_text())["rounds"]) == 1
    lines = (where / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines][0] == 1  # every row whole
    adapter_check(where)


PATHS: dict[str, tuple[Callable[[Path, str], None], Callable[[Path], None]]] = {
    "adapter": (adapter_save, adapter_check),
    "checkpoint": (checkpoint_save, checkpoint_check),
    "merged_export": (merged_save, merged_check),
    "fed_round": (fed_save, fed_check),
}


def partial_files(where: Path) -> list[str]:
    """Temp or unlinked copies a failed save could have left under `where`."""
    found = []
    for p in where.rglob("*"):
        if ".petkit-" in p.name:
            found.append(str(p.relative_to(where)))
        elif p.is_symlink() or (p.name.startswith(".") and ".v" in p.name):
            linked = {resolve_folder(q) for q in p.parent.iterdir() if q.is_symlink()}
            if not p.is_symlink() and p not in linked:
                found.append(str(p.relative_to(where)))
    return found


# --- a real small file system ---------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs mounted for the test (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the "
                    "RLIMIT_FSIZE variant covers the same paths")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_disk(disk: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))
    return filler


@pytest.mark.parametrize("path", list(PATHS))
def test_a_full_disk_keeps_the_previous_version(small_disk: Path, path: str) -> None:
    save, check = PATHS[path]
    where = small_disk / "run"
    where.mkdir()
    save(where, "small")
    filler = fill_disk(small_disk, 256 << 10)
    with pytest.raises(DiskFullError, match=f"not enough space in {small_disk}.*needs about"):
        save(where, "big")
    check(where)  # the previous version, intact
    assert partial_files(where) == []
    filler.unlink()
    save(where, "big")  # with space freed, the same save goes through


def test_running_out_in_the_middle_of_a_write_removes_the_partial_folder(small_disk: Path) -> None:
    """No size was announced: the write itself hits ENOSPC."""
    final = small_disk / "blob"
    write_folder(final, lambda tmp: (tmp / "x").write_bytes(b"old"))
    fill_disk(small_disk, 1 << 20)
    with pytest.raises(DiskFullError, match=f"in {small_disk} to save blob.*more than"):
        write_folder(final, lambda tmp: (tmp / "x").write_bytes(b"\0" * (4 << 20)))
    assert (final / "x").read_bytes() == b"old" and partial_files(small_disk) == []


def _cfg(out: Path, **cfg) -> TrainConfig:
    base = {"lr": 1e-2, "progress": False, "label_token_ids": LABEL_IDS, "output_dir": str(out),
            "max_steps": 6, "batch_size": 8, "save_every": 2, "keep_checkpoints": 1}
    return TrainConfig(**{**base, **cfg})


def test_training_resumes_from_the_last_good_checkpoint_once_space_is_freed(small_disk, tmp_path) -> None:
    data = separable(32)
    full = tmp_path / "full"
    train(lora_model(), data, _cfg(full), collate_fn=collate)
    one = sum(p.stat().st_size for p in (full / "checkpoints" / "step-6").iterdir())
    out = small_disk / "run"
    fill_disk(small_disk, one + (112 << 10))  # one checkpoint fits (its need: size + 64 KiB), not two
    with pytest.raises(DiskFullError, match="not enough space.*to save step-"):
        train(lora_model(), data, _cfg(out), collate_fn=collate)
    kept = intact_checkpoint(out)
    assert kept is not None and partial_files(out) == []
    (small_disk / "filler").unlink()
    train(lora_model(), data, _cfg(out, resume=True), collate_fn=collate)
    a = load_file(str(full / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- a file-size limit (runs everywhere) -----------------------------------------------------

CHILD = """
import json, resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import test_enospc as t
from petkit.core.durable import DiskFullError
where, path = Path(sys.argv[1]), sys.argv[2]
save, check = t.PATHS[path]
save(where, "small")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save(where, "big")
    print(json.dumps({"error": None}))
except DiskFullError as err:
    check(where)
    print(json.dumps({"error": str(err), "partial": t.partial_files(where)}))
"""


@pytest.mark.parametrize("path", list(PATHS))
def test_a_file_size_limit_keeps_the_previous_version(tmp_path: Path, path: str) -> None:
    where = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    done = subprocess.run([sys.executable, "-c", CHILD, str(where), path, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] and f"in {where}" in result["error"] and "file-size limit" in result["error"]
    assert result["partial"] == []


def test_write_tensors_is_atomic_follows_the_umask_and_keeps_the_old_file_when_full(
        tmp_path: Path) -> None:
    """The writer continual and bench outputs use instead of safetensors' 0600 `save_file`."""
    import torch
    from safetensors.torch import load_file

    from petkit.core.disk_full import write_tensors

    path = tmp_path / "routing.safetensors"
    old = os.umask(0o022)
    try:
        write_tensors(path, {"w": torch.ones(3)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert torch.equal(load_file(path)["w"], torch.ones(3))
    code = f"""
import resource, signal, sys, torch
from petkit.core.disk_full import write_tensors
from petkit.core.disk_full import DiskFullError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    write_tensors({str(path)!r}, {{"w": torch.zeros(100_000)}})
except DiskFullError as err:
    print("full:", err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "full:" in done.stdout, done.stderr[-1000:]
    assert torch.equal(load_file(path)["w"], torch.ones(3))  # the previous file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.safetensors"]
