"""Sharded saves: under FSDP2 the delta itself is sharded across ranks (each holds a slice of
every LoRA matrix); the adapter rank 0 saves holds every tensor whole, equal to the one-process
run's (the field's data-loss bug, accelerate#4206, saved each tensor from rank 0's shard only).
A rank killed during the save leaves the previous adapter intact and loadable.

2-process gloo runs on the CPU, slow-marked like tests/test_distributed.py; this file is also
the worker (`python test_sharded_save.py '<spec json>'` under torchrun).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import petkit as pk  # noqa: E402
from dist_worker import build, data  # noqa: E402
from petkit.models import tiny_model  # noqa: E402

# lr 1e-30 (0 is refused): training leaves the (perturbed, seeded) delta as it is, so the 2-rank adapter must equal
# the 1-process one bit for bit; what is tested is the save of a sharded delta, not the training.
TRAIN = {"lr": 1e-30, "max_steps": 2, "batch_size": 6, "progress": False, "seed": 0}


def model_for(spec: dict[str, Any]) -> torch.nn.Module:
    """`dist_worker.build` with every delta tensor set to seeded non-zero values (LoRA's B
    starts at zero, which would hide a shard saved as zeros)."""
    model = build(spec)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(pk.trainable_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _kill_self(*_: Any, **__: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _half_write_then_die(tensors: dict[str, torch.Tensor], path: str, **_: Any) -> None:
    with open(path, "wb") as fh:
        fh.write(b"\0" * 1000)  # a partial tensor file, then the process dies
    _kill_self()


def worker(spec: dict[str, Any]) -> None:
    """One rank: train (lr ~0) under FSDP2 and save the adapter; report whether the delta was
    sharded; die where spec["kill"] says ({"rank": r, "at": "write" | "gather"})."""
    from petkit.core import io as adapter_io
    from petkit.training import distributed
    from petkit.training.distributed import cleanup, init_from_env, rank

    init_from_env()
    kill = spec.get("kill") or {}
    if kill.get("rank") == rank():
        if kill["at"] == "write":
            adapter_io.save_file = _half_write_then_die
        else:
            distributed.full_parameters = _kill_self
    model = model_for(spec)
    pk.train(model, data(), pk.TrainConfig(**spec["train"]))
    params = pk.trainable_parameters(model).values()
    sharded = all(distributed._is_dtensor(p) and p.to_local().numel() < p.numel() for p in params
                  if p.shape[0] > 1)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank()}.json").write_text(json.dumps({"sharded": sharded}))
    cleanup()


def one_process(out: Path) -> dict[str, torch.Tensor]:
    model = model_for({})
    pk.train(model, data(), pk.TrainConfig(**TRAIN, output_dir=str(out)))
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def fsdp_spec(out: Path, **extra: Any) -> dict[str, Any]:
    return {"out": str(out), "train": {**TRAIN, "output_dir": str(out / "run"),
                                       "distributed": "fsdp"}, **extra}


def torchrun_self(spec: dict[str, Any]):
    from test_distributed import torchrun
    import test_distributed
    previous, test_distributed.WORKER = test_distributed.WORKER, Path(__file__)
    try:
        return torchrun([spec], timeout=400, rerun_crash=False)
    finally:
        test_distributed.WORKER = previous


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sharded_delta_is_saved_whole_and_equal_to_one_process(tmp_path: Path) -> None:
    reference = one_process(tmp_path / "one")
    out = tmp_path / "fsdp"
    done = torchrun_self(fsdp_spec(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(json.loads((out / f"rank{r}.json").read_text())["sharded"] for r in range(2))
    saved = load_file(str(out / "run" / "adapter" / "adapter.safetensors"))
    assert saved.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(saved[key], tensor), key
    pk.load_adapter(tiny_model("llama", seed=0)[0], out / "run" / "adapter")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kill", [{"rank": 0, "at": "write"}, {"rank": 1, "at": "gather"}],
                         ids=["writer-mid-write", "other-rank-at-gather"])
def test_a_rank_killed_during_the_save_keeps_the_previous_adapter(tmp_path: Path, kill) -> None:
    previous = one_process(tmp_path / "one")
    out = tmp_path / "fsdp"
    (out / "run").mkdir(parents=True)
    pk.save_adapter(pk.load_adapter(tiny_model("llama", seed=0)[0], tmp_path / "one" / "adapter"),
                    out / "run" / "adapter", name="default")
    done = torchrun_self(fsdp_spec(out, kill=kill, train={**TRAIN, "output_dir": str(out / "run"),
                                                           "distributed": "fsdp", "lr": 1e-2}))
    assert done.returncode != 0  # the job failed
    model = pk.load_adapter(tiny_model("llama", seed=0)[0], out / "run" / "adapter")
    kept = pk.adapter_state(model, "default")
    assert all(torch.equal(kept[k], previous[k]) for k in previous)
    leftovers = [p.name for p in (out / "run").iterdir()
                 if p.name.startswith(".adapter") and p != (out / "run" / "adapter").resolve()]
    assert leftovers == []  # the load above cleaned what the killed save left


if __name__ == "__main__":
    worker(json.loads(sys.argv[1])[0])
