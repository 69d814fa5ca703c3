"""Shipped YAML recipes (package data): `petkit train --recipe <name>` or `load_recipe(name)`;
`fed/` holds federated recipes and `bench/` benchmark grids. Reading the list imports nothing
heavy, so help texts can name the recipes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(subfolder: str = "") -> dict[str, Path]:
    """YAML files shipped in `petkit/recipes/<subfolder>`, by file stem."""
    folder = resources.files(__name__)
    if subfolder:
        folder = folder / subfolder
    if not folder.is_dir():
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir()
            if p.name.endswith((".yaml", ".yml"))}
