"""Residual prompt tuning numerics: the model runs on [P + LN(W_up relu(W_down P)); E(x)]."""
import copy

import pytest
import torch
import torch.nn.functional as F

import petkit as pk
from toys import bert_cls, llama, perturb


def folded(wrapper):
    P = wrapper.prompt.detach()
    h = F.relu(P @ wrapper.down.weight.detach().T + wrapper.down.bias.detach())
    h = h @ wrapper.up.weight.detach().T + wrapper.up.bias.detach()
    return P + F.layer_norm(h, (P.shape[1],), wrapper.norm.weight.detach(), wrapper.norm.bias.detach(), 1e-5)


def test_forward_equals_model_on_reparameterised_prompt():
    base = llama()
    m = copy.deepcopy(base)
    pk.attach(m, pk.ResidualPromptConfig(num_virtual_tokens=3, bottleneck=5))
    perturb(pk.trainable_parameters(m))
    wrapper = m.model.embed_tokens
    assert wrapper.down.weight.shape == (5, 32)
    prompt = folded(wrapper)
    torch.testing.assert_close(wrapper.folded_prompt().detach(), prompt)
    ids = torch.randint(3, 60, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
    expected = base(inputs_embeds=embeds, attention_mask=full).logits[:, 3:]
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, expected)


def test_the_mlp_trains_and_gradients_reach_the_prompt():
    m = llama()
    pk.attach(m, pk.ResidualPromptConfig(num_virtual_tokens=2, bottleneck=4))
    ids = torch.randint(3, 60, (2, 5))
    m(input_ids=ids, labels=ids).loss.backward()
    grads = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]: p.grad for n, p in pk.trainable_parameters(m).items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert {"embed_tokens.prompt", "down.weight", "up.weight", "norm.weight"} <= set(grads)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_zero_branch_starts_at_the_prompt_and_still_learns(layer_norm):
    m = llama()
    pk.attach(m, pk.ResidualPromptConfig(num_virtual_tokens=2, bottleneck=4, layer_norm=layer_norm,
                                         branch_init="zero"))
    wrapper = m.model.embed_tokens
    assert torch.equal(wrapper.folded_prompt(), wrapper.prompt)
    ids = torch.randint(3, 60, (2, 5))
    m(input_ids=ids, labels=ids).loss.backward()
    zeroed = wrapper.norm.weight if layer_norm else wrapper.up.weight
    assert zeroed.grad is not None and zeroed.grad.abs().sum() > 0
    with pytest.raises(pk.ConfigError, match="branch_init"):
        pk.ResidualPromptConfig(branch_init="ones")


def test_greedy_generation_reloads_identically(tmp_path):
    m = llama()
    pk.attach(m, pk.ResidualPromptConfig(num_virtual_tokens=2, layer_norm=False))
    perturb(pk.trainable_parameters(m), scale=1.0)
    ids = torch.randint(3, 60, (1, 4))
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    pk.save_adapter(m, tmp_path / "a")
    other = llama()
    pk.load_adapter(other, tmp_path / "a")
    again = other.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out, again)


def test_encoder_and_bad_config():
    m = bert_cls()
    pk.attach(m, pk.ResidualPromptConfig(num_virtual_tokens=2, bottleneck=4))
    ids = torch.randint(3, 60, (2, 5))
    assert m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 3)
    with pytest.raises(pk.ConfigError, match="bottleneck"):
        pk.ResidualPromptConfig(bottleneck=0)
    with pytest.raises(pk.ConfigError, match="context"):
        pk.attach(llama(), pk.ResidualPromptConfig(num_virtual_tokens=10_000))
