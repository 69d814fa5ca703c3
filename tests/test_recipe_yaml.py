"""Recipes are YAML from users and shared folders: read safely and within bounds. Alias bombs,
deep nesting, huge scalars and files, non-mapping roots and unknown keys are one-line
`ConfigError`s, fast; no YAML tag can import or run code."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import petkit as pk
from petkit.app.recipe import load_recipe
from petkit.app.safe_yaml import MAX_ALIASES, MAX_DEPTH, MAX_YAML_BYTES, load_yaml
from petkit.fed.config import load_fed_recipe

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))

CASES = {
    "billion_laughs": (BOMB, "alias bomb"),
    "self_alias": ("a: &a [1, *a]\n", "cannot read"),
    "deep_nesting": ("train: " + "[" * 5000 + "]" * 5000, "nest deeper"),
    "deep_mapping": ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n", "nesting deeper"),
    "huge_scalar": ("train: {output_dir: " + "x" * (200 << 10) + "}", "longer than"),
    "list_root": ("- method\n- train\n", "holds a YAML list"),
    "scalar_root": ("just text\n", "holds a YAML str"),
    "unknown_section": ("methd: {name: lora}\n", "unknown section"),
    "unknown_key": ("train: {max_stepz: 3}\n", "max_stepz"),
    "python_object": ("train: !!python/object/apply:os.system ['touch /tmp/petkit-pwned']\n", "python/object"),
    "python_name": ("method: !!python/name:os.system\n", "python/name"),
    "python_module": ("method: !!python/module:os\n", "python/module"),
    "not_yaml": ("train: {lr: [1, 2\n", "cannot read"),
    "not_utf8": (b"\xff\xfe\x00train", "cannot read"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_recipe_is_a_clear_error_fast(tmp_path: Path, case: str) -> None:
    text, match = CASES[case]
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    with pytest.raises(pk.ConfigError, match=match) as err:
        load_recipe(path)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(err.value)
    assert not Path("/tmp/petkit-pwned").exists()


def test_a_recipe_file_above_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as fh:
        fh.truncate(2 << 30)  # sparse: reading it would take seconds and 2 GB
    start = time.perf_counter()
    with pytest.raises(pk.ConfigError, match=f"at most {MAX_YAML_BYTES:,} bytes"):
        load_recipe(path)
    assert time.perf_counter() - start < 0.5


def test_the_federated_recipe_reader_is_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(BOMB)
    with pytest.raises(pk.ConfigError, match="alias bomb"):
        load_fed_recipe(path)


def test_bounds_let_ordinary_yaml_through() -> None:
    nested = "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2)
    assert load_yaml(f"a: {nested}", "x")["a"] is not None
    few = "a: &a {lr: 0.1}\n" + "".join(f"b{i}: *a\n" for i in range(MAX_ALIASES))
    assert load_yaml(few, "x")["b0"] == {"lr": 0.1}


def test_every_shipped_recipe_still_loads() -> None:
    from petkit.app.recipe import builtin_recipes
    for name in builtin_recipes():
        load_recipe(name)


def test_bench_specs_and_deployment_run_configs_are_bounded_too(tmp_path: Path) -> None:
    from petkit.benchmark.spec import load_spec

    path = tmp_path / "grid.yaml"
    path.write_text(BOMB)
    with pytest.raises(pk.ConfigError, match="alias bomb"):
        load_spec(path)
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from petkit.fed.client import RECIPE_KEY, recipe_from_context

    context = SimpleNamespace(run_config={RECIPE_KEY: "!!python/object/apply:os.system ['true']"})
    with pytest.raises(pk.ConfigError, match="recipe-yaml"):
        recipe_from_context(context)
