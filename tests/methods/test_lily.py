"""Lily against its closed form: h = W0 x + s (A x) sum_e p_e B_e, p the batch mean of
softmax(R A x); A shared by `stride_A` consecutive layers of a kind, the B's by all of them,
each layer with its own router."""
from __future__ import annotations

import copy

import pytest
import torch

import petkit as pk
from toys import llama


def lily_model(**kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = llama()
    model = pk.attach(copy.deepcopy(base), pk.LilyConfig(r=4, num_B=3, scaling=0.5, **kwargs))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pk.trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return base, model


def q_proj(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].self_attn.q_proj


def test_forward_is_the_closed_form_with_the_batch_mean_routing():
    _, model = lily_model(stride_A=2)
    w = q_proj(model, 1)
    a, b = w.factors()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    hidden = x @ a.T  # (2, 5, r)
    probs = torch.zeros(3)
    for row in hidden.reshape(-1, 4):
        probs += torch.softmax(w.lily_router @ row, dim=0) / 10
    combined = sum(probs[e] * b.reshape(3, 4, 32)[e] for e in range(3))
    expected = w.base(x) + 0.5 * hidden @ combined
    with torch.no_grad():
        torch.testing.assert_close(w(x), expected, rtol=1e-5, atol=1e-6)
        # the mix of B's is the batch's: another second row changes the first row's output
        other = x.clone()
        other[1] += 1.0
        assert not torch.allclose(w(other)[0], w(x)[0])


@pytest.mark.parametrize("stride", [1, 2])
def test_layers_of_one_kind_share_a_by_blocks_and_b_across_all(stride):
    _, model = lily_model(stride_A=stride)
    first, second = q_proj(model, 0), q_proj(model, 1)
    assert (second.factors()[0] is first.factors()[0]) == (stride == 2)
    assert second.factors()[1] is first.factors()[1]
    assert second.lily_router is not first.lily_router
    v = model.model.layers[0].self_attn.v_proj
    assert v.factors()[1] is not first.factors()[1]  # v_proj is another kind
    # each shared tensor is trained and saved once
    params = pk.trainable_parameters(model)
    a_count = 4 * 32 * (2 // stride) + 4 * 32 * (2 // stride)  # q and v: A (r, in) per block
    b_count = 3 * 4 * 32 + 3 * 4 * 16  # q: (num_B r, 32), v: (num_B r, 16)
    assert sum(p.numel() for p in params.values()) == a_count + b_count + 4 * 3 * 4  # + 4 routers
    state = pk.adapter_state(model, "default")
    assert sum(k.endswith(".lily_B") for k in state) == 2


def test_a_shared_a_gets_the_gradient_of_every_layer_that_uses_it(tmp_path):
    base, model = lily_model(stride_A=2)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model(input_ids=ids).logits.pow(2).mean().backward()
    shared = q_proj(model, 0).lily_A
    grad = shared.grad.clone()
    shared.grad = None
    with torch.no_grad():  # layer 1's part alone: layer 0 disabled
        q_proj(model, 0).set_state(active=False)
    model(input_ids=ids).logits.pow(2).mean().backward()
    q_proj(model, 0).set_state(active=True)
    assert shared.grad.abs().max() > 0 and not torch.allclose(grad, shared.grad)
    model.eval()
    pk.save_adapter(model, tmp_path / "ad")
    again = pk.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    assert q_proj(again, 1).factors()[0] is q_proj(again, 0).lily_A
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(pk.ConfigError, match="num_B"):
        pk.LilyConfig(num_B=1)
    with pytest.raises(pk.ConfigError, match="stride_A"):
        pk.LilyConfig(stride_A=0)
    _, model = lily_model()
    with pytest.raises(pk.AdapterStateError, match="not mergeable"):
        pk.merge(model)
    partial = pk.attach(llama(), pk.LilyConfig(r=2, targets=["model.layers.0.self_attn.q_proj"]))
    with pytest.raises(pk.AdapterStateError, match="also 'model.layers.1.self_attn.q_proj'"):
        pk.export_peft(partial, tmp_path / "peft")
