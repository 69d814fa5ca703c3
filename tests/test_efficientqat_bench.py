"""benchmarks/efficientqat.py's table (means over seeds) and the EfficientQAT + PEQA arm of
benchmarks/compressed.py (a quantised folder as the base, decoder only)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
eqat = importlib.import_module("efficientqat")
compressed = importlib.import_module("compressed")

ROWS = [{"arm": "fp32", "perplexity": 10.0, "other": 20.0, "seconds": 1},
        {"arm": "rtn", "bits": "int4", "perplexity": 20.0, "other": 40.0, "seconds": 2},
        {"arm": "block-ap", "bits": "int4", "seed": 0, "perplexity": 12.0, "other": 21.0, "seconds": 3},
        {"arm": "block-ap", "bits": "int4", "seed": 1, "perplexity": 15.0, "other": 25.0, "seconds": 3},
        {"arm": "block-ap+e2e-qp", "bits": "int3", "seed": 0, "perplexity": 30.0, "other": 50.0, "seconds": 4}]


def test_the_table_has_each_seed_and_the_mean_of_runs_with_several_seeds(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table = eqat.render(str(path)).splitlines()
    assert "| block-ap | int4 | 1 | 15.00 | +50.0% | -25.0% | 25.00 (+25.0%) | 3 |" in table
    # mean perplexity 13.5: +35% vs fp32's 10, -32.5% vs RTN's 20; other domain 23.0 vs 20
    assert "| **block-ap** | int4 | mean (0,1) | **13.50** | +35.0% | -32.5% | 23.00 (+15.0%) | - |" in table
    assert not any("mean" in line and "int3" in line for line in table)  # one seed: no mean row


def test_the_quantised_folder_arm_needs_its_folder_and_runs_on_the_decoder_only(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(compressed, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="petkit quantize --method efficientqat --bits int4"):
        compressed.model_of("eqat-int4+peqa", "decoder")
    folder = tmp_path / compressed.ARMS["eqat-int4+peqa"]["model"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert compressed.model_of("eqat-int4+peqa", "decoder").name == str(folder)
    assert compressed.model_of("lora-fp32", "decoder").name == "smollm2-135m"
    assert compressed.arms_on("encoder", ["lora-fp32", "eqat-int4+peqa"]) == ["lora-fp32"]
    assert compressed.arms_on("decoder", ["lora-fp32", "eqat-int4+peqa"]) == ["lora-fp32", "eqat-int4+peqa"]


def test_the_block_ap_only_arm_names_the_command_that_writes_its_folder(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(compressed, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="--e2e-steps 0 --output runs/eqat-ap-int4-g128"):
        compressed.model_of("eqat-ap-int4+peqa", "decoder")
    assert compressed.arms_on("encoder", ["eqat-ap-int4+peqa"]) == []


def test_the_diagnosis_sees_an_untied_or_changed_output_head() -> None:
    import torch

    from petkit.models import tiny_model

    task = importlib.import_module("efficientqat_task")
    model, _ = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    head = model.get_output_embeddings().weight.detach().float().clone()
    assert task.head_state(model, head) == {"head_tied": True, "head_equal_fp32": True}
    model.lm_head.weight = torch.nn.Parameter(head + 1)  # untied and moved
    assert task.head_state(model, head) == {"head_tied": False, "head_equal_fp32": False}
