"""The package graph: imports point downwards only, and nothing inside petkit imports the facade.

Layers, bottom to top (docs/architecture.md). A module may import petkit modules of its own
layer or lower ones — at module level or inside a function alike.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "petkit"

LAYERS: dict[str, int] = {
    "core": 0,
    "methods": 1,
    "data": 2, "models": 2,
    "training": 3,
    "app": 4, "recipes": 4,
    "compress": 4,  # pruning while tuning: used by the CLI and by the benchmark harness's arms
    "fed": 5, "benchmark": 5, "continual": 5, "distributed": 5, "hybrid": 5, "serve": 5,
    "cli": 6, "cli_flags": 6, "cli_io": 6,  # the parser, its flag tables, consoles
    "cli_commands": 6,  # what each subcommand does (imported by cli.main only to run one)
    "cli_adapter": 6,  # petkit export / predict: their arguments and printing
    "cli_quantize": 6,  # petkit quantize: its arguments, the run and its report
    "__main__": 7,  # python -m petkit (torchrun -m petkit): only calls cli.main
}
# Regimes sit side by side: none of them imports another.
REGIMES = {name for name, level in LAYERS.items() if level == 5}


def _package(module: str) -> str:
    """'petkit.core.io' -> 'core'; 'petkit.cli' -> 'cli'; 'petkit' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every petkit import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "petkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "petkit":
                continue
            if target == "petkit":  # `from petkit import x`: x may be a subpackage
                out += [(node.lineno, f"petkit.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


FILES = sorted(p for p in SRC.rglob("*.py") if p != SRC / "__init__.py")


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in FILES}
    assert packages <= set(LAYERS), f"give these a layer in LAYERS: {sorted(packages - set(LAYERS))}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_downwards(path: Path):
    mine = _package(_module_name(path))
    bad = []
    for line, target in _imports(path):
        theirs = _package(target)
        if theirs == "":
            bad.append(f"line {line}: imports the facade `petkit` (import the module that defines the name)")
        elif theirs not in LAYERS:
            continue  # a submodule name imported from a package of the same layer is checked there
        elif LAYERS[theirs] > LAYERS[mine]:
            bad.append(f"line {line}: {mine} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})")
        elif mine in REGIMES and theirs in REGIMES and theirs != mine:
            bad.append(f"line {line}: regime {mine} imports regime {target}")
    assert not bad, "\n".join(bad)


def test_the_facade_only_re_exports():
    tree = ast.parse((SRC / "__init__.py").read_text(encoding="utf-8"))
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Import", "Assign"}, kinds
    assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_public_train_is_the_function_even_after_the_package_is_imported():
    import petkit as pk
    import petkit.training  # noqa: F401 - the old bug: importing the package shadowed pk.train

    assert callable(pk.train) and pk.train.__module__ == "petkit.training.loop"
    assert callable(pk.bench) and not isinstance(pk.bench, type(pk))
