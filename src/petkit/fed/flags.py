"""The flags of `petkit fed`, apart from what runs them: `petkit --help` builds its parser from
this module, which imports nothing optional (Flower, Ray and dp-accounting load only when
`petkit fed` runs; keep it that way: tests/test_first_hour.py builds the parser without them).
"""

from __future__ import annotations

import argparse

from petkit.app.aliases import ALIASES

DEFAULT_RECIPE = "minilm-bbc-noniid"
# Named flags and the field each sets: the federation's own (its `fed` section), then the recipe
# sections' from the one table of short flags (app/aliases.py; `--local-steps` is its `steps`);
# any other field is --section.field=value.
FLAGS = {"clients": "fed.clients", "rounds": "fed.rounds", "fraction": "fed.fraction",
         "alpha": "fed.alpha", "strategy": "fed.strategy", "mu": "fed.proximal_mu",
         "dp_clip": "fed.dp_clip", "dp_noise": "fed.dp_noise", "dp_delta": "fed.dp_delta",
         "workers": "fed.workers", "seed": "fed.seed", "compress": "fed.compress",
         "compress_down": "fed.compress_down", "local_steps": ALIASES["steps"],
         **{name: ALIASES[name] for name in ("lr", "method", "model", "data", "output")}}
HELP = {"clients": "number of clients N", "rounds": "federated rounds", "alpha": "Dirichlet concentration",
        "fraction": "share of clients trained per round", "strategy": "fedavg | fedprox",
        "mu": "FedProx proximal weight", "dp_clip": "clip each client update to this L2 norm (DP)",
        "dp_noise": "Gaussian noise multiplier z (DP)", "dp_delta": "delta of the reported epsilon",
        "workers": "simulation worker processes", "local_steps": "local optimiser steps per round",
        "compress": "client updates: none | int8 | topk:P (error feedback on the client)",
        "compress_down": "the global delta as broadcast: none | int8"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `petkit fed` flags."""
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="federated YAML recipe or shipped name")
    for name in FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            help=HELP.get(name, f"sets {FLAGS[name]}"))
    parser.add_argument("--iid", action="store_true", help="IID partition instead of Dirichlet")
    parser.add_argument("--personal", action="store_true", help="a private local adapter per client")
    parser.add_argument("--centralised", action="store_true",
                        help="also train the centralised baseline (same steps, pooled data)")
    parser.add_argument("--deploy", metavar="ADDRESS", help="submit to a running SuperLink (flwr run)")
    parser.add_argument("--verbose", action="store_true", help="Flower's and Ray's own logs too")
