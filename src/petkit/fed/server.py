"""The Flower `ServerApp`: run the strategy, evaluate the global delta on the server's test split
after every round (round 0 is the untuned model), write the report and the final adapter.

Output folder (`train.output_dir`): report.json, metrics.jsonl (a row per round), fed.log,
accuracy.png and adapter/ — an ordinary petkit adapter folder (`pk.load_adapter`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from petkit.fed.client import recipe_from_context
from petkit.fed.config import FedRecipe
from petkit.fed.payload import Spec, from_record, load_into, record_bytes, state_of, to_record
from petkit.fed.report import append_row, plot_rounds, round_line, totals, write_report
from petkit.fed.strategy import LOG, PetStrategy
from petkit.fed.workspace import SHARED, Workspace, workspace
from petkit.core.io import save_adapter


class _Run:
    """State of one server run: workspace, strategy, report."""

    def __init__(self, recipe: FedRecipe) -> None:
        self.recipe, self.started = recipe, time.time()
        self.out = recipe.output_dir.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "metrics.jsonl").write_text("", encoding="utf-8")
        self.ws: Workspace = workspace(recipe, "server")
        self.initial = state_of(self.ws.model, SHARED)
        self.strategy = PetStrategy(recipe.fed, Spec.of(self.initial), self.ws.full_model_bytes)
        self.report = self._header()
        self.bar = tqdm(total=recipe.fed.rounds, desc="fed", unit="round", dynamic_ncols=True,
                        disable=not recipe.recipe.train.progress)

    def _header(self) -> dict[str, Any]:
        fed, data = self.recipe.fed, self.recipe.recipe.data
        label_names = list(getattr(self.ws.task, "label_names", ()))
        return {
            "title": f"{self.recipe.recipe.method_name} on {self.recipe.recipe.model.name} + "
                     f"{data.name}: {fed.clients} clients, {fed.partition}"
                     + (f" (alpha={fed.alpha})" if fed.partition == "dirichlet" else ""),
            "recipe": self.recipe.to_dict(), "label_names": label_names,
            "partition": [{"client": s.client, "examples": s.size, "histogram": list(s.histogram)}
                          for s in self.ws.shares],
            "full_model_bytes": self.ws.full_model_bytes,
            "delta_bytes": record_bytes(to_record(self.initial)),
            "delta_parameters": int(sum(v.size for v in self.initial.values())),
            "test_examples": len(self.ws.prep.test), "rounds": []}

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation of the global delta; closes the round's row."""
        load_into(self.ws.model, SHARED, from_record(arrays))
        metrics = self.ws.evaluate(self.ws.prep.test)
        row = self.strategy.row(server_round)
        row.update({f"test_{k}": v for k, v in metrics.items()})
        row["seconds"] = time.time() - row.pop("started")
        self.report["rounds"].append(row)
        append_row(self.out, row)
        LOG.info(round_line(row))
        if server_round > 0:
            self.bar.update(1)
            self.bar.set_postfix({k[5:]: f"{v:.4f}" for k, v in row.items()
                                  if k in ("test_accuracy", "test_loss") and v is not None})
        return MetricRecord(metrics)

    def finish(self, arrays: ArrayRecord) -> dict[str, Any]:
        """Save the final global adapter, the report and the plot."""
        load_into(self.ws.model, SHARED, from_record(arrays))
        save_adapter(self.ws.model, self.out / "adapter", name=SHARED)
        rows = self.report["rounds"]
        self.report.update(totals=totals(rows), final=rows[-1], seconds=time.time() - self.started,
                           adapter=str(self.out / "adapter"))
        plot_rounds(self.report, self.out / "accuracy.png")
        write_report(self.out, self.report)
        t = self.report["totals"]
        LOG.info("sent %d bytes in total vs %d for full-model FedAvg (%.0fx less); report: %s",
                 t["bytes"], t["full_model_bytes"], t["saving_factor"], self.out / "report.json")
        return self.report


def _log_to(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "fed.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    return handler


def run_server(grid: Grid, recipe: FedRecipe) -> dict[str, Any]:
    """Run all rounds on `grid`; returns the report (also written to the output folder)."""
    run = _Run(recipe)
    handler = _log_to(run.out)
    try:
        LOG.info("partition (%s): %s", recipe.fed.partition,
                 [(p["examples"], p["histogram"]) for p in run.report["partition"]])
        result = run.strategy.start(grid=grid, initial_arrays=to_record(run.initial),
                                    num_rounds=recipe.fed.rounds, timeout=recipe.fed.timeout,
                                    evaluate_fn=run.evaluate)
        return run.finish(result.arrays if len(result.arrays) else to_record(run.initial))
    finally:
        run.bar.close()
        LOG.removeHandler(handler)
        handler.close()


def make_server_app(recipe: FedRecipe | None = None) -> ServerApp:
    """A ServerApp for `recipe`; None reads the recipe from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, recipe or recipe_from_context(context))

    return app
