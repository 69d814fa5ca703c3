"""(IA)3 numerics: k = l_k ⊙ W_k x, v = l_v ⊙ W_v x, FFN down projection sees l_ff ⊙ h."""
import pytest
import torch

import petkit as pk
from toys import gpt2, inputs, llama, mlp, perturb, run


def test_output_and_input_scaling_closed_form():
    m = mlp()
    W1, b1, W2 = (t.detach().clone() for t in (m.fc1.weight, m.fc1.bias, m.fc2.weight))
    pk.attach(m, pk.IA3Config(targets=["fc1"], feedforward_targets=["fc2"]))
    assert torch.equal(m.fc1.ia3_l, torch.ones(16)) and torch.equal(m.fc2.ia3_l, torch.ones(16))
    perturb(pk.trainable_parameters(m))
    l_out, l_in = m.fc1.ia3_l.detach(), m.fc2.ia3_l.detach()
    x, h = torch.randn(3, 8), torch.randn(3, 16)
    torch.testing.assert_close(m.fc1(x), (x @ W1.T + b1) * l_out)
    torch.testing.assert_close(m.fc2(h), (h * l_in) @ W2.T)
    torch.testing.assert_close(m.fc1.delta_weight(), (l_out - 1)[:, None] * W1)
    torch.testing.assert_close(m.fc1.delta_bias(), (l_out - 1) * b1)
    torch.testing.assert_close(m.fc2.delta_weight(), W2 * (l_in - 1)[None, :])
    assert m.fc2.delta_bias() is None


def test_default_roles_on_llama_and_counts():
    m = llama()
    pk.attach(m, pk.IA3Config())
    counts = {n.split("layers.0.")[-1]: p.numel() for n, p in pk.trainable_parameters(m).items() if "layers.0." in n}
    cfg = m.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert counts == {"self_attn.k_proj.ia3_l": kv, "self_attn.v_proj.ia3_l": kv,
                      "mlp.down_proj.ia3_l": cfg.intermediate_size}


def test_gpt2_conv1d_scaling_and_merge_layout():
    m, batch = gpt2(), inputs("gpt2")
    pk.attach(m, pk.IA3Config())
    perturb(pk.trainable_parameters(m), scale=0.3)
    attn, proj = m.transformer.h[0].attn.c_attn, m.transformer.h[0].mlp.c_proj
    W, b = attn.base.weight.detach().clone(), attn.base.bias.detach().clone()  # Conv1D: (in, out)
    x = torch.randn(2, 32)
    torch.testing.assert_close(attn(x), (x @ W + b) * attn.ia3_l.detach())
    h = torch.randn(2, proj.base.weight.shape[0])
    torch.testing.assert_close(proj(h), (h * proj.ia3_l.detach()) @ proj.base.weight.detach() + proj.base.bias.detach())
    expected = run(m, batch)
    pk.merge(m)
    torch.testing.assert_close(attn.base.weight.detach(), W * attn.ia3_l.detach()[None, :])
    torch.testing.assert_close(run(m, batch), expected, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_weights_exactly_after_repeated_merges():
    m = mlp()
    W = m.fc1.weight.detach().clone()
    pk.attach(m, pk.IA3Config(targets=["fc1"], feedforward_targets=[]))
    perturb(pk.trainable_parameters(m), scale=0.5)
    for _ in range(3):
        pk.merge(m)
        pk.unmerge(m)
    torch.testing.assert_close(m.fc1.base.weight.detach(), W, rtol=0, atol=1e-6)


def test_overlap_and_empty_targets_are_errors():
    with pytest.raises(pk.ConfigError, match="both"):
        pk.attach(mlp(), pk.IA3Config(targets=["fc1"], feedforward_targets=["fc1"]))
    with pytest.raises(pk.TargetError, match="nothing to scale"):
        pk.attach(mlp(), pk.IA3Config(targets=[], feedforward_targets=[]))
    with pytest.raises(pk.ConfigError, match="feedforward_targets"):
        pk.IA3Config(feedforward_targets=3)


def test_merging_over_an_unmerged_inner_delta_is_refused():
    m = mlp()
    pk.attach(m, pk.LoraConfig(r=2, targets=["fc1"]), name="lo")
    pk.attach(m, pk.IA3Config(targets=["fc1"], feedforward_targets=[]), name="ia")
    pk.activate(m, ["lo", "ia"])
    perturb(pk.trainable_parameters(m))
    x = torch.randn(2, 8)
    out = m(x)
    with pytest.raises(pk.AdapterStateError, match="not merged"):
        pk.merge(m, ["ia"])
    torch.testing.assert_close(m(x), out, rtol=0, atol=0)
