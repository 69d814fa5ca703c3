"""Exports for other tools, piece by piece (no model is loaded from disk): vLLM's LoRA loader
rules (one test per rule, each named after the vLLM file it comes from), the new-folder claim,
file modes under the user's umask, what adapter.json records about its base and task, how a lone
adapter finds its base, and the model card."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import petkit as pk
from petkit.app.adapter_base import recipe_for_adapter
from petkit.app.export import claim_folder, vllm_refusal
from petkit.app.model_card import Card, render
from petkit.core.durable import write_folder
from petkit.core.errors import ConfigError
from petkit.core.io import describe_base
from petkit.core.vllm_format import MAX_LORA_RANKS, folder_problems, max_lora_rank, vllm_problems
from petkit.models.embedded import public_name
from toys import llama, perturb

GOOD = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none",
        "modules_to_save": None, "use_dora": False, "lora_bias": False}
KEYS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


# --- vLLM's rules ------------------------------------------------------------------------------


def test_a_plain_lora_passes() -> None:
    assert vllm_problems(GOOD, KEYS) == []


@pytest.mark.parametrize("field", ["r", "lora_alpha", "target_modules"])
def test_peft_helper_required_fields(field: str) -> None:
    """vllm/lora/peft_helper.py PEFTHelper.from_dict: r, lora_alpha, target_modules required."""
    config = {k: v for k, v in GOOD.items() if k != field}
    assert vllm_problems(config, KEYS) == [f"adapter_config.json lacks {field}"]


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_peft_helper_rank_is_a_positive_integer(r: object) -> None:
    """vllm/lora/peft_helper.py PEFTHelper.__post_init__: r must be a positive integer."""
    assert "not a positive integer" in vllm_problems({**GOOD, "r": r}, KEYS)[0]


def test_peft_helper_refuses_modules_to_save() -> None:
    """vllm/lora/peft_helper.py _validate_features: modules_to_save must be None."""
    problems = vllm_problems({**GOOD, "modules_to_save": ["classifier"]},
                             [*KEYS, "base_model.model.classifier.weight"])
    assert problems == ["it trains whole modules (classifier: modules_to_save, e.g. a "
                        "classification head)"]


def test_peft_helper_refuses_dora() -> None:
    """vllm/lora/peft_helper.py _validate_features (and lora_model.py): no DoRA."""
    keys = [*KEYS, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    assert vllm_problems({**GOOD, "use_dora": True}, keys) == [
        "it is DoRA (use_dora), which vLLM does not support"]


@pytest.mark.parametrize("change", [{"bias": "all"}, {"bias": "lora_only"}, {"lora_bias": True}])
def test_peft_helper_refuses_biases(change: dict) -> None:
    """vllm/lora/peft_helper.py validate_legal: "Adapter bias is not supported"."""
    assert vllm_problems({**GOOD, **change}, KEYS) == [
        "it trains biases (bias / lora_bias), which vLLM does not support"]


def test_rank_limit_comes_from_max_lora_rank_choices() -> None:
    """vllm/config/lora.py MaxLoRARanks; validate_legal: r <= --max-lora-rank."""
    assert MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    assert vllm_problems({**GOOD, "r": 512}, KEYS) == []
    assert "above the largest --max-lora-rank vLLM offers (512)" in vllm_problems(
        {**GOOD, "r": 513}, KEYS)[0]
    assert "513" in vllm_problems({**GOOD, "rank_pattern": {"q_proj": 513}}, KEYS)[0]
    with pytest.raises(ValueError, match="above"):
        max_lora_rank(600)


def test_tensor_names_are_lora_a_and_b_weights() -> None:
    """vllm/lora/utils.py parse_fine_tuned_lora_name: only *.lora_A.weight / *.lora_B.weight
    (and lora_embedding_A/B); anything else is an "unsupported LoRA weight"."""
    odd = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    assert vllm_problems(GOOD, [*KEYS, odd]) == [f"tensor {odd!r} is not a LoRA A/B weight"]
    assert vllm_problems(GOOD, [*KEYS, "base_model.model.embed.lora_embedding_A"]) == []


def test_an_exported_lora_folder_passes_and_others_are_refused(tmp_path: Path) -> None:
    model = llama()
    pk.attach(model, pk.LoraConfig(r=4, alpha=8))
    perturb(pk.trainable_parameters(model))
    pk.export_peft(model, tmp_path / "lora", base_model="org/base")
    assert folder_problems(tmp_path / "lora") == []
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base" and config["lora_alpha"] == 8
    for name, cfg, why in [("dora", pk.make_config("dora", r=4), "DoRA"),
                           ("bias", pk.LoraConfig(r=4, bias="lora_only"), "biases"),
                           ("ia3", pk.make_config("ia3"), "vLLM serves LoRA adapters only")]:
        other = llama()
        pk.attach(other, cfg)
        assert why in vllm_refusal(pk.save_adapter(other, tmp_path / name))


# --- folders and files -------------------------------------------------------------------------


def test_claim_folder_refuses_files_and_full_folders(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        claim_folder(tmp_path / "file", overwrite=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "chat_template.jinja").write_text("{{ x }}")
    with pytest.raises(ConfigError, match=r"already holds files \(chat_template.jinja\).*--overwrite"):
        claim_folder(full, overwrite=False)
    assert claim_folder(full, overwrite=True) == full
    (tmp_path / "empty").mkdir()
    assert claim_folder(tmp_path / "empty", False) == tmp_path / "empty"
    assert claim_folder(tmp_path / "new", False) == tmp_path / "new"


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, file_mode: int,
                                        dir_mode: int) -> None:
    """safetensors writes 0600; every folder petkit writes gets what the umask gives instead."""
    model = llama()
    pk.attach(model, pk.LoraConfig(r=2))
    old = os.umask(umask)
    try:
        adapter = pk.save_adapter(model, tmp_path / "adapter")
        peft = pk.export_peft(model, tmp_path / "peft")
        other = write_folder(tmp_path / "other", lambda tmp: (tmp / "sub").mkdir())
    finally:
        os.umask(old)
    for folder in (adapter, peft, other):
        assert stat.S_IMODE(folder.stat().st_mode) == dir_mode
        for path in folder.rglob("*"):
            want = dir_mode if path.is_dir() else file_mode
            assert stat.S_IMODE(path.stat().st_mode) == want, path


# --- what an adapter says about its base -------------------------------------------------------


def _adapter(tmp_path: Path, name: str = "ad", **record: object) -> Path:
    model = llama()
    if record:
        describe_base(model, **record)  # type: ignore[arg-type]
    pk.attach(model, pk.LoraConfig(r=2))
    return pk.save_adapter(model, tmp_path / name)


def test_adapter_json_records_the_base_and_task(tmp_path: Path) -> None:
    task = {"type": "verbaliser", "labels": ["neg", "pos"], "label_words": [" bad", " good"],
            "template": "Review: {text}\nSentiment:", "input_column": "review",
            "data": str(tmp_path / "reviews.csv")}
    folder = _adapter(tmp_path, base_model="smollm2-135m", task=task)
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["base_model"] == "smollm2-135m" and meta["task"] == task
    pk.load_adapter(llama(), folder)  # the schema reads its own fields
    recipe = recipe_for_adapter(folder)
    assert recipe.model.name == "smollm2-135m"
    assert (recipe.data.task_type, recipe.data.labels, recipe.data.text_column) == (
        "verbaliser", ["neg", "pos"], "review")


def test_a_lone_older_adapter_asks_for_the_model(tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    with pytest.raises(ConfigError, match="does not say which base model.*pass --model NAME "
                                          r"\(.*minilm-l6, smollm2-135m"):
        recipe_for_adapter(folder)
    assert recipe_for_adapter(folder, model_given=True).data.task_type == "auto"


def test_an_older_head_adapter_is_a_head_with_its_number_of_labels(tmp_path: Path) -> None:
    model = pk.models.tiny_model("bert", task="seq-cls", num_labels=3)[0]
    pk.attach(model, pk.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    folder = pk.save_adapter(model, tmp_path / "head")
    spec = recipe_for_adapter(folder, model_given=True).data
    assert spec.task_type == "head" and spec.labels == ["0", "1", "2"]


def test_recipe_beside_the_adapter_wins(tmp_path: Path) -> None:
    folder = _adapter(tmp_path, base_model="minilm-l6")
    (tmp_path / "recipe.yaml").write_text("model: {name: smollm2-135m}\n")
    assert recipe_for_adapter(folder).model.name == "smollm2-135m"


def test_public_names() -> None:
    assert public_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_name("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert public_name("org/some-model") == "org/some-model"
    assert public_name(".") == str(Path(".").resolve())


# --- model card --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["merged", "peft", "vllm"])
@pytest.mark.parametrize("task", [
    {"type": "verbaliser", "labels": ["neg", "pos"], "label_words": [" bad", " good"],
     "template": "Review: {text}\nSentiment:"},
    {"type": "head", "labels": ["a", "b", "c"]},
    {"type": "instruction"}])
def test_model_card_says_how_to_use_the_folder(kind: str, task: dict) -> None:
    card = Card(kind, "org/base", "lora", {"r": 8, "alpha": 16}, task, chat_template=False,
                max_lora_rank=8 if kind == "vllm" else None)
    text = render(card, "/models/x")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "README.md", "exec")  # the snippet is Python
    assert "org/base" in text and f"task type: {task['type']}" in text
    if task["type"] == "verbaliser":
        assert '`"Review: {text}\\nSentiment:"`' in text and '`neg` -> `" bad"`' in text
    if task["type"] == "head":
        assert "`a`, `b`, `c`" in text and ("num_labels=3" in code) == (kind != "merged")
    assert ("--max-lora-rank 8" in text) == (kind == "vllm")
    assert ("PeftModel" in code) == (kind != "merged")


def test_an_image_models_card_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from petkit.models.vision import tiny_vision_model

    model = tiny_vision_model(num_labels=3, image_size=16)
    model.config.id2label = {0: "cat", 1: "dog", 2: "owl"}
    model.save_pretrained(tmp_path / "vit")
    card = Card("merged", "org/vit", "lora", {"r": 4}, {"type": "head", "labels": ["cat", "dog", "owl"]},
                image=True)
    code = render(card, str(tmp_path / "vit")).split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the card's own snippet
    assert set(eval(capsys.readouterr().out)) == {"cat", "dog", "owl"}  # noqa: S307


def test_an_init_with_a_frozen_offset_exports_to_vllm_at_twice_its_rank(tmp_path: Path) -> None:
    """PiSSA/OLoRA-style adapters hold init_A/init_B: folded into one rank-2r LoRA on export,
    so vLLM can serve them and needs --max-lora-rank for 2r."""
    from petkit.app.export import exported_rank
    from toys import llama

    for init in ("pissa", "olora"):
        model = pk.attach(llama(), pk.LoraConfig(r=2, init=init), name="a")
        folder = pk.save_adapter(model, tmp_path / init, name="a")
        assert vllm_refusal(folder) is None
        assert exported_rank(folder) == 4
    plain = pk.save_adapter(pk.attach(llama(), pk.LoraConfig(r=2), name="a"), tmp_path / "plain", name="a")
    assert exported_rank(plain) == 2
