"""`FedConfig` (how the federation runs) and `FedRecipe` (a petkit recipe plus a `fed` section).

A federated recipe is an ordinary recipe — `method`, `model`, `data`, `train` — with a fifth
section `fed`. `train` describes one client's *local* training per round (`max_steps` local
steps, `lr`, `batch_size`); `train.output_dir` is where the server writes the run's report.

    fed:   {clients: 10, rounds: 10, fraction: 0.5, partition: dirichlet, alpha: 0.5}
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from petkit.core.config_io import check_keys, dataclass_from_dict
from petkit.core.errors import ConfigError
from petkit.core.registry import check_choice, check_range
from petkit.fed.compress import Compression
from petkit.app.recipe import (Recipe, apply_overrides, parse_value, read_yaml_mapping,
                                 recipe_from_dict, shipped_recipes)

STRATEGIES = ("fedavg", "fedprox")
PARTITIONS = ("iid", "dirichlet")
FAULTS = ("crash", "malformed", "wrong-shape", "nan")


@dataclass(frozen=True)
class FedConfig:
    """The federation: clients, rounds, sampling, partitioning, aggregation, privacy.

    fraction / fraction_evaluate: share of the clients sampled per round for training / for
    evaluation on their own held-out split (0 turns client evaluation off).
    partition: "iid" or "dirichlet" over labels with concentration `alpha` (small = skewed).
    strategy: "fedavg" (weighted by examples) or "fedprox" (adds mu/2 ||w - w_global||^2 locally).
    personal: each client also trains a private adapter "local", active beside "shared".
    dp_clip: clip each client's update to this L2 norm (None: no DP); dp_noise: Gaussian noise
    multiplier z (std z * dp_clip on the sum of clipped updates); dp_delta: delta of the
    reported (epsilon, delta). compress: what clients send — "none" (the delta), "int8" or
    "topk:P" (their update, quantised or sparsified, with error feedback; see compress.py);
    compress_down: what the server broadcasts, "none" or "int8" (the global delta quantised). faults: {partition id: kind} makes a client misbehave on purpose
    (robustness tests and demos): crash | malformed | wrong-shape | nan.
    """

    clients: int = 10
    rounds: int = 5
    fraction: float = 0.5
    fraction_evaluate: float = 1.0
    partition: str = "dirichlet"
    alpha: float = 0.5
    client_test_fraction: float = 0.2
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    personal: bool = False
    dp_clip: float | None = None
    dp_noise: float = 0.0
    dp_delta: float = 1e-5
    dp_seed: int | None = None
    seed: int = 0
    workers: int = 2
    timeout: float = 3600.0
    compress: str | None = "none"  # None (or "none"): the delta itself
    compress_down: str | None = "none"  # what the server broadcasts: none | int8
    faults: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate every field (ConfigError names the field and its range)."""
        check_range("fed.clients", self.clients, 1, 10_000, kind=int)
        check_range("fed.rounds", self.rounds, 1, 100_000, kind=int)
        check_range("fed.fraction", self.fraction, 0.0, 1.0, low_open=True)
        check_range("fed.fraction_evaluate", self.fraction_evaluate, 0.0, 1.0)
        check_choice("fed.partition", self.partition, PARTITIONS)
        check_range("fed.alpha", self.alpha, 0.0, low_open=True)
        check_range("fed.client_test_fraction", self.client_test_fraction, 0.0, 0.9, low_open=True)
        check_choice("fed.strategy", self.strategy, STRATEGIES)
        check_range("fed.proximal_mu", self.proximal_mu, 0.0)
        check_choice("fed.personal", self.personal, (True, False))
        if self.dp_clip is not None:
            check_range("fed.dp_clip", self.dp_clip, 0.0, low_open=True)
        check_range("fed.dp_noise", self.dp_noise, 0.0)
        check_range("fed.dp_delta", self.dp_delta, 0.0, 1.0, low_open=True)
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ConfigError("fed.dp_noise needs fed.dp_clip (noise is scaled to the clip norm)")
        check_range("fed.workers", self.workers, 1, 1024, kind=int)
        check_range("fed.timeout", self.timeout, 0.0, low_open=True)
        Compression.parse(self.compress)
        if Compression.parse(self.compress_down).kind == "topk":
            raise ConfigError("fed.compress_down must be none or int8: the server sends the whole "
                              "global delta, which a top-k cut would lose")
        self._check_faults()

    def _check_faults(self) -> None:
        if not isinstance(self.faults, dict):
            raise ConfigError(f"fed.faults must map partition ids to {list(FAULTS)}, got {self.faults!r}")
        try:
            faults = {int(k): v for k, v in self.faults.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"fed.faults keys must be partition ids, got {list(self.faults)}") from None
        for pid, kind in faults.items():
            check_range("fed.faults partition id", pid, 0, self.clients - 1, kind=int)
            check_choice(f"fed.faults[{pid}]", kind, FAULTS)
        object.__setattr__(self, "faults", faults)

    @property
    def sampled(self) -> int:
        """Clients trained per round."""
        return max(1, round(self.fraction * self.clients))

    @property
    def evaluated(self) -> int:
        """Clients evaluated per round (0: no client evaluation)."""
        return 0 if self.fraction_evaluate == 0 else max(1, round(self.fraction_evaluate * self.clients))

    @property
    def compression(self) -> Compression:
        """How client updates travel (parsed `compress`)."""
        return Compression.parse(self.compress)

    @property
    def broadcast(self) -> Compression:
        """How the global delta travels to clients (parsed `compress_down`)."""
        return Compression.parse(self.compress_down)

    @property
    def proximal(self) -> float:
        """The proximal weight clients apply (0 under FedAvg)."""
        return self.proximal_mu if self.strategy == "fedprox" else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> FedConfig:
        """Build from a mapping (None: defaults); unknown keys and wrong types raise ConfigError."""
        return dataclass_from_dict(cls, data, "fed")


@dataclass(frozen=True)
class FedRecipe:
    """A petkit recipe (local training) plus the federation settings."""

    recipe: Recipe = field(default_factory=Recipe)
    fed: FedConfig = field(default_factory=FedConfig)

    @property
    def output_dir(self) -> Path:
        """Where the server writes report.json, metrics.jsonl, the plot and the adapter."""
        return Path(self.recipe.train.output_dir or "runs/fed")

    def to_dict(self) -> dict[str, Any]:
        """The five sections as plain data."""
        return {**self.recipe.to_dict(), "fed": self.fed.to_dict()}

    def to_yaml(self) -> str:
        """YAML that `fed_recipe_from_dict(yaml.safe_load(...))` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace_fed(self, **changes: Any) -> FedRecipe:
        """A copy with fed fields changed (validated)."""
        return dataclasses.replace(self, fed=dataclasses.replace(self.fed, **changes))


def fed_recipe_from_dict(data: dict[str, Any]) -> FedRecipe:
    """FedRecipe from {method, model, data, train, fed}; missing sections take defaults."""
    if not isinstance(data, dict):
        raise ConfigError("a federated recipe must be a mapping with sections method, model, "
                          "data, train, fed")
    rest = {k: v for k, v in data.items() if k != "fed"}
    return FedRecipe(recipe_from_dict(rest), FedConfig.from_dict(data.get("fed")))


def shipped_fed_recipes() -> dict[str, Path]:
    """The federated recipes shipped in `petkit/recipes/fed/`, by file stem."""
    return shipped_recipes("fed")


def load_fed_recipe(path_or_name: str | Path) -> FedRecipe:
    """Read a federated recipe from a YAML file or a shipped one by name."""
    return fed_recipe_from_dict(read_yaml_mapping(path_or_name, shipped_fed_recipes(), "federated recipe"))


def apply_fed_overrides(recipe: FedRecipe, overrides: dict[str, str]) -> FedRecipe:
    """Apply {"fed.alpha": "0.1", "train.lr": "1e-3", ...} (typed by the config fields)."""
    fed_part = {k.partition(".")[2]: v for k, v in overrides.items() if k.startswith("fed.")}
    rest = {k: v for k, v in overrides.items() if not k.startswith("fed.")}
    data = recipe.fed.to_dict()
    hints = typing.get_type_hints(FedConfig)
    check_keys({f"fed.{k}": v for k, v in fed_part.items()}, [f"fed.{h}" for h in hints], "fed")
    for name, text in fed_part.items():
        data[name] = parse_value(text, hints[name])
    return FedRecipe(apply_overrides(recipe.recipe, rest) if rest else recipe.recipe,
                     FedConfig.from_dict(data))
