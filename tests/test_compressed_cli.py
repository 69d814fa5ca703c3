"""Compressed bases from the command line: pruning while tuning, merging a QLoRA adapter, PEQA."""
from __future__ import annotations

import json
import re

import pytest
import torch

from petkit.cli import main
from toys import save_tiny_llama

SHORT = ["--data", "rotten-tomatoes", "--steps", "4", "--train-size", "16", "--test-size", "8",
         "--max-length", "32", "--batch-size", "4", "--train.progress=false"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama (4 heads in 2 KV groups) with the embedded model's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT (4 heads, a 4x-wide MLP of 128 channels) with minilm-l6's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from petkit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("method", ["loraprune", "apt"])
def test_train_prunes_and_saves_a_smaller_folder_with_the_same_logits(method, tiny_llama, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--model", tiny_llama, "--prune", method, "--sparsity", "0.5",
                 "--output", str(out), *SHORT]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"reloaded max \|logit difference\|: 0\.00e\+00", printed), printed
    config = AutoConfig.from_pretrained(out / "pruned")
    assert (config.num_key_value_heads, config.num_attention_heads, config.intermediate_size) == (1, 2, 32)
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
    assert "prune: " + method in (out / "recipe.yaml").read_text()


@pytest.mark.parametrize("method", ["loraprune", "apt"])
def test_train_prunes_the_mlp_channels_of_an_encoder(method, tiny_bert, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = tmp_path / "run"
    assert main(["train", "--model", tiny_bert, "--data", "bbc-news", "--prune", method, "--sparsity", "0.5",
                 "--output", str(out), *SHORT[2:]]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"reloaded max \|logit difference\|: 0\.00e\+00", printed), printed
    config = AutoConfig.from_pretrained(out / "pruned")
    # half of 2 x (4 x 32 x 33 + 128 x 65 + 32) block parameters is 97 channels of 65; heads all stay
    assert (config.num_attention_heads, config.intermediate_size, config.num_labels) == (4, 31, 5)
    pruned = AutoModelForSequenceClassification.from_pretrained(out / "pruned")
    assert pruned.bert.encoder.layer[0].output.dense.weight.shape == (32, 31)


def test_encoder_sparsity_beyond_the_mlp_is_a_one_line_error(tiny_bert, tmp_path, capsys):
    assert main(["train", "--model", tiny_bert, "--data", "bbc-news", "--prune", "loraprune", "--sparsity", "0.7",
                 "--output", str(tmp_path / "x"), *SHORT[2:]]) == 2
    assert "sparsity=0.7 is out of reach on this model: MLP channels alone (a BERT-style encoder keeps its heads) " \
           "remove at most 0.656 of the block parameters" in capsys.readouterr().err


def test_merge_of_a_qlora_adapter_dense_and_requantised(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import petkit as pk

    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_llama, "--quantize", "nf4", "--lr", "1e-2", "--output", str(out),
                 *SHORT]) == 0
    trained = pk.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama), "nf4")
    pk.load_adapter(trained, out / "adapter")
    ids = torch.randint(3, 1000, (2, 10))
    reference = _logits(trained, ids)

    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "dense")]) == 0
    assert "dequantised nf4 base" in capsys.readouterr().out
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(dense, ids), reference, rtol=1e-4, atol=1e-4)

    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "q4"), "--requantize"]) == 0
    error = float(re.search(r"relative logits error added by requantising: ([0-9.]+)", capsys.readouterr().out)[1])
    four = AutoModelForCausalLM.from_pretrained(tmp_path / "q4")
    assert four.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert 0 < error < 0.5
    # with gradients on: bitsandbytes' CPU inference repacking needs rows wider than this tiny model's
    measured = float((four(input_ids=ids).logits.detach() - reference).norm() / reference.norm())
    assert measured < 0.5


def test_peqa_trains_and_merges_from_the_cli(tiny_llama, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--model", tiny_llama, "--method", "peqa", "--output", str(out), *SHORT]) == 0
    with safe_open(str(out / "adapter" / "adapter.safetensors"), "pt") as f:
        assert f.keys() and all(k.endswith("scales") for k in f.keys())
    assert json.loads((out / "adapter" / "adapter.json").read_text())["method"] == "peqa"
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


@pytest.mark.parametrize("flags,message", [
    (["--prune", "magnitude"], "--prune must be loraprune or apt"),
    (["--prune", "apt", "--sparsity", "1.5"], "--sparsity must be"),
    (["--prune", "loraprune", "--quantize", "nf4"], "not supported"),
])
def test_pruning_mistakes_are_one_line_errors(flags, message, tmp_path, capsys):
    assert main(["train", *flags, "--output", str(tmp_path / "x"), *SHORT]) == 2
    assert message in capsys.readouterr().err


def test_requantize_needs_a_quantised_adapter(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_llama, "--steps", "1", "--output", str(out), *SHORT[2:]]) == 0
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "m"), "--requantize"]) == 2
    assert "--requantize needs" in capsys.readouterr().err


@pytest.mark.slow
def test_train_prunes_the_embedded_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--prune", "loraprune", "--sparsity", "0.5", "--steps", "2", "--train-size", "16",
                 "--test-size", "8", "--max-length", "32", "--batch-size", "4", "--output", str(out),
                 "--train.progress=false"]) == 0
    assert re.search(r"reloaded max \|logit difference\|: 0\.00e\+00", capsys.readouterr().out)
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    # smollm2-135m: 9 heads in 3 KV groups, 1,536 MLP channels; one whole group goes at 50%
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads) == (2, 6)
    assert pruned.config.intermediate_size < 1536
    total = sum(p.numel() for p in pruned.parameters())
    assert total < 0.7 * 134_515_008
