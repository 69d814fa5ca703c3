"""Training checkpoints: written atomically, rotated safely, verified on load. No pickle.

`output_dir/checkpoints/step-N/` holds
  trainable.safetensors   the trainable (delta) tensors after step N
  best.safetensors        the best-by-validation tensors so far (when there is one)
  state.pt                stepper state (optimiser, scheduler) + torch/numpy RNG, tensors only
                          (`torch.load(weights_only=True)`)
  trainer.json            step, data position, best-so-far, history, python RNG, config, sha256
                          of every other file (written last)
A checkpoint is built in a temp folder, fsynced and renamed into place (`core.durable`), so
`step-N` exists only complete; what a killed save leaves is cleaned by the next save or resume.
Resuming takes the newest checkpoint that reads back intact (warning about each damaged newer
one) and refuses a run whose schedule-defining settings changed (`SCHEDULE`) unless
`TrainConfig.resume_override` is set.
"""

from __future__ import annotations

import io
import json
import random
import warnings
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from petkit.core.durable import clean_folder, write_folder
from petkit.core.errors import AdapterLoadError, CheckpointError, ConfigError
from petkit.core.safetensors_header import check_declared, read_header
from petkit.core.disk import file_sha256
from petkit.training.batching import DataPosition
from petkit.training.config import TrainConfig

FORMAT = 1
# Settings that shape the trajectory; a resume may change them only with `resume_override`.
SCHEDULE = ("max_steps", "epochs", "lr", "head_lr", "schedule", "warmup_steps", "warmup_ratio",
            "weight_decay", "max_grad_norm", "batch_size", "grad_accum", "stepper", "ist")
Tensors = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
TENSOR_FILES = ("trainable.safetensors", "best.safetensors")
# Bounds checked before reading: state.pt within a few copies of the trainable tensors (AdamW
# keeps two moments per tensor) plus RNG states; trainer.json (history rows) within 64 MiB.
STATE_FACTOR, STATE_SLACK, MAX_TRAINER_JSON = 4, 16 << 20, 64 << 20


@dataclass
class TrainerState:
    """Loop bookkeeping saved with every checkpoint."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    best_step: int | None = None
    best_metric: float | None = None
    best_loss: float | None = None
    bad_evals: int = 0
    pending_losses: list[float] = field(default_factory=list)  # since the last log row
    history: list[dict[str, Any]] = field(default_factory=list)


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _rng_tensors() -> Tensors:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"torch": torch.get_rng_state(),
           "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
           "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64)}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    return rng


def _restore_rng(rng: Tensors, python_state: list[Any]) -> None:
    torch.set_rng_state(rng["torch"])
    pos, has_gauss, cached = rng["numpy_extra"].tolist()
    np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), float(cached)))
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available():
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _cpu(tensors: Tensors) -> Tensors:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def checkpoint_dir(output_dir: str | Path) -> Path:
    """The folder holding a run's `step-N` checkpoints."""
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, state: TrainerState, params: Tensors,
                    best: Tensors | None, stepper_state: dict[str, Any],
                    config: TrainConfig) -> Path:
    """Write `step-<state.step>` atomically, then rotate to `config.keep_checkpoints`."""
    root = checkpoint_dir(output_dir)
    blob = io.BytesIO()  # serialised first: its size is known and a full disk is an OSError
    torch.save({"stepper": stepper_state, "rng": _rng_tensors()}, blob)
    tensors = [*params.values(), *(best or {}).values()]
    need = blob.tell() + sum(t.numel() * t.element_size() for t in tensors) + (64 << 10)

    def fill(tmp: Path) -> None:
        save_file(_cpu(params), str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(_cpu(best), str(tmp / "best.safetensors"))
        (tmp / "state.pt").write_bytes(blob.getvalue())
        meta = {"format": FORMAT, "trainer": asdict(state), "config": config.to_dict(),
                "python_rng": list(random.getstate()),
                "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / "trainer.json").write_text(json.dumps(meta))

    final = write_folder(root / f"step-{state.step}", fill, need_bytes=need)
    rotate(root, config.keep_checkpoints)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and (p / "trainer.json").is_file()]
    return sorted(found, key=_step_of)


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` (>= 1) complete checkpoints and stale temp folders."""
    for old in complete_checkpoints(root)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # temp folders of earlier releases
        shutil.rmtree(stale, ignore_errors=True)
    clean_folder(root)


def intact_checkpoint(output_dir: str | Path, expected: Shapes | None = None) -> Path | None:
    """The newest checkpoint whose files read back intact (None when there is none).

    Cleans what a killed save left first. A damaged checkpoint (declared sizes that do not fit
    its files or, given `expected` {tensor: shape}, this model; unreadable; checksum mismatch)
    is skipped with a warning naming it and the next older one is tried; when every one is
    damaged, `CheckpointError`.
    """
    root = checkpoint_dir(output_dir)
    clean_folder(root)
    found, damaged = complete_checkpoints(root), []
    for path in reversed(found):
        try:
            _check_declared(path, expected)
            _read_meta(path)
            _read_files(path)
        except CheckpointError as err:
            damaged.append(path.name)
            warnings.warn(f"checkpoint {path} is damaged ({err}); resuming from an older one",
                          stacklevel=2)
            continue
        return path
    if damaged:
        raise CheckpointError(f"{root}: every checkpoint is damaged ({', '.join(damaged)}); "
                              "start again without resume")
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(checkpoint_dir(output_dir))
    return found[-1] if found else None


def _check_declared(path: Path, expected: Shapes | None) -> None:
    """What the tensor files declare (headers only), before any checksum pass or read: their
    layout against their sizes, names and shapes against `expected`; state.pt's size against
    the trainable tensors' (optimiser moments are a few copies of them)."""
    try:
        data = 0
        for name in TENSOR_FILES:
            file = path / name
            if name == TENSOR_FILES[0] or file.is_file():
                header = read_header(file)
                if expected is not None:
                    check_declared(header, expected, file, float_only=False)
                data = max(data, header.data_bytes)
    except AdapterLoadError as err:
        raise CheckpointError(f"{path}: {err}") from None
    state = path / "state.pt"
    limit = STATE_FACTOR * data + STATE_SLACK
    if state.is_file() and state.stat().st_size > limit:
        raise CheckpointError(f"{path}: state.pt is {state.stat().st_size:,} bytes, more than "
                              f"{STATE_FACTOR}x its {data:,} bytes of trainable tensors allow")


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / "trainer.json"
    try:  # NaN losses are allowed in the history: not the strict adapter JSON reader
        if file.stat().st_size > MAX_TRAINER_JSON:
            raise ValueError(f"{file.stat().st_size:,} bytes, at most {MAX_TRAINER_JSON:,} are read")
        meta = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: unreadable trainer.json ({err})") from None
    if not isinstance(meta, dict) or not {"trainer", "config", "python_rng", "files"} <= set(meta) \
            or not isinstance(meta["files"], dict):
        raise CheckpointError(f"{path}: trainer.json lacks its fields")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    for name, digest in meta.get("files", {}).items():
        file = path / name
        if not file.is_file() or file_sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} is missing or corrupt (checksum mismatch)")
    return meta


def _saved_config(path: Path, meta: dict[str, Any]) -> TrainConfig:
    try:
        with warnings.catch_warnings():  # a checkpoint of an earlier release holds flat keys
            warnings.simplefilter("ignore", DeprecationWarning)
            return TrainConfig.from_dict(meta["config"])
    except (ConfigError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: its training config does not load ({err})") from err


def _check_compatible(path: Path, meta: dict[str, Any], config: TrainConfig,
                      params: Tensors, saved: Tensors) -> None:
    before, override = _saved_config(path, meta), config.resume_override
    for name, value in config.resume_identity().items():  # what no override can change
        saved_value = before.resume_identity()[name]
        if saved_value != value and name not in SCHEDULE:
            raise CheckpointError(f"{path}: saved with {name}={saved_value!r}, "
                                  f"this run has {value!r}")
    old, new = before.to_dict(), config.to_dict()
    changed = [k for k in SCHEDULE if old.get(k) != new.get(k)]
    if changed and not override:
        raise CheckpointError(
            f"{path}: resuming would change {', '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in changed)};"
            " the run would no longer continue the same schedule (resume_override=True / "
            "--resume-override accepts it)")
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"{path}: trainable tensors differ (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")
    for key, value in saved.items():
        if value.shape != params[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)} in the "
                                  f"checkpoint, {tuple(params[key].shape)} in the model")


def _read_files(path: Path) -> tuple[Tensors, Tensors | None, dict[str, Any]]:
    try:
        saved = load_file(str(path / "trainable.safetensors"))
        best_file = path / "best.safetensors"
        best = load_file(str(best_file)) if best_file.is_file() else None
        blob = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as err:  # safetensors/torch raise several types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    return saved, best, blob


def _restore(path: Path, meta: dict[str, Any], loaded: tuple[Tensors, Tensors | None, dict[str, Any]],
             params: dict[str, torch.nn.Parameter], config: TrainConfig
             ) -> tuple[TrainerState, Tensors | None, dict[str, Any]]:
    saved, best, blob = loaded
    _check_compatible(path, meta, config, params, saved)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(saved[key])
    _restore_rng(blob["rng"], meta["python_rng"])
    raw = meta["trainer"]
    state = TrainerState(step=raw["step"], position=DataPosition(**raw["position"]),
                         best_step=raw["best_step"], best_metric=raw["best_metric"],
                         best_loss=raw["best_loss"], bad_evals=raw["bad_evals"],
                         pending_losses=raw["pending_losses"], history=raw["history"])
    return state, best, blob["stepper"]


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter],
                    config: TrainConfig) -> tuple[TrainerState, Tensors | None, dict[str, Any]]:
    """Restore `params` (in place) and the RNG states from `path`.

    Returns the trainer state, the best-so-far tensors and the stepper state.
    Raises `CheckpointError` for a corrupt or incompatible checkpoint.
    """
    _check_declared(path, {k: tuple(p.shape) for k, p in params.items()})
    return _restore(path, _read_meta(path), _read_files(path), params, config)
