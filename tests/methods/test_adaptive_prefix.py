"""Adaptive prefix tuning numerics: layer l's prefix is lambda_l * sigmoid(W_l h/|h| + b_l) (.) P_l,
h the hidden state of the first real token entering block l; at init it is prefix tuning."""
import copy

import pytest
import torch

import petkit as pk
from petkit.core.delta import innermost
from toys import bert_cls, llama, perturb

MODELS = {"llama": llama, "bert": bert_cls}


def batch():
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(4))
    return ids, torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])  # row 1: first real token at 1


def unit(h):
    return h / h.norm()


def blocks(model):
    return model.model.layers if hasattr(model, "model") else model.bert.encoder.layer


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_at_init_equals_prefix_tuning(arch):
    base = MODELS[arch]()
    apt, plain = copy.deepcopy(base), copy.deepcopy(base)
    pk.attach(apt, pk.AdaptivePrefixConfig(num_virtual_tokens=3, seed=2))
    pk.attach(plain, pk.PrefixConfig(num_virtual_tokens=3, seed=2))
    ids, mask = batch()
    torch.testing.assert_close(apt(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gates_match_closed_form(arch):
    base = MODELS[arch]()
    apt = copy.deepcopy(base)
    pk.attach(apt, pk.AdaptivePrefixConfig(num_virtual_tokens=3))
    perturb(pk.trainable_parameters(apt), seed=5, scale=0.5)
    ids, mask = batch()
    entering = {}
    hooks = [innermost(b).register_forward_pre_hook(lambda m, a, kw, i=i: entering.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
             for i, b in enumerate(blocks(apt))]
    out = apt(input_ids=ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    prefixes = apt.get_input_embeddings().prefixes().detach()  # (layers, 2, heads, n, dim)
    first = mask.argmax(dim=1)
    for row in range(2):
        gated = torch.stack([
            g.scale * torch.sigmoid(g.gate(unit(entering[l][row, first[row]]))) for l, g in enumerate(blocks(apt))
        ]).detach()  # (layers, n)
        plain = copy.deepcopy(base)
        pk.attach(plain, pk.PrefixConfig(num_virtual_tokens=3, init="random"))
        with torch.no_grad():
            plain.get_input_embeddings().prefix.copy_(prefixes * gated[:, None, None, :, None])
        expected = plain(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        torch.testing.assert_close(out[row:row + 1], expected, rtol=1e-5, atol=1e-5)


def test_gates_see_no_later_token_on_a_decoder():
    m = llama()
    pk.attach(m, pk.AdaptivePrefixConfig(num_virtual_tokens=2))
    perturb(pk.trainable_parameters(m), seed=1, scale=0.5)
    ids = torch.randint(3, 60, (1, 6))
    full = m(input_ids=ids).logits
    short = m(input_ids=ids[:, :3]).logits
    torch.testing.assert_close(full[:, :3], short, rtol=1e-5, atol=1e-5)  # causal: the gate leaks nothing


def test_reparameterised_prefix_folds():
    m = llama()
    pk.attach(m, pk.AdaptivePrefixConfig(num_virtual_tokens=2, projection_dim=8))
    perturb(pk.trainable_parameters(m), seed=1, scale=0.5)
    ids, mask = batch()
    before = m(input_ids=ids, attention_mask=mask).logits
    pk.fold(m)
    assert pk.adapters(m)["default"].config.projection_dim == 0
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, before, rtol=1e-6, atol=1e-6)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(pk.ConfigError, match="context"):
        pk.attach(llama(), pk.AdaptivePrefixConfig(num_virtual_tokens=500))
    with pytest.raises(pk.ConfigError, match="targets must be None"):
        pk.AdaptivePrefixConfig(targets="all-linear")
    with pytest.raises(pk.ConfigError, match="init must be one of"):
        pk.AdaptivePrefixConfig(init="text")
