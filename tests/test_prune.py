"""Pruning while tuning (LoRAPrune, APT): LoRA-gradient importance, cubic schedule, GQA-safe slicing,
MLP-channel pruning of BERT-style encoders."""
from __future__ import annotations

import pytest
import torch

import petkit as pk
from petkit.compress import PruneConfig, finish_pruning, start_pruning
from petkit.compress.importance import GradStash, cubic_sparsity, weight_importance
from petkit.training import TrainConfig, train
from toys import One, bert_cls, gpt2, inputs, llama, perturb, run


def _data(n: int = 32, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 100, (length,), generator=g).tolist() for _ in range(n)]
    return [{"input_ids": r, "attention_mask": [1] * length, "labels": r} for r in rows]


def _pruned(method: str, sparsity: float = 0.5, encoder: bool = False, **kw):
    model = bert_cls() if encoder else llama()
    pk.attach(model, pk.LoraConfig(r=4, targets="all-linear", modules_to_save=["classifier"] if encoder else ()))
    pruner = start_pruning(model, PruneConfig(sparsity=sparsity, every=2, method=method, **kw))
    data = [{**row, "labels": i % 3} for i, row in enumerate(_data())] if encoder else _data()
    train(model, data, TrainConfig(max_steps=20, batch_size=4, lr=1e-2, log_every=10))
    return model, pruner


@pytest.mark.parametrize("method", ["loraprune", "apt"])
def test_pruned_model_reloads_smaller_with_the_same_logits(method, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _pruned(method)
    batch = inputs("llama")
    masked = run(model, batch).detach()
    report = finish_pruning(model)
    # 2 KV groups of 2 query heads: one group goes whole (GQA kept), the MLP takes the rest
    assert (report["num_key_value_heads"], report["num_attention_heads"], report["intermediate_size"]) == (1, 2, 32)
    assert not any(isinstance(m, pk.core.delta.DeltaModule) for m in model.modules())
    torch.testing.assert_close(run(model, batch), masked, rtol=1e-5, atol=1e-5)
    block = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".layers." in n and "norm" not in n)  # noqa: E731
    assert block(model) == 0.5 * block(llama())
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert again.model.layers[1].self_attn.k_proj.weight.shape == (8, 32)
    assert again.model.layers[1].mlp.down_proj.weight.shape == (32, 32)
    torch.testing.assert_close(run(again, batch), run(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["loraprune", "apt"])
def test_encoder_prunes_mlp_channels_and_reloads_with_the_same_logits(method, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, pruner = _pruned(method, sparsity=0.3, encoder=True)
    assert pruner.layers[0].attn_gate is None  # heads stay: transformers 5 cannot reload fewer
    batch = inputs("bert")
    masked = run(model, batch).detach()
    report = finish_pruning(model)
    # block = 4 x (32x32 + 32) attention + 64 channels x (32 + 1 + 32) + 32: 0.3 of it is 39 channels
    assert (report["num_attention_heads"], report["num_key_value_heads"], report["intermediate_size"]) == (4, None, 25)
    assert not any(isinstance(m, pk.core.delta.DeltaModule) for m in model.modules())
    torch.testing.assert_close(run(model, batch), masked, rtol=1e-5, atol=1e-5)
    block = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".layer." in n and "LayerNorm" not in n)  # noqa: E731
    assert abs(block(model) / block(bert_cls()) - 0.7) < 65 / 8448  # within one channel of the target
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    layer = again.bert.encoder.layer[1]
    assert layer.intermediate.dense.weight.shape == (25, 32) and layer.output.dense.weight.shape == (32, 25)
    assert layer.attention.self.query.weight.shape == (32, 32)
    torch.testing.assert_close(run(again, batch), run(model, batch), rtol=0, atol=0)


def test_encoder_channels_cannot_reach_every_sparsity():
    # the tiny BERT's MLP is 2x wide: channels alone are under half of the block's parameters
    with pytest.raises(pk.ConfigError, match=r"sparsity=0.5 is out of reach .* at most 0.487"):
        start_pruning(pk.attach(bert_cls(), pk.LoraConfig(targets="all-linear")), PruneConfig(sparsity=0.5))
    with pytest.raises(pk.ConfigError, match="attention=False"):
        start_pruning(pk.attach(llama(), pk.LoraConfig(targets="all-linear")),
                      PruneConfig(sparsity=0.7, attention=False))


def test_importance_is_built_from_lora_gradients_only():
    m = One()
    pk.attach(m, pk.LoraConfig(r=2, targets=["proj"]))
    perturb(pk.trainable_parameters(m), seed=1)
    wrapper, stash = m.proj, GradStash()
    a, b, s = wrapper.lowrank()
    stash.watch(a)
    stash.watch(b)
    m(torch.randn(3, 6)).pow(2).sum().backward()
    assert wrapper.base.weight.grad is None and not wrapper.base.weight.requires_grad
    assert {tuple(t.shape) for t in stash.grads.values()} == {tuple(a.shape), tuple(b.shape)}
    w = wrapper.base.weight.detach() + s * (b @ a).detach()
    expected = (w * (s * (b.grad @ a.detach() + b.detach() @ a.grad))).abs()
    torch.testing.assert_close(weight_importance(wrapper, stash), expected)
    stash.close()


def test_cubic_schedule():
    values = [cubic_sparsity(t, 100, 0.5, 0.1, 0.7) for t in range(0, 101, 5)]
    assert values[0] == values[2] == 0.0 and values[-1] == values[14] == 0.5
    assert all(x <= y for x, y in zip(values, values[1:]))
    assert cubic_sparsity(40, 100, 0.5, 0.1, 0.7) == pytest.approx(0.5 * (1 - 0.5**3))


def test_base_weights_never_get_a_gradient():
    model, _ = _pruned("loraprune", sparsity=0.3)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert base and all(p.grad is None and not p.requires_grad for p in base)


def test_apt_grows_ranks_without_changing_the_output():
    model = llama()
    pk.attach(model, pk.LoraConfig(r=8, targets="all-linear"))
    pruner = start_pruning(model, PruneConfig(method="apt", init_rank=2, grow_rank=2, grow_every=4, every=2, end=0.7))
    ranks = pruner.ranks
    assert all(int(m.sum()) == 2 for m in ranks.masks)
    train(model, _data(), TrainConfig(max_steps=12, batch_size=4, lr=1e-2, log_every=12))
    live = [int(m.sum()) for m in ranks.masks]
    assert max(live) > 2 and min(live) == 2  # only the salient layers grew
    assert torch.all(ranks.salience > 0)  # read from the factors' gradients before importance uses them
    ranks.salience = torch.arange(len(ranks.masks), dtype=torch.float)
    ranks.grow()  # the 25% most salient layers (here: the last ones) open 2 more ranks
    top = round(0.25 * len(ranks.masks))
    grown = [i for i, m in enumerate(ranks.masks) if int(m.sum()) == live[i] + 2]
    assert grown == list(range(len(ranks.masks) - top, len(ranks.masks)))
    for w, m in zip(ranks.wrappers, ranks.masks):
        closed = m == 0
        assert torch.all(w.lowrank()[1][:, closed] == 0)  # closed ranks never trained
    batch = inputs("llama")
    before = run(model, batch).detach()
    ranks.grow()  # new ranks open with B = 0
    torch.testing.assert_close(run(model, batch), before, rtol=0, atol=0)
    finish_pruning(model)


def test_user_mistakes_raise_petkit_errors():
    with pytest.raises(pk.ConfigError, match="sparsity"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(pk.ConfigError, match="method"):
        PruneConfig(method="magnitude")
    with pytest.raises(pk.AdapterStateError, match="attach a LoRA"):
        start_pruning(llama())
    with pytest.raises(pk.TargetError, match="Llama-style decoder or a BERT-style encoder"):
        start_pruning(pk.attach(gpt2(), pk.LoraConfig()))
    with pytest.raises(pk.TargetError, match="LoRA-family"):
        start_pruning(pk.attach(llama(), pk.IA3Config()))
