"""`petkit fed`: flags -> federated recipe -> Flower simulation (default) or deployment; print.

    petkit fed                                          # shipped recipe minilm-bbc-noniid
    petkit fed --clients 10 --rounds 5 --alpha 0.1 --strategy fedprox --mu 0.05
    petkit fed --personal --dp-clip 1.0 --dp-noise 0.8 --dp-delta 1e-5
    petkit fed --compress topk:0.1                      # sparsified updates, error feedback
    petkit fed --centralised                            # also train the pooled baseline
    petkit fed --deploy 127.0.0.1:9190                  # SuperLink + SuperNodes already running
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from petkit.fed import run
from petkit.fed.config import FedRecipe, apply_fed_overrides, load_fed_recipe
# The flags live apart (fed.flags imports nothing optional), so `petkit --help` needs no Flower.
from petkit.fed.flags import DEFAULT_RECIPE, FLAGS, HELP, add_arguments  # noqa: F401
from petkit.fed.partition import ClientShare, report as partition_table
from petkit.fed.report import write_report

Echo = Callable[[str], None]


def fed_recipe(args: argparse.Namespace, dotted: dict[str, str]) -> FedRecipe:
    """Recipe from --recipe, then named flags, then dotted overrides."""
    named = {FLAGS[k]: str(v) for k, v in vars(args).items() if k in FLAGS and v is not None}
    if args.iid:
        named["fed.partition"] = "iid"
    if args.personal:
        named["fed.personal"] = "true"
    return apply_fed_overrides(load_fed_recipe(args.recipe), {**named, **dotted})


class _Echo(logging.Handler):
    def __init__(self, echo: Echo) -> None:
        super().__init__(logging.INFO)
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        with tqdm.external_write_mode():  # the line goes above the rounds' progress bar
            self.echo(("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage())


def run_command(args: argparse.Namespace, dotted: dict[str, str], echo: Echo) -> dict[str, Any]:
    """Run `petkit fed`; returns the report (with "centralised" when asked)."""
    from petkit.fed.strategy import LOG  # optional package: strategy imports flwr at module level

    recipe = fed_recipe(args, dotted)
    fed = recipe.fed
    extras = [f"alpha={fed.alpha}" if fed.partition == "dirichlet" else "", fed.strategy,
              "personal" if fed.personal else "",
              f"DP clip={fed.dp_clip} z={fed.dp_noise}" if fed.dp_clip is not None else ""]
    echo(f"{recipe.recipe.method_name} on {recipe.recipe.model.name} + {recipe.recipe.data.name}: "
         f"{fed.clients} clients, {fed.rounds} rounds, {fed.sampled} per round, {fed.partition} "
         + ", ".join(e for e in extras if e))
    handler = _Echo(echo)
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        report = (run.run_deployment(recipe, args.deploy, echo) if args.deploy
                  else run.run_simulation(recipe, verbose=args.verbose))
    finally:
        LOG.removeHandler(handler)
    shares = [ClientShare(p["client"], tuple(range(p["examples"])), tuple(p["histogram"]))
              for p in report["partition"]]
    echo(partition_table(shares, report["label_names"]))
    _summary(report, echo)
    if args.centralised:
        report["centralised"] = run.run_centralised(recipe, echo)
        echo(f"centralised ({report['centralised']['steps']} steps): {report['centralised']['after']}")
        _write(recipe, report)
    return report


def _summary(report: dict[str, Any], echo: Echo) -> None:
    rounds, t = report["rounds"], report["totals"]
    first, last = rounds[0], rounds[-1]
    echo(f"test before (untuned): {first.get('test_accuracy', first.get('test_loss'))}  "
         f"after {last['round']} rounds: {last.get('test_accuracy', last.get('test_loss'))}")
    echo(f"delta per message: {report['delta_bytes']:,} bytes ({report['delta_parameters']:,} parameters); "
         f"full model: {report['full_model_bytes']:,} bytes")
    echo(f"sent in total: {t['bytes']:,.0f} bytes vs {t['full_model_bytes']:,.0f} for full-model FedAvg "
         f"({t['saving_factor']:.0f}x less)")
    echo(f"adapter: {report['adapter']}")


def _write(recipe: FedRecipe, report: dict[str, Any]) -> None:
    write_report(recipe.output_dir.resolve(), report)
