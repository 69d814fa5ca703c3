"""`--report-to tensorboard|mlflow`: what the trackers recorded for a short run, read back with
TensorBoard's own event reader and MLflow's client, equals the run's metrics.jsonl; without a
tracker package the run stops before its first step with the pip command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from petkit.core.errors import ConfigError, MissingPackageError
from petkit.models.packages import extra_packages
from petkit.training import TrainConfig
from petkit.training import tracking
from test_train import lora_model, run, separable

ROOT = Path(__file__).resolve().parent.parent


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Same steps, same values (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in want] and \
        [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def _short_run(folder: Path, report_to: str) -> list[dict[str, Any]]:
    (folder / "recipe.yaml").write_text("model: {name: tiny-llama}\nmethod: {name: lora, r: 4}\n")
    data = separable(40)
    run(lora_model(), data[:32], data[32:], output_dir=str(folder), eval_every=4, log_every=2,
        report_to=report_to)
    return _rows(folder)


def test_tensorboard_events_hold_each_logged_number(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _short_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("train_loss", "lr", "eval_accuracy"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert _same(got, _series(rows, key)), key
    assert [s for s, _ in _series(rows, "train_loss")] == [2, 4, 6, 8, 10, 12]
    [text] = events.Tensors("params/text_summary")
    summary = text.tensor_proto.string_val[0].decode()
    assert "| train.lr | 0.01 |" in summary and "| method.r | 4 |" in summary
    assert "| model.name | tiny-llama |" in summary
    assert (tmp_path / "training.png").is_file() and (tmp_path / "train.log").is_file()


def test_mlflow_file_store_holds_metrics_params_and_files(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: opt in to the file store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "petkit-test")
    folder = tmp_path / "run"
    folder.mkdir()
    rows = _short_run(folder, "mlflow")
    client = MlflowClient(store)
    [found] = client.search_runs([client.get_experiment_by_name("petkit-test").experiment_id])
    run_id = found.info.run_id
    for key in ("train_loss", "lr", "eval_accuracy"):
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert _same(sorted(got), _series(rows, key)), key
    params = found.data.params
    assert params["train.lr"] == "0.01" and params["train.max_steps"] == "12"
    assert params["method.r"] == "4" and params["model.name"] == "tiny-llama"
    assert params["train.report_to"] == "mlflow"
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    files = {a.path for a in client.list_artifacts(run_id)}
    assert files == {"recipe.yaml", "metrics.jsonl", "training.png"}


@pytest.mark.parametrize("value,expected", [
    ("tensorboard", "tensorboard"), ("mlflow, TensorBoard", "mlflow,tensorboard"),
    (["tensorboard", "mlflow", "tensorboard"], "tensorboard,mlflow"), ("", ""), (None, "")])
def test_report_to_takes_a_comma_list_or_a_list(value: Any, expected: str) -> None:
    assert TrainConfig(report_to=value).report_to == expected
    assert TrainConfig.from_json(TrainConfig(report_to=value).to_json()).report_to == expected


def test_unknown_tracker_is_a_config_error_with_close_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord' \(did you mean "
                                          r"'tensorboard'\?\); known: tensorboard, mlflow"):
        TrainConfig(report_to="tensorbord")


def test_tensorboard_needs_a_run_folder() -> None:
    pytest.importorskip("tensorboard")
    with pytest.raises(ConfigError, match="output_dir"):
        run(lora_model(), separable(8), report_to="tensorboard")


@pytest.mark.parametrize("name", tracking.TRACKERS)
def test_missing_tracker_package_names_the_pip_install(name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("petkit.models.packages.find_spec",
                        lambda module: None if module == name else object())
    with pytest.raises(MissingPackageError, match=rf"--report-to {name} needs '{name}'\. "
                                                  rf"Fix: pip install .*"):
        run(lora_model(), separable(8), output_dir=str(tmp_path), report_to=name)
    assert not (tmp_path / "metrics.jsonl").exists()  # stopped before the first step
    assert extra_packages(name)


def test_cli_flag_sets_the_recipe_key() -> None:
    """`--report-to a,b` is `train.report_to` (the CLI's error speaks in the flag)."""
    proc = subprocess.run([sys.executable, "-m", "petkit", "train", "--report-to", "wandb",
                           "--steps", "1"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**__import__("os").environ,
                                         "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    assert "--report-to: unknown tracker 'wandb'" in proc.stderr + proc.stdout
