"""Federated parameter-efficient tuning on Flower: only the adapter's delta travels.

    from petkit.fed import load_fed_recipe, run_simulation
    report = run_simulation(load_fed_recipe("minilm-bbc-noniid"))

Modules: config (FedConfig, FedRecipe), partition (IID / Dirichlet), payload (delta <-> Flower
ArrayRecord, update checks), aggregate (FedAvg, DP-FedAvg), privacy (accountant), prox (FedProx),
workspace (model + data per process), client / server / strategy (the Flower apps), run
(simulation, deployment, centralised baseline), report, cli (`petkit fed`).
"""

from petkit.core.lazy import lazy_exports

# public name -> the module it lives in; loaded on first use (Flower and torch with the runs)
_EXPORTS = {
    **dict.fromkeys(["dp_average", "weighted_average"], "petkit.fed.aggregate"),
    **dict.fromkeys(["FedConfig", "FedRecipe", "apply_fed_overrides", "fed_recipe_from_dict",
                     "load_fed_recipe"], "petkit.fed.config"),
    **dict.fromkeys(["ClientShare", "partition"], "petkit.fed.partition"),
    **dict.fromkeys(["run_simulation", "run_deployment", "run_centralised"], "petkit.fed.run"),
    "make_client_app": "petkit.fed.client", "make_server_app": "petkit.fed.server",
    "PetStrategy": "petkit.fed.strategy",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
