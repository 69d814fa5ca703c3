"""benchmarks/methods_table.py: every registered method gets a row; notes for skipped cells."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import petkit as pk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
table = importlib.import_module("methods_table")
doc = importlib.import_module("methods_doc")


def test_rows_for_every_registered_method_with_numbers_and_notes():
    cells = {
        "decoder/untuned": {"accuracy": 0.6, "base_params": 1000, "peak_mb": 500.0},
        "decoder/lora": {"accuracy": 0.8, "trainable": 10, "base_params": 1000, "peak_mb": 600.0,
                         "cpu_s_per_step": 1.5, "wall_s_per_step": 2.0, "lr": 0.003},
        "encoder/lora": {"note": "TargetError: nothing to wrap"},
    }
    cache = {"protocol": {}, "cells": cells}
    text = doc.render(cache, table.methods(), table.SETTINGS, table.PROTOCOL, table.BASELINE)
    assert "| lora | reparameterised | 10 | 1.000% | 80.0 | +20.0 | 600 | 1.50 | 2.00 | 0.003 |" in text
    assert "| untuned | (no delta) | 0 | 0.000% | 60.0 | — | 500 | — | — | — |" in text
    assert "skipped: TargetError: nothing to wrap" in text
    assert "python benchmarks/methods_table.py" in text
    for name, _, _ in pk.list_methods():
        assert text.count(f"| {name} |") == 2  # one row per setting


def test_applies_to_skips_a_setting(monkeypatch):
    monkeypatch.setattr(pk.LatePromptConfig, "applies_to", ("encoder",))
    assert "not meant for decoders" in table.skip_reason("decoder", "late-prompt")
    assert table.skip_reason("encoder", "late-prompt") is None
    assert table.skip_reason("decoder", table.BASELINE) is None


@pytest.mark.parametrize("setting", list(table.SETTINGS))
def test_cell_recipes_are_valid(setting):
    rec = table.recipe(setting, "ia3")
    assert rec.method_config().method == "ia3"
    assert rec.data.test_size == table.PROTOCOL["test_size"] and rec.train.lr == pk.IA3Config.suggested_lr == 1e-2
