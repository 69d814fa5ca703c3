"""Compressed bases as arms of the benchmark harness: QLoRA / int8 LoRA, PEQA, LoRAPrune, APT."""
from __future__ import annotations

from pathlib import Path

import pytest

import petkit as pk
import petkit.benchmark as bench
from petkit.core.errors import ConfigError
from test_bench import grid, toy  # noqa: F401 - the tiny Llama + toy task fixture

LORA = {"name": "lora", "r": 4, "targets": "all-linear"}
ARMS = [{**LORA, "arm": "lora"},
        {**LORA, "arm": "qlora-nf4", "quantize": "nf4"},
        {"name": "peqa", "bits": 4},
        {**LORA, "arm": "loraprune-50", "prune": {"sparsity": 0.5, "every": 1}},
        {**LORA, "arm": "apt-50", "prune": {"sparsity": 0.5, "method": "apt", "every": 1, "grow_every": 2}}]


def test_compressed_arms_parse_and_refuse_bad_fields(toy):  # noqa: F811
    spec = bench.spec_from_dict(grid(toy, methods=ARMS, baselines={"peft": True}))
    arms = {a.name: a for a in spec.arms}
    assert arms["qlora-nf4"].quantize == "nf4" and arms["loraprune-50"].prune["sparsity"] == 0.5
    assert [n for n in arms if n.startswith("peft:")] == ["peft:lora"]  # no twin of a compressed arm
    assert spec.fingerprint(spec.cells()[0]) != spec.fingerprint(spec.cells()[1])
    with pytest.raises(ConfigError, match="quantize"):
        bench.spec_from_dict(grid(toy, methods=[{**LORA, "quantize": "int2"}]))
    with pytest.raises(ConfigError, match="sparsity"):
        bench.spec_from_dict(grid(toy, methods=[{**LORA, "prune": {"sparsity": 2.0}}]))


def test_compressed_arms_run_in_a_grid(toy, tmp_path):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    report = pk.bench(grid(toy, methods=ARMS, seeds=[0]), tmp_path / "run", progress=False,
                      echo=lambda s: None)
    assert not report.failed, [r.get("error") for r in report.failed]
    rec = {r["arm"]: r for r in report.records}
    assert rec["qlora-nf4"]["trainable_params"] == rec["lora"]["trainable_params"]
    assert rec["qlora-nf4"]["model_bytes"] < rec["lora"]["model_bytes"]
    assert rec["peqa"]["trainable_params"] < rec["lora"]["trainable_params"]
    # APT counts its open ranks only (it starts at 2 of r=4 and opens a quarter of the layers'
    # next 2 every 2 steps); LoRAPrune trains all its ranks, like LoRA
    assert rec["loraprune-50"]["trainable_params"] == rec["lora"]["trainable_params"]
    assert rec["lora"]["trainable_params"] / 2 <= rec["apt-50"]["trainable_params"] \
        < rec["lora"]["trainable_params"]
    for arm in ("loraprune-50", "apt-50"):
        assert rec[arm]["model_bytes"] < rec["lora"]["model_bytes"]
        folder = next(Path(report.folder, "cells").glob(f"*{arm}*")) / "adapter"
        pruned = AutoModelForCausalLM.from_pretrained(folder)  # saved pruned: a plain HF folder
        assert pruned.config.num_key_value_heads == 1 and pruned.config.intermediate_size == 32
