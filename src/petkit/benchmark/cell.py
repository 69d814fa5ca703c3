"""One cell of the grid: fresh model, arm, train with validation selection, then — only then —
open the test split and evaluate on it once.

Costs measured per cell: trainable parameters, peak memory (CUDA: peak allocated; CPU: peak
resident memory above the process's level before the cell, sampled every 10 ms, after freed
memory is handed back to the OS), wall time of training and per optimiser step, adapter bytes.
"""

from __future__ import annotations

import ctypes
import gc
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from petkit.benchmark.arms import ArmContext, Finishing, make_arm
from petkit.benchmark.spec import BenchSpec, Cell
from petkit.benchmark.tasks import CellData, LoadedTask
from petkit.compress.measure import stored_bytes
from petkit.core.disk import folder_bytes
from petkit.training import evaluate, train
from petkit.training.batching import total_steps

PAGE = 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * PAGE
    except OSError:  # not Linux: the process's peak so far is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back, so the next cell's baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: peak memory (MiB) used inside it, above the level at entry."""

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        """Measure on `device` (CUDA: allocator stats; else RSS sampled every `interval` s)."""
        self.device, self.interval = device, interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._max = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        _release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._max = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._max, _rss_bytes())
        self.peak_mb = (peak - self._start) / 2**20


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _final_test(model: torch.nn.Module, loaded: LoadedTask, spec: BenchSpec,
                cell: Cell, log_path: Path) -> dict[str, float]:
    """Open this cell's sealed view of the test subset, encode it, evaluate once."""
    test = loaded.test.view()
    test.mark("training and selection done")
    try:
        examples = loaded.encode(list(test.open("final evaluation")))
        size = spec.train_config(cell).eval_batch_size or 32
        return evaluate(model, examples, batch_size=size, pad_id=loaded.pad_id,
                        label_token_ids=loaded.label_token_ids, collate_fn=loaded.collate)
    finally:
        log_path.write_text(json.dumps(test.log, indent=1), encoding="utf-8")


def run_cell(cell: Cell, spec: BenchSpec, loaded: LoadedTask, data: CellData,
             folder: Path, init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train and test one cell (`init`: a pre-trained delta to start from); returns its
    measurements (raises on failure)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = spec.train_config(cell).replace(label_token_ids=loaded.label_token_ids)
    arm = make_arm(cell.arm)
    device = _device()
    started = time.perf_counter()
    with PeakMemory(device) as memory:
        model = loaded.fresh_model(cell.seed).to(device)
        ctx = ArmContext(loaded.task_type, loaded.head_modules, cell.seed, init,
                         total_steps(len(data.train), config))
        model = arm.setup(model, ctx)
        params = arm.parameters(model)
        begun, cpu_begun = time.perf_counter(), time.process_time()
        result = train(model, data.train, config, eval_data=data.validation or None,
                       pad_id=loaded.pad_id, parameters=params, collate_fn=loaded.collate)
        train_s, cpu_s = time.perf_counter() - begun, time.process_time() - cpu_begun
    untrained = 0
    if isinstance(arm, Finishing):  # e.g. pruning: the sliced model is what is tested
        model = arm.finish(model)
        untrained = arm.untrained_parameters()
    test = _final_test(model, loaded, spec, cell, folder / "test_access.json")
    arm.save(model, folder / "adapter")
    trainable = sum(p.numel() for p in params.values()) - untrained
    return {
        "n_train": len(data.train), "n_val": len(data.validation), "n_test": len(loaded.test),
        "metric": loaded.metric, "test_metric": test.get(loaded.metric), "test_loss": test["loss"],
        "best_val_metric": result.best_metric, "best_step": result.best_step,
        "steps": result.steps, "trainable_params": trainable, "base_params": loaded.base_params,
        "trainable_pct": 100.0 * trainable / loaded.base_params,
        "peak_mem_mb": memory.peak_mb, "train_s": train_s,
        "s_per_step": train_s / max(result.steps, 1),
        "cpu_s_per_step": cpu_s / max(result.steps, 1),  # the process's CPU time, all threads
        "adapter_bytes": folder_bytes(folder / "adapter"),
        "model_bytes": stored_bytes(model),
        "cell_s": time.perf_counter() - started,
    }

