"""Prefix tuning numerics.

Decoders: a prefix that holds the keys/values the model computes for tokens t equals running t
in front of the input (with the input's positions shifted by len(t)). Encoder (BERT): every
self-attention equals softmax(q [Pk; K]^T / sqrt(d) + mask) [Pv; V] computed by hand.
Reparameterisation: prefixes = W2 tanh(W1 E + b1) + b2; folding keeps outputs, drops parameters.
"""
import copy
import math

import pytest
import torch

import petkit as pk
from petkit.methods.prefix import random_tokens
from toys import bert_cls, gpt2, llama, perturb

DECODERS = {"llama": llama, "gpt2": gpt2}


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_prefix_of_real_tokens_equals_running_them_in_front(arch):
    base = DECODERS[arch]()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=3, seed=7))  # "vocab": keys/values of 3 random tokens
    t = random_tokens(base, 3, seed=7)
    ids, mask = batch()
    pos = torch.arange(3, 8).unsqueeze(0)
    out = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    full = torch.cat([t.expand(2, -1), ids], dim=1)
    full_mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
    expected = base(input_ids=full, attention_mask=full_mask).logits[:, 3:]
    keep = mask.bool()
    torch.testing.assert_close(out[keep], expected[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_caller_tokens_keep_their_positions(arch):
    m = DECODERS[arch]()
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=4))
    ids, mask = batch()
    default = m(input_ids=ids, attention_mask=mask).logits
    given = m(input_ids=ids, attention_mask=mask, position_ids=torch.arange(5).unsqueeze(0)).logits
    torch.testing.assert_close(default, given, rtol=0, atol=0)


def manual_self_attention(module, prefix_k, prefix_v, mask2d):
    """BertSelfAttention with a prefix, by hand: softmax(q [Pk;K]^T/sqrt(d) + m) [Pv;V]."""

    def forward(hidden_states, *args, **kwargs):
        b, length, _ = hidden_states.shape
        heads, d = module.num_attention_heads, module.attention_head_size

        def split(x):
            return x.view(b, length, heads, d).transpose(1, 2)

        q, k, v = split(module.query(hidden_states)), split(module.key(hidden_states)), split(module.value(hidden_states))
        k = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2)
        visible = torch.cat([torch.ones(b, prefix_k.shape[2]), mask2d.float()], dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + (1 - visible)[:, None, None, :] * -1e9
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).reshape(b, length, heads * d), None

    return forward


def test_bert_matches_hand_written_attention_with_padding():
    base = bert_cls()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=3, init="random", init_std=0.5))
    ids, mask = batch()
    prefixes = m.bert.embeddings.word_embeddings.prefixes().detach()
    for i, layer in enumerate(base.bert.encoder.layer):
        attn = layer.attention.self
        attn.forward = manual_self_attention(attn, prefixes[i, 0][None], prefixes[i, 1][None], mask)
    expected = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)


def test_reparameterisation_is_the_mlp_closed_form():
    m = llama()
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=3, projection_dim=6))
    ext = m.model.embed_tokens
    lin1, lin2 = ext.encoder[0], ext.encoder[2]
    flat = torch.tanh(ext.embedding @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias  # (n, L*2*H*D)
    layers, _, heads, n, dim = ext.shape
    p = ext.prefixes()
    for layer, kv, head, tok, d in [(0, 0, 0, 0, 0), (1, 1, 1, 2, 7), (1, 0, 1, 1, 3), (0, 1, 0, 2, 5)]:
        assert p[layer, kv, head, tok, d] == flat[tok, ((layer * 2 + kv) * heads + head) * dim + d]


@pytest.mark.parametrize("make", [llama, bert_cls], ids=["llama", "bert"])
def test_fold_keeps_outputs_drops_parameters_and_reloads(make, tmp_path):
    base = make()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=3, projection_dim=16))
    perturb(pk.trainable_parameters(m), scale=0.3)
    ids, mask = batch()
    before = m(input_ids=ids, attention_mask=mask).logits
    n_before = sum(p.numel() for p in pk.trainable_parameters(m).values())
    pk.fold(m)
    assert pk.adapters(m)["default"].config.projection_dim == 0
    params = pk.trainable_parameters(m)
    assert [n.rsplit(".", 1)[-1] for n in params] == ["prefix"]
    assert sum(p.numel() for p in params.values()) < n_before
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, before, rtol=1e-6, atol=1e-6)
    pk.fold(m)  # folding twice is a no-op
    pk.save_adapter(m, tmp_path / "a")
    other = copy.deepcopy(base)
    pk.load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(other(input_ids=ids, attention_mask=mask).logits, before, rtol=1e-6, atol=1e-6)


def test_encoder_with_token_types_and_no_mask():
    base = bert_cls()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=2))
    ids, _ = batch()
    out = m(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(out, m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    assert out.shape == (2, 3)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(pk.ConfigError, match="context"):
        pk.attach(llama(), pk.PrefixConfig(num_virtual_tokens=128))  # tiny llama: 128 positions
    with pytest.raises(pk.ConfigError, match="num_virtual_tokens must be >= 1"):
        pk.PrefixConfig(num_virtual_tokens=0)
    with pytest.raises(pk.ConfigError, match="projection_dim must be >= 0"):
        pk.PrefixConfig(projection_dim=-1)
    with pytest.raises(pk.ConfigError, match="targets must be None"):
        pk.PrefixConfig(targets=["q_proj"])
    with pytest.raises(pk.TargetError, match="input embeddings"):
        pk.attach(torch.nn.Sequential(torch.nn.Linear(2, 2)), pk.PrefixConfig())


def test_gradient_checkpointing_is_refused_before_training():
    m = llama()
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=2))
    m.train()
    ids, mask = batch()
    with pytest.raises(pk.ConfigError, match="gradient checkpointing"):
        m(input_ids=ids, attention_mask=mask, labels=ids)


@pytest.mark.parametrize("projection_dim", [0, 8])
def test_zero_init_gives_zero_keys_and_values_that_still_train(projection_dim):
    m = llama()
    pk.attach(m, pk.PrefixConfig(num_virtual_tokens=2, init="zero", projection_dim=projection_dim))
    ext = m.get_input_embeddings()
    assert torch.count_nonzero(ext.prefixes()) == 0
    ids, mask = batch()
    m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = [p.grad for p in pk.trainable_parameters(m).values()]
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads)
