"""Prefix-propagation numerics: H_0 = [P_0; E(x)], block l >= 1 gets P_l added at the prefix
positions of what block l-1 computed — checked against plain hooks on the base model; at init
(P_l = 0) it is prompt tuning with P_0."""
import copy

import pytest
import torch

import petkit as pk
from toys import bert_cls, gpt2, llama, perturb

MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert_cls}


def batch():
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(8))
    return ids, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def blocks(model):
    for path in ("model.layers", "transformer.h", "bert.encoder.layer"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_at_init_equals_prompt_tuning(arch):
    base = MODELS[arch]()
    prop, prompt = copy.deepcopy(base), copy.deepcopy(base)
    pk.attach(prop, pk.PrefixPropagationConfig(num_virtual_tokens=3, seed=4))
    pk.attach(prompt, pk.PromptConfig(num_virtual_tokens=3, seed=4))
    ids, mask = batch()
    torch.testing.assert_close(prop(input_ids=ids, attention_mask=mask).logits,
                               prompt(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_matches_hooks_on_the_base_model(arch):
    base = MODELS[arch]()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PrefixPropagationConfig(num_virtual_tokens=3))
    perturb(pk.trainable_parameters(m), seed=2, scale=0.5)
    n, ids, (_, mask) = 3, batch()[0], batch()
    p0 = m.get_input_embeddings().prompt.detach()
    per_layer = {i: b.prefix.detach() for i, b in enumerate(blocks(m)) if i > 0}
    assert set(per_layer) == set(range(1, len(blocks(m))))

    def add(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h = torch.cat([h[:, :n] + per_layer[i], h[:, n:]], dim=1)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        return hook

    hooks = [b.register_forward_pre_hook(add(i), with_kwargs=True) for i, b in enumerate(blocks(base)) if i > 0]
    embeds = torch.cat([p0.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, n, dtype=mask.dtype), mask], dim=1)
    extra = {"token_type_ids": torch.zeros(2, n + 5, dtype=torch.long)} if arch == "bert" else {}
    expected = base(inputs_embeds=embeds, attention_mask=full_mask, **extra).logits
    for h in hooks:
        h.remove()
    expected = expected if arch == "bert" else expected[:, n:]
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)


def test_half_the_parameters_of_prefix_tuning_per_layer_without_kv_grouping():
    sizes = {}
    for cfg in (pk.PrefixPropagationConfig(num_virtual_tokens=4), pk.PrefixConfig(num_virtual_tokens=4)):
        m = gpt2()  # 4 heads x 8 dims = hidden: a key and a value per token vs one hidden state
        pk.attach(m, cfg)
        sizes[cfg.method] = sum(p.numel() for p in pk.trainable_parameters(m).values())
    assert 2 * sizes["prefix-propagation"] == sizes["prefix"]


def test_labels_line_up_and_loss_is_finite():
    m = llama()
    pk.attach(m, pk.PrefixPropagationConfig(num_virtual_tokens=2))
    ids, mask = batch()
    out = m(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 5, 128) and torch.isfinite(out.loss)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(pk.ConfigError, match="context"):
        pk.attach(bert_cls(), pk.PrefixPropagationConfig(num_virtual_tokens=128))
    with pytest.raises(pk.ConfigError, match="targets must be None"):
        pk.PrefixPropagationConfig(targets=["mlp"])
    with pytest.raises(pk.TargetError, match="stack of transformer blocks"):
        pk.attach(torch.nn.Sequential(torch.nn.Linear(2, 2)), pk.PrefixPropagationConfig())
