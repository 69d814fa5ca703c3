"""VPT numerics against a closed-form reference on a tiny DINOv2, and its clear errors."""
from __future__ import annotations

import math

import pytest
import torch

import petkit as pk
from petkit.core.delta import DeltaModule, iter_deltas
from petkit.methods.vpt import VptBlock
from toys import TOYS, inputs, perturb, run


def tokens(model: torch.nn.Module, name: str = "a") -> list[torch.Tensor]:
    """The adapter's prompt tokens, block 0 first."""
    return [w.prompt for _, w in iter_deltas(model)
            if isinstance(w, VptBlock) and w.adapter_name == name and w.prompt is not None]


def reference(base: torch.nn.Module, pixels: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    """Logits with prompts[0] entering block 0 and prompts[i] replacing the tokens at block i."""
    vit = base.dinov2
    h = vit.embeddings(pixels)
    n, batch = prompts[0].shape[0], h.shape[0]
    x = torch.cat([prompts[0].expand(batch, -1, -1), h], dim=1)
    for i, layer in enumerate(vit.encoder.layer):
        if 0 < i < len(prompts):
            x = torch.cat([prompts[i].expand(batch, -1, -1), x[:, n:]], dim=1)
        x = layer(x)
    seq = vit.layernorm(x[:, n:])
    return base.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(dim=1)], dim=1))


@pytest.mark.parametrize("deep", [False, True])
def test_matches_the_closed_form(deep):
    base = TOYS["vit"](0)
    model = TOYS["vit"](0)
    pk.attach(model, pk.make_config("vpt", num_virtual_tokens=3, deep=deep), name="a")
    prompts = tokens(model)
    assert len(prompts) == (2 if deep else 1) and all(p.shape == (3, 32) for p in prompts)
    batch = inputs("vit")
    with torch.no_grad():
        torch.testing.assert_close(run(model, batch), reference(base, batch["pixel_values"], prompts))


def test_stacked_adapters_equal_one_adapter_with_all_tokens():
    """Attention in a ViT block has no positions: a (2 tokens) + b (3 tokens) = one of 5."""
    model, single = TOYS["vit"](0), TOYS["vit"](0)
    pk.attach(model, pk.make_config("vpt", num_virtual_tokens=2), name="a")
    pk.attach(model, pk.make_config("vpt", num_virtual_tokens=3, seed=1), name="b")
    pk.activate(model, ["a", "b"])
    pk.attach(single, pk.make_config("vpt", num_virtual_tokens=5), name="a")
    with torch.no_grad():
        tokens(single)[0].copy_(torch.cat([tokens(model, "b")[0], tokens(model, "a")[0]]))
    batch = inputs("vit")
    torch.testing.assert_close(run(model, batch), run(single, batch))


def test_init_is_seeded_and_within_the_xavier_bound():
    a, b, c = (TOYS["vit"](0) for _ in range(3))
    pk.attach(a, pk.make_config("vpt", deep=True))
    pk.attach(b, pk.make_config("vpt", deep=True))
    pk.attach(c, pk.make_config("vpt", deep=True, seed=1))
    bound = math.sqrt(6 / (3 * 4 * 4 + 32))  # patch 4, width 32
    assert all(torch.equal(x, y) for x, y in zip(tokens(a, "default"), tokens(b, "default")))
    assert not torch.equal(tokens(a, "default")[0], tokens(c, "default")[0])
    assert max(float(t.detach().abs().max()) for t in tokens(a, "default")) <= bound


def test_trainable_counts_shallow_and_deep():
    shallow, deep = TOYS["vit"](0), TOYS["vit"](0)
    pk.attach(shallow, pk.make_config("vpt", num_virtual_tokens=4))
    pk.attach(deep, pk.make_config("vpt", num_virtual_tokens=4, deep=True))
    assert sum(p.numel() for p in pk.trainable_parameters(shallow).values()) == 4 * 32
    assert sum(p.numel() for p in pk.trainable_parameters(deep).values()) == 2 * 4 * 32


def test_gradient_reaches_every_block_token():
    model = TOYS["vit"](0)
    pk.attach(model, pk.make_config("vpt", deep=True))
    perturb(pk.trainable_parameters(model))
    run(model, inputs("vit")).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tokens(model, "default"))


@pytest.mark.parametrize("kwargs, field", [({"num_virtual_tokens": 0}, "num_virtual_tokens"),
                                           ({"deep": "yes"}, "deep"),
                                           ({"dropout": 1.5}, "dropout"),
                                           ({"targets": ["query"]}, "targets")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(pk.ConfigError, match=field):
        pk.make_config("vpt", **kwargs)


def test_text_model_gets_a_clear_error_and_stays_unchanged():
    model = TOYS["bert"](0)
    with pytest.raises(pk.TargetError, match="vision transformer.*'prompt'"):
        pk.attach(model, pk.make_config("vpt"))
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
