"""Ways to run a federation: Flower's simulation engine in this process (default), Flower's
deployment engine (a SuperLink and SuperNodes as separate processes or machines), and the
centralised baseline with the same method, data and step budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from petkit.core.errors import MissingPackageError, PetkitError
from petkit.fed.config import FedRecipe
from petkit.fed.workspace import build_workspace
from petkit.models.packages import dropped_logs, extra_install
from petkit.training.loop import train

Echo = Callable[[str], None]
CONNECTION = "petkit"


# What Flower and Ray print on every simulation whatever the run, unless --verbose: Flower's
# banner for `run_simulation` (petkit runs the simulation in its own process on purpose; `petkit
# fed --deploy` is the `flwr run` path) and Ray's tip about a default it will change (petkit's
# clients ask for no GPU, and Ray's current default of hiding the GPUs from them is what it wants).
_FLOWER_NOISE = (("flwr", "`run_simulation` function is deprecated"),)
_RAY_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"


@contextlib.contextmanager
def _quiet_flower(verbose: bool) -> Iterator[None]:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home from offline runs
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if verbose:
        yield
        return
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with warnings.catch_warnings(), dropped_logs(_FLOWER_NOISE):
        warnings.filterwarnings("ignore", message=_RAY_TIP, category=FutureWarning)
        yield


def _read_report(recipe: FedRecipe) -> dict[str, Any]:
    path = recipe.output_dir.resolve() / "report.json"
    if not path.is_file():
        raise PetkitError(f"the federated run wrote no {path}; see the log above and "
                          f"{path.parent / 'fed.log'}")
    return json.loads(path.read_text(encoding="utf-8"))


def _clear_report(recipe: FedRecipe) -> None:
    (recipe.output_dir.resolve() / "report.json").unlink(missing_ok=True)


def run_simulation(recipe: FedRecipe, verbose: bool = False) -> dict[str, Any]:
    """All clients as virtual Flower SuperNodes on this machine (Ray backend, `fed.workers`
    worker processes of one CPU each); the ServerApp runs in this process. Returns the report."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise MissingPackageError("Flower's simulation engine needs Ray: pip install 'flwr[simulation]' "
                                  "(or run the clients as processes: petkit fed --deploy ADDRESS)")
    from flwr.simulation import run_simulation as flower_simulation

    from petkit.fed.client import make_client_app  # optional package: client and server import flwr
    from petkit.fed.server import make_server_app

    _clear_report(recipe)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": recipe.fed.workers, "num_gpus": 0, "include_dashboard": False,
                             "log_to_driver": verbose, "logging_level": "error"}}
    with _quiet_flower(verbose):
        flower_simulation(server_app=make_server_app(recipe), client_app=make_client_app(recipe),
                          num_supernodes=recipe.fed.clients, backend_config=backend,
                          verbose_logging=verbose)
    return _read_report(recipe)


def write_app(recipe: FedRecipe, folder: Path) -> Path:
    """A Flower App folder (pyproject.toml) whose run config carries the whole recipe."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "petkit-fed", "version": "1.0.0", "license": "Apache-2.0",
                    "description": "petkit federated delta tuning", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "petkit",
            "components": {"serverapp": "petkit.fed.app:server_app",
                           "clientapp": "petkit.fed.app:client_app"},
            "config": {"recipe-yaml": recipe.to_yaml()}}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return folder


def write_connection(home: Path, address: str) -> Path:
    """A Flower CLI home (FLWR_HOME) whose config names the SuperLink at `address`."""
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "insecure": True}}}
    (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    return home


def run_deployment(recipe: FedRecipe, address: str, echo: Echo = print,
                   timeout: float | None = None) -> dict[str, Any]:
    """Submit the run to a running SuperLink at `address` with `flwr run`; wait; return the report.

    The SuperLink and one SuperNode per client must be up (see docs/federated.md). The output
    folder must be reachable by the ServerApp (same machine, or an absolute shared path).
    """
    beside = Path(sys.executable).parent / "flwr"  # the interpreter's own environment first
    flwr = str(beside) if beside.is_file() else shutil.which("flwr")
    if flwr is None:
        raise MissingPackageError(f"the `flwr` command is missing: {extra_install('fed')}")
    out = recipe.output_dir.resolve()
    recipe = FedRecipe(dataclasses.replace(recipe.recipe, train=recipe.recipe.train.replace(
        output_dir=str(out))), recipe.fed)
    app = write_app(recipe, out / "flower-app")
    home = write_connection(out / "flower-home", address)
    _clear_report(recipe)
    echo(f"flwr run {app} {CONNECTION} --stream   (FLWR_HOME={home}, SuperLink {address})")
    started = time.time()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([flwr, "run", str(app), CONNECTION, "--stream"], env=env, timeout=timeout,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PetkitError(f"flwr run failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}")
    report = _read_report(recipe)
    report["wall_seconds"] = time.time() - started
    report["flwr_output"] = proc.stdout[-4000:]
    return report


def run_centralised(recipe: FedRecipe, echo: Echo = print) -> dict[str, Any]:
    """The same method trained on the pooled clients' training splits for the same number of
    optimiser steps (rounds x sampled clients x local steps); test metrics before and after."""
    ws = build_workspace(recipe, "server")
    pooled = [e for pid in range(recipe.fed.clients) for e in ws.client_data(pid)[0]]
    steps = recipe.fed.rounds * recipe.fed.sampled * (recipe.recipe.train.max_steps or 1)
    config = ws.local_config(0, 0).replace(max_steps=steps, epochs=None, seed=recipe.recipe.train.seed,
                                           progress=True)
    before = ws.evaluate(ws.prep.test)
    echo(f"centralised: {steps} steps on {len(pooled)} pooled examples")
    started = time.time()
    train(ws.model, pooled, config, pad_id=ws.prep.pad_id)
    after = ws.evaluate(ws.prep.test)
    return {"steps": steps, "examples": len(pooled), "before": before, "after": after,
            "seconds": time.time() - started}
