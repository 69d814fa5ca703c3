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
    "fed": 5, "benchmark": 5, "continual": 5, "hybrid": 5, "serve": 5,
    "cli": 6, "cli_flags": 6, "cli_io": 6,  # the parser, its flag tables, consoles
    "cli_sections": 6,  # the --section.field flags of every subcommand, read from the sections
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


def test_every_layer_names_a_package_that_exists():
    packages = {_package(_module_name(p)) for p in FILES}
    assert set(LAYERS) <= packages, f"LAYERS lists no such package: {sorted(set(LAYERS) - packages)}"


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


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(path: Path) -> list[str]:
    """Every petkit module (or module-or-name) the file imports when it runs, relative imports
    resolved; `from pkg import a` yields `pkg.a`. Imports under `if TYPE_CHECKING:` are left out
    (annotations only: they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
               and _is_type_checking(block) for stmt in block.body for n in ast.walk(stmt)}
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            out += [f"{target}.{a.name}" for a in node.names]
    return [t for t in out if t.split(".")[0] == "petkit"]


MODULES = {_module_name(p): p for p in FILES}


def _edges(module: str) -> set[str]:
    """Petkit modules `module` imports when it runs — at module level or deferred inside a
    function alike: a deferred import that closes a circle only hides it. `from pkg import name`
    counts as an edge to `pkg.name` when that is a module, else to `pkg`."""
    out = set()
    for target in _runtime_imports(MODULES[module]):
        while target not in MODULES and "." in target:
            target = target.rsplit(".", 1)[0]  # `from petkit.x import name`: name is no module
        if target in MODULES and target != module:
            out.add(target)
    return out




def _cycles() -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as sorted lists."""
    graph = {m: _edges(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_circle_anywhere():
    """No set of petkit modules imports itself round, not even through deferred imports."""
    cycles = _cycles()
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# Probes of third-party objects core/ and training/ may make, per file (exact counts): duck typing
# is how one reads Hugging Face / torch / bitsandbytes objects whose attributes vary by version and
# model class. Every other `hasattr(x, ...)` or `getattr(x, ..., default)` is a probe of a petkit
# object and must be a declared Protocol checked with isinstance instead.
THIRD_PARTY_PROBES = {
    "core/blocks.py": 2,  # a transformers model's config.num_hidden_layers
    "core/config_io.py": 1,  # a typing annotation's __name__ (Optional[...] has none)
    "core/discovery.py": 1,  # an imported module's __path__ (a plain module has none)
    "core/durable.py": 4,  # os.O_DIRECTORY (absent on Windows)
    "core/fingerprint.py": 2,  # a transformers model's config.model_type
    "core/io.py": 2,  # the record petkit keeps on the user's nn.Module (absent before attach)
    "core/mixed_batch.py": 4,  # transformers' ModelOutput / generation_config token ids
    "core/peft_interop.py": 2,  # a transformers config's _name_or_path
    "core/qweight.py": 13,  # bitsandbytes / torchao quantised weights: quant_state, SCB, ...;
    # compressed-tensors layers: weight_scale, weight_zero_point, quantization_scheme.weights
    "core/registry.py": 1,  # a typing annotation's __name__
    "core/targets.py": 5,  # a transformers model's config / get_output_embeddings; its Conv1D
    "training/activations.py": 4,  # transformers' cache objects (DynamicCache and relatives)
    "training/dp.py": 2,  # a transformers model's config.is_decoder (the mask DP's vmap builds)
    "training/grpo_rewards.py": 1,  # the user's reward module names a function
    "training/guards.py": 7,  # a transformers model's head and config (vocab, labels, archs)
    "training/hub_kernels.py": 1,  # a transformers forward's functools __wrapped__
    "training/lm_loss.py": 3,  # a transformers model's head / loss_function, nn.Linear sizes
    "training/liger.py": 7,  # a transformers model's config.model_type, its RMSNorm / MLP
    # modules' weight, variance_epsilon, act_fn and projections, its module's RoPE function
}


def _probes(path: Path) -> list[str]:
    """`hasattr(...)` and three-argument `getattr(...)` calls: asking whether an attribute is
    there. (Two-argument getattr reads a named field and fails when it is missing: no probe.)"""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and (node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3))]


def test_core_and_training_probe_no_petkit_object():
    """Optional capabilities and hooks are Protocols (core/capabilities.py,
    training/steppers/base.py) checked with isinstance; only the listed third-party probes remain."""
    wrong = []
    for path in sorted((SRC / "core").rglob("*.py")) + sorted((SRC / "training").rglob("*.py")):
        rel = str(path.relative_to(SRC))
        found = _probes(path)
        if len(found) != THIRD_PARTY_PROBES.get(rel, 0):
            wrong.append(f"{rel}: {len(found)} probes, {THIRD_PARTY_PROBES.get(rel, 0)} allowed "
                         f"(third-party objects only):\n    " + "\n    ".join(found))
    assert not wrong, "\n".join(wrong)
