"""The sections of a hybrid run: `TransferConfig` (PET-GC's module transfer, the recipe's
`transfer:` section) and, for the gradient-free refinement after it, the ordinary `train:` and
`runtime:` sections; preference tuning reads the train section's objective
(`train.objective`: dpo, rpo, ...). A shipped hybrid recipe is `petkit/recipes/hybrid/<name>.yaml`:

    transfer: {align: hidden, align_texts: 64}
    train:    {optimizer: mezo, max_steps: 10, lr: 1.0e-4}     # optional: refine after
    runtime:  {device: auto}

    t = pk.transfer_adapter("default", small, large, recipe=load_hybrid_recipe("pet-gc"),
                            refine_data=train)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petkit.app.recipe import read_yaml_mapping, recipe_from_dict, shipped_recipes
from petkit.core.config_io import dataclass_from_dict
from petkit.core.errors import ConfigError
from petkit.training.config import TrainConfig

ALIGNS = ("hidden", "hidden-base", "embeddings")
SECTIONS = ("transfer", "train", "runtime")


@dataclass(frozen=True)
class TransferConfig:
    """How `transfer_adapter` maps a small model's adapter onto a large one (hybrid/transfer.py)."""

    align: str = field(default="hidden", metadata={"help": (
        "width maps fitted on hidden states (small model adapted, large as its base), on both "
        "bases, or on the input embeddings (no data)"), "choices": ALIGNS})
    align_texts: int = field(default=64, metadata={"help": (
        "texts taken from refine_data to fit the maps when align_data is not given")})

    def __post_init__(self) -> None:
        """Validate each field."""
        if self.align not in ALIGNS:
            raise ConfigError(f"transfer.align must be one of {ALIGNS}, got {self.align!r}")
        if isinstance(self.align_texts, bool) or not isinstance(self.align_texts, int) \
                or self.align_texts < 1:
            raise ConfigError(f"transfer.align_texts must be an int >= 1, got {self.align_texts!r}")


@dataclass(frozen=True)
class HybridRecipe:
    """A hybrid run's sections: the transfer's, and the refinement's train section (None: no
    refinement)."""

    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig | None = None


def hybrid_recipe_from_dict(data: dict[str, Any]) -> HybridRecipe:
    """A `HybridRecipe` from its {transfer, train, runtime} mapping (each section optional)."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"hybrid recipe has unknown section(s) {unknown}; sections: "
                          f"{list(SECTIONS)}")
    transfer = dataclass_from_dict(TransferConfig, data.get("transfer"), "transfer")
    refine = "train" in data or "runtime" in data
    train = recipe_from_dict({k: data[k] for k in ("train", "runtime") if k in data}).train \
        if refine else None
    return HybridRecipe(transfer, train)


def shipped_hybrid_recipes() -> dict[str, Path]:
    """Hybrid recipes shipped in `petkit/recipes/hybrid/`, by name."""
    return shipped_recipes("hybrid")


def load_hybrid_recipe(path_or_name: str | Path) -> HybridRecipe:
    """Read a hybrid recipe from a YAML file, or a shipped one by name ("pet-gc")."""
    return hybrid_recipe_from_dict(read_yaml_mapping(path_or_name, shipped_hybrid_recipes(),
                                                     "hybrid recipe"))
