"""Prompt tuning and prefix tuning exchange with PEFT 0.21's PROMPT_TUNING / PREFIX_TUNING folders
(task CAUSAL_LM) in both directions with the same logits (max difference <= 1e-5; PEFT's prompt
tuning returns logits for its virtual positions too, which are left out)."""
from __future__ import annotations

import copy

import pytest
import torch

import petkit as pk
from toys import bert_cls, gpt2, inputs, llama, perturb, run

peft = pytest.importorskip("peft")

N = 3
PETKIT = [("prompt", {"init": "random"}), ("prefix", {"init": "random", "positions": "after_prefix"}),
          ("prefix", {"init": "random", "positions": "after_prefix", "projection_dim": 8})]


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    theirs = theirs[:, theirs.shape[1] - ours.shape[1]:]  # PEFT's prompt tuning: drop virtual positions
    assert (ours - theirs).abs().max() <= 1e-5, float((ours - theirs).abs().max())


@pytest.mark.parametrize("toy", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method,kwargs", PETKIT, ids=["prompt", "prefix", "prefix-projection"])
def test_petkit_prompts_load_in_peft_and_back_with_the_same_logits(toy, method, kwargs, tmp_path):
    base, batch = toy(), inputs("llama")
    model = pk.attach(copy.deepcopy(base), pk.make_config(method, num_virtual_tokens=N, **kwargs))
    perturb(pk.trainable_parameters(model), seed=3)
    expected = run(model, batch)
    assert not torch.allclose(expected, run(base, batch))
    pk.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    close(expected, run(theirs, batch))
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert pk.adapters(ours)["default"].config.method == method
    close(run(ours, batch), expected)


PEFT = [lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                        encoder_hidden_size=8)]


@pytest.mark.parametrize("toy", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("make", PEFT, ids=["prompt", "prefix", "prefix-projection"])
def test_peft_prompts_load_in_petkit_with_the_same_logits(toy, make, tmp_path):
    base, batch = toy(), inputs("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), make())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    theirs.eval()
    expected = run(theirs, batch)
    theirs.save_pretrained(tmp_path / "peft")
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "peft")
    close(run(ours, batch), expected)


def test_what_peft_would_compute_otherwise_is_refused(tmp_path):
    own = pk.attach(llama(), pk.PrefixConfig(num_virtual_tokens=N, init="random"))  # positions 0..L-1
    with pytest.raises(pk.AdapterStateError, match="positions='after_prefix'"):
        pk.export_peft(own, tmp_path / "a")
    shifted = pk.attach(llama(), pk.PrefixConfig(num_virtual_tokens=N, positions="after_prefix", init="random"))
    batch = inputs("llama")
    assert not torch.allclose(run(own, batch), run(shifted, batch))  # rotary positions differ
    encoder = pk.attach(bert_cls(), pk.PromptConfig(num_virtual_tokens=N))
    with pytest.raises(pk.AdapterStateError, match="causal language models"):
        pk.export_peft(encoder, tmp_path / "b")
    with pytest.raises(pk.ConfigError, match="positions"):
        pk.PrefixConfig(positions="before")
    pk.export_peft(pk.attach(llama(), pk.PromptConfig(num_virtual_tokens=N)), tmp_path / "c")
    config = (tmp_path / "c" / "adapter_config.json").read_text().replace('"CAUSAL_LM"', '"SEQ_CLS"')
    (tmp_path / "c" / "adapter_config.json").write_text(config)
    with pytest.raises(pk.AdapterLoadError, match="SEQ_CLS"):
        pk.import_peft(llama(), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
