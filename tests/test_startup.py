"""`import petkit` and `petkit --help` load no regime and no torch: the facade and the regimes'
packages import their names on first use (petkit.core.lazy), and the CLI imports its commands
only once the arguments parse (petkit.cli_commands)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "petkit.training", "petkit.benchmark.harness",
         "petkit.continual.run", "petkit.fed.run", "petkit.app.pipeline")


def loaded_after(code: str, modules: tuple[str, ...] = HEAVY) -> set[str]:
    """Which of `modules` sys.modules holds after running `code` in a fresh interpreter."""
    probe = f"""
import sys
{code}
print("LOADED:", *(m for m in {modules!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    return set(out[-1].removeprefix("LOADED:").split())


@pytest.mark.parametrize("code", [
    "import petkit",
    "import petkit as pk; pk.__version__; pk.PetkitError",
    "import petkit.fed, petkit.benchmark, petkit.continual",
    "from petkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from petkit.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass",
])
def test_startup_imports_no_regime_and_no_torch(code: str) -> None:
    assert loaded_after(code) == set()


def test_import_petkit_loads_no_regime_package_and_no_registry() -> None:
    regimes = ("petkit.fed", "petkit.serve", "petkit.continual", "petkit.benchmark",
               "petkit.hybrid", "petkit.compress", "petkit.methods", "petkit.data",
               "petkit.models", "transformers", "torch")
    assert loaded_after("import petkit", regimes) == set()
    # a method's config loads the methods (the registry's first lookup), still no regime
    assert loaded_after("import petkit as pk; pk.LoraConfig", regimes) == {"petkit.methods",
                                                                          "torch"}


def test_registries_fill_on_first_lookup_not_on_import() -> None:
    code = ("import petkit.core.registry as r, petkit.data.embedded as d, "
            "petkit.models.embedded as m\nassert not (r.METHODS.loaded or d.DATASETS.loaded or "
            "m.MODELS.loaded)\nassert 'lora' in r.METHODS and 'bbc-news' in d.DATASETS and "
            "'minilm-l6' in m.MODELS")
    assert loaded_after(code, ("petkit.methods.lora", "petkit.data.embedded.bbc_news",
                               "petkit.models.embedded.minilm_l6", "transformers")) == {
        "petkit.methods.lora", "petkit.data.embedded.bbc_news", "petkit.models.embedded.minilm_l6"}


def test_names_load_on_first_use() -> None:
    import petkit as pk

    assert pk.LoraConfig(r=4).r == 4 and pk.make_config("lora", r=2).r == 2
    assert "LoraConfig" in dir(pk) and "attach" in pk.__all__ and "__version__" in pk.__all__
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        pk.NoSuchThing  # noqa: B018
    import petkit.fed as fed

    assert fed.FedConfig.__name__ == "FedConfig"
