"""Federated parameter-efficient tuning on Flower: only the adapter's delta travels.

    from petkit.fed import load_fed_recipe, run_simulation
    report = run_simulation(load_fed_recipe("minilm-bbc-noniid"))

Modules: config (FedConfig, FedRecipe), partition (IID / Dirichlet), payload (delta <-> Flower
ArrayRecord, update checks), aggregate (FedAvg, DP-FedAvg), privacy (accountant), prox (FedProx),
workspace (model + data per process), client / server / strategy (the Flower apps), run
(simulation, deployment, centralised baseline), report, cli (`petkit fed`).
"""

from __future__ import annotations

from typing import Any

from petkit.fed.aggregate import dp_average, weighted_average
from petkit.fed.config import FedConfig, FedRecipe, apply_fed_overrides, fed_recipe_from_dict, load_fed_recipe
from petkit.fed.partition import ClientShare, partition

_LAZY = {"run_simulation": "run", "run_deployment": "run", "run_centralised": "run",
         "make_client_app": "client", "make_server_app": "server", "PetStrategy": "strategy"}


def __getattr__(name: str) -> Any:  # Flower and torch load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"petkit.fed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'petkit.fed' has no attribute {name!r}")


__all__ = ["ClientShare", "FedConfig", "FedRecipe", "PetStrategy", "apply_fed_overrides", "dp_average",
           "fed_recipe_from_dict", "load_fed_recipe", "make_client_app", "make_server_app", "partition",
           "run_centralised", "run_deployment", "run_simulation", "weighted_average"]
