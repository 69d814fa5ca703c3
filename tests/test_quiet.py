"""Quiet by default: the noise optional packages print (torchao and torch's pytree on a model
import, Flower's banner and Ray's tip on `petkit fed`, torchrun's banner and the job's raw report
on `--nproc`) is left out, narrowly: other records of the same loggers still show, and
`--verbose` shows everything."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from petkit.models.packages import dropped_logs, quiet_optional_imports
from petkit.training.distributed import JOB_KEYS, launch, report_lines

TESTS = Path(__file__).resolve().parent
REPO_SRC = str(TESTS.parent / "src")


class LogLines(logging.Handler):
    """Keeps the messages of the records it receives (attach it to one logger)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logged(name: str, *messages: str) -> list[str]:
    """What a handler on logger `name` receives of `messages` logged as warnings there."""
    logger, handler = logging.getLogger(name), LogLines()
    logger.addHandler(handler)
    try:
        for message in messages:
            logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return handler.lines


def test_import_noise_is_dropped_by_message_and_only_inside() -> None:
    so = "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library"
    enum = "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by ..."
    with quiet_optional_imports():
        assert _logged("torchao", so, "torchao: something else") == ["torchao: something else"]
        assert _logged("torch.utils._pytree", enum) == []
    assert _logged("torchao", so) == [so]  # outside: untouched
    with dropped_logs([("a.b", "xyz")]):
        assert _logged("a.b", "1 xyz 2", "abc") == ["abc"]
        assert _logged("a", "1 xyz 2") == ["1 xyz 2"]  # another logger: untouched


def _python(code: str, *args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        REPO_SRC, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # a fresh interpreter: torchao logs only on its first import
def test_a_vision_model_imports_without_torchao_or_pytree_lines() -> None:
    pytest.importorskip("torchao")  # the noise comes with it (the test and quant extras)
    proc = _python("from petkit.models.vision import tiny_vision_model; tiny_vision_model()\n"
                   "import torchao, sys; print('torchao' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"  # torchao was imported, silently
    assert "Failed to load" not in proc.stderr and "Enum subclass" not in proc.stderr, proc.stderr


def test_flower_banner_and_ray_tip_are_dropped_unless_verbose() -> None:
    pytest.importorskip("flwr")  # petkit.fed's modules import it
    from petkit.fed.run import _quiet_flower

    banner = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed"
              " in a future version of Flower.")
    tip = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible "
           "devices env var if num_gpus=0 or num_gpus=None (default).")
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _quiet_flower(verbose):
                flwr = _logged("flwr", banner, "round 1 failed")
                warnings.warn(tip, FutureWarning)
                warnings.warn("another future change", FutureWarning)
        shown = [str(w.message) for w in caught]
        assert flwr == ([banner] if verbose else []) + ["round 1 failed"]
        assert shown == ([tip] if verbose else []) + ["another future change"]


def test_launch_gives_torchrun_one_thread_per_process_unless_verbose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun prints its OMP_NUM_THREADS banner when it sets the variable itself."""
    import petkit.training.ranks as ranks_module

    envs: list[dict[str, str]] = []
    monkeypatch.setattr(ranks_module.subprocess, "call", lambda cmd, env: envs.append(env) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launch(2, ["train"])
    launch(2, ["train", "--verbose"], verbose=True)
    launch(1, ["train"])
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    launch(2, ["train"])
    assert [e.get("OMP_NUM_THREADS") for e in envs] == ["1", None, None, "4"]


def test_the_job_report_is_one_line_unless_verbose() -> None:
    report = {"updates_per_layer": [3, 1], "world_size": 2, "distributed": "ddp",
              "collective_bytes_per_step": 8.0, "grad_bytes_per_step": 8852.0,
              "reduced_tensors": 10}
    assert set(JOB_KEYS) < set(report)
    assert report_lines(report) == ["updates_per_layer: [3, 1]",
                                    "2 processes (ddp); --verbose shows the bytes they exchanged"]
    assert report_lines(report, verbose=True) == [f"{k}: {v}" for k, v in report.items()]
    assert report_lines({"updates_per_layer": [1]}) == ["updates_per_layer: [1]"]


@pytest.mark.slow  # two torchrun processes load a tiny BERT
def test_nproc_run_prints_no_torchrun_banner_nor_raw_report(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from toys import save_tiny_bert

    model = save_tiny_bert(tmp_path / "bert")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        REPO_SRC, os.environ.get("PYTHONPATH")]))}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "petkit", "train", "--nproc", "2", "--model", model, "--data",
         "bbc-news", "--task-type", "head", "--steps", "1", "--train-size", "8", "--test-size",
         "4", "--max-length", "16", "--output", str(tmp_path / "run"), "--train.progress=false"],
        env=env, capture_output=True, text=True, timeout=280)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "*****" not in text and "OMP_NUM_THREADS" not in text, text
    assert "world_size:" not in text and "2 processes (ddp)" in proc.stdout, text
