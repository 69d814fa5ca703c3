"""A recipe that cannot train fails in seconds: before the baseline evaluation, before any step.

Each case runs the real pipeline (`petkit train`'s path) on the embedded MiniLM (6 layers, 512
positions) with a set-up mistake; the error names the field and nothing was evaluated or written.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from petkit.core.errors import ConfigError, TargetError
from petkit.app.pipeline import run_recipe
from petkit.app.recipe import apply_overrides, load_recipe

CASES = {
    "ist-top-k-above-layers": ({"train.ist_top_k": "7"}, ConfigError, r"ist_top_k must be in \[1, 6\]"),
    "late-prompt-layer-out-of-range": ({"method.name": "late-prompt", "method.layer": "9"}, ConfigError,
                                       "layer"),
    "prefix-longer-than-context": ({"method.name": "prefix", "method.num_virtual_tokens": "600"},
                                   ConfigError, "context"),
    "targets-match-nothing": ({"method.targets": "[nope]"}, TargetError, "nope"),
    "cma-subspace-larger-than-delta": ({"train.optimizer": "cma", "train.es_dim": "100000000"},
                                       ConfigError, "es_dim"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_setup_mistakes_fail_before_the_baseline_evaluation(case: str, tmp_path: Path) -> None:
    overrides, error, match = CASES[case]
    recipe = apply_overrides(load_recipe("minilm-bbc"), {
        "data.train_size": "16", "data.validation_size": "0", "data.test_size": "8",
        "data.max_length": "32", "train.progress": "false", "train.output_dir": str(tmp_path / "run"),
        **overrides})
    lines: list[str] = []
    with pytest.raises(error, match=match):
        run_recipe(recipe, echo=lines.append)
    assert not any(line.startswith("before:") for line in lines), lines
    assert not (tmp_path / "run").exists()
