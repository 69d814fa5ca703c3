"""Pre-trained PET modules (PVP, Hu et al.'s "pre-trained prompts") inside the grid.

An arm with `pretrain: {classes: [...], train: {...}, seed: 0}` first trains its own method on
those classes of the task's training split (a source task with its own new head), then every
cell of the arm starts from that delta, head excluded (a new head is drawn per cell). The source
run reads no test example and has no validation split. It runs once per grid: its tensors are
kept as `pretrain/<arm>-<hash>.safetensors` in the run folder, so a resumed grid reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from petkit.core.disk_full import write_tensors
from petkit.benchmark.arms import ArmContext, PetkitArm, transferable_state
from petkit.benchmark.spec import BenchSpec, Cell, TaskSpec, resolved_options, set_train_fields
from petkit.benchmark.tasks import LoadedTask
from petkit.training import train


def source_task(cell: Cell) -> TaskSpec:
    """The task the arm pre-trains on: the cell's task restricted to `pretrain.classes`."""
    pre = cell.arm.pretrain
    return dataclasses.replace(cell.task, name=f"{cell.task.name}@{cell.arm.name}-source",
                               classes=tuple(pre["classes"]))


def _cache_path(cell: Cell, spec: BenchSpec, folder: Path) -> Path:
    blob = {"task": dataclasses.asdict(source_task(cell)), "method": resolved_options(cell.arm),
            "train": set_train_fields(spec.pretrain_config(cell))}
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
    return folder / f"{cell.arm.name}-{digest[:16]}.safetensors"


def pretrained_delta(cell: Cell, spec: BenchSpec, source: LoadedTask,
                     folder: Path) -> dict[str, torch.Tensor]:
    """The arm's delta trained on the source task (read from `folder` when already there)."""
    from safetensors.torch import load_file

    path = _cache_path(cell, spec, folder)
    if path.is_file():
        return load_file(str(path))
    config = spec.pretrain_config(cell)
    started = time.perf_counter()
    model = source.fresh_model(config.seed)
    arm = PetkitArm(dataclasses.replace(cell.arm, pretrain={}))
    model = arm.setup(model, ArmContext(source.task_type, source.head_modules, config.seed))
    result = train(model, source.encode(source.pool), config, pad_id=source.pad_id,
                   parameters=arm.parameters(model), collate_fn=source.collate)
    tensors = transferable_state(model, source.head_modules)
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(path, tensors)
    info = {"arm": cell.arm.name, "classes": list(cell.arm.pretrain["classes"]),
            "n_train": len(source.pool), "steps": result.steps,
            "seconds": round(time.perf_counter() - started, 1)}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return tensors
