"""Experiment trackers behind the run's monitor (`TrainConfig.report_to`, `--report-to`).

    petkit train --report-to tensorboard          # events in OUTPUT/tensorboard
    petkit train --report-to tensorboard,mlflow   # and an MLflow run (OUTPUT/mlflow.db)

Each metrics row the monitor writes to `metrics.jsonl` and `train.log` also goes to every tracker,
under the same names (`train_loss`, `lr`, `eval_accuracy`, ...) at its step; the run's settings
go once at the start: the `TrainConfig` fields as `train.<field>`, and the sections of the run
folder's `recipe.yaml` (which `petkit train` writes before training) as `<section>.<field>`.
TensorBoard (`pip install petkit[tensorboard]`) gets them as a text summary; MLflow
(`petkit[mlflow]`) as the run's params, with `recipe.yaml`, `metrics.jsonl` and `training.png`
as artifacts when the run ends. MLflow writes to `MLFLOW_TRACKING_URI` when it is set, else to
the SQLite store `OUTPUT/mlflow.db` (`mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow.db`).
Both packages are imported only when a run asks for them; without one, the run stops before its
first step with the pip command to run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import yaml

from petkit.core.errors import ConfigError, did_you_mean
from petkit.models.packages import extra_packages, require_module

TRACKERS = ("tensorboard", "mlflow")
ARTIFACTS = ("recipe.yaml", "metrics.jsonl", "training.png")
PARAM_CHARS = 500  # MLflow's oldest limit on a param's value


class Tracker(Protocol):
    """Receives a run's settings once, then its metric rows."""

    def log(self, row: dict[str, Any]) -> None:
        """Record the numbers of one metrics row at `row["step"]`."""
        ...

    def close(self) -> None:
        """Flush and finish (the run folder's files are complete by now)."""
        ...


def tracker_names(value: str | Iterable[str] | None) -> str:
    """`value` ("tensorboard,mlflow", a list, "" or None) as a comma-separated string of known
    tracker names; ConfigError naming `--report-to` otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"TrainConfig.report_to: unknown tracker {name!r}"
                              f"{did_you_mean(name, TRACKERS)}; known: {', '.join(TRACKERS)}")
    return ",".join(dict.fromkeys(names))


def run_params(config: dict[str, Any], output_dir: Path | None) -> dict[str, str]:
    """The run's settings as flat `section.field` strings: the train config, and the other
    sections of `output_dir/recipe.yaml` when the run folder has one."""
    sections: dict[str, Any] = {}
    recipe = output_dir / "recipe.yaml" if output_dir is not None else None
    if recipe is not None and recipe.is_file():
        sections.update(yaml.safe_load(recipe.read_text(encoding="utf-8")) or {})
    sections["train"] = config
    return dict(_flatten(sections))


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, json.dumps(value) if not isinstance(value, str) else value


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Scalars and a text summary of the settings in `output_dir/tensorboard`."""

    def __init__(self, output_dir: Path, params: dict[str, str], initial: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # a resumed run drops the events an interrupted run wrote after its checkpoint
        self.writer = SummaryWriter(str(output_dir / "tensorboard"),
                                    purge_step=initial or None)
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("params", "| setting | value |\n|---|---|\n" + table, initial)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per training run: params, metrics per step, the run folder's files."""

    def __init__(self, output_dir: Path | None, params: dict[str, str],
                 history: list[dict[str, Any]]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            f"sqlite:///{(output_dir / 'mlflow.db').resolve()}" if output_dir else None)
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "petkit")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        run_name = output_dir.name if output_dir is not None else None
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        self.output_dir = output_dir
        self.client.log_batch(self.run_id, params=[Param(k, v[:PARAM_CHARS])
                                                   for k, v in params.items()])
        for row in history:  # a resumed run: the rows up to its checkpoint, in this new run
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(row["step"]))
                                                    for k, v in _numbers(row).items()])

    def close(self) -> None:
        for name in ARTIFACTS:
            path = self.output_dir / name if self.output_dir is not None else None
            if path is not None and path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


def open_trackers(report_to: str, output_dir: Path | None, config: dict[str, Any],
                  initial: int, history: list[dict[str, Any]]) -> list[Tracker]:
    """The trackers `report_to` names, opened for a run at step `initial` (MissingPackageError
    with the pip command when a package is absent; ConfigError when TensorBoard has no folder)."""
    names = [n for n in report_to.split(",") if n]
    for name in names:
        require_module(name, extra_packages(name), f"--report-to {name}")
    if "tensorboard" in names and output_dir is None:
        raise ConfigError("TrainConfig.report_to=tensorboard writes its events into the run "
                          "folder: set TrainConfig.output_dir")
    params = run_params(config, output_dir) if names else {}
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            assert output_dir is not None
            trackers.append(TensorBoardTracker(output_dir, params, initial))
        else:
            trackers.append(MlflowTracker(output_dir, params, history))
    return trackers
