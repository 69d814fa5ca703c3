"""Sparse mixture of LoRA experts against a per-token reference:

    g = renormalised top-k of softmax(W_g x);  h = W0 x + (alpha / r) * sum_e g_e B_e A_e x
"""
import math

import pytest
import torch

import petkit as pk
from petkit.methods.sira import experts_per_path
from petkit.training.step_hooks import StepHooks
from toys import One, inputs, llama, perturb, run


def reference(w, x):
    out = []
    for token in x:
        p = torch.softmax(w.gate @ token, dim=0)
        top = torch.topk(p, w.top_k).indices
        delta = torch.zeros(w.lora_B.shape[0])
        for e in top.tolist():
            rows = slice(e * w.r, (e + 1) * w.r)
            delta += p[e] / p[top].sum() * (w.lora_B[:, rows] @ (w.lora_A[rows] @ token))
        out.append(w.base(token) + w.scaling * delta)
    return torch.stack(out)


def mixture(**kw):
    m = One()
    pk.attach(m, pk.SiraConfig(targets=["proj"], **kw))
    perturb(pk.trainable_parameters(m), scale=0.5)
    return m.eval()


def test_forward_is_the_per_token_top_k_mixture():
    m = mixture(num_experts=4, top_k=2, r=2, alpha=4.0)
    x = torch.randn(7, 6)
    torch.testing.assert_close(m(x), reference(m.proj, x).detach())


def test_capacity_caps_tokens_per_expert_in_training_only():
    m = mixture(num_experts=4, top_k=1, capacity_factor=0.5)
    x = torch.randn(40, 6)
    m.eval()
    free = m(x)
    torch.testing.assert_close(free, reference(m.proj, x).detach())  # no capacity at inference
    pk.expert_load(m, reset=True)
    m.train()
    m(x)
    counts = m.proj.expert_counts()
    assert counts.max() <= math.ceil(0.5 * 40 * 1 / 4) and counts.sum() < 40
    metrics = StepHooks(m).metrics()
    assert metrics["expert_dropped"] == pytest.approx(1 - float(counts.sum()) / 40)
    assert metrics["expert_imbalance"] >= 1.0


def test_expert_dropout_only_in_training():
    m = mixture(expert_dropout=0.5, capacity_factor=None)
    x = torch.randn(30, 6)
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x), reference(m.proj, x))


def test_expert_load_reports_shares_per_layer():
    m = llama()
    pk.attach(m, pk.SiraConfig(num_experts=3, top_k=1))
    run(m, inputs("llama"))
    load = pk.expert_load(m)
    assert len(load) == 4 and all(len(v) == 3 for v in load.values())
    assert all(sum(v) == pytest.approx(1.0) for v in load.values())
    pk.expert_load(m, reset=True)
    assert all(sum(v) == 0 for v in pk.expert_load(m).values())
    lora = One()
    pk.attach(lora, pk.LoraConfig(targets=["proj"]))
    with pytest.raises(pk.ConfigError, match="has no experts"):
        pk.expert_load(lora)


def test_mola_layer_wise_allocation():
    paths = [f"model.layers.{i}.q_proj" for i in range(8)]
    assert experts_per_path(paths, 4, (2, 4, 6, 8)) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert experts_per_path(paths, 4, None) == [4] * 8
    m = llama()  # two layers: pattern (2, 5) gives layer 0 two experts, layer 1 five
    pk.attach(m, pk.SiraConfig(layer_experts=[2, 5], top_k=2))
    assert [m.model.layers[i].self_attn.q_proj.experts for i in (0, 1)] == [2, 5]
    assert m.model.layers[1].self_attn.v_proj.gate.shape[0] == 5


@pytest.mark.parametrize("kw,match", [({"top_k": 5, "num_experts": 4}, "top_k must be <= 4"),
                                      ({"layer_experts": [2, 4], "top_k": 3}, "top_k must be <= 2"),
                                      ({"capacity_factor": 0.0}, "capacity_factor must be >"),
                                      ({"layer_experts": [2, 0]}, r"layer_experts\[1\] must be >= 1")])
def test_bad_config_names_field_and_range(kw, match):
    with pytest.raises(pk.ConfigError, match=match):
        pk.SiraConfig(**kw)


def test_training_log_rows_report_expert_load():
    from petkit.training import TrainConfig, train

    m = llama()
    pk.attach(m, pk.SiraConfig(num_experts=4, top_k=1, capacity_factor=1.0))
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 60, (8,), generator=gen).tolist() for _ in range(8)]
    data = [{"input_ids": r, "attention_mask": [1] * 8, "labels": r} for r in rows]
    result = train(m, data, TrainConfig(lr=1e-2, max_steps=4, batch_size=4, log_every=2, progress=False))
    logged = [r for r in result.history if "train_loss" in r]
    assert len(logged) == 2
    assert all(r["expert_imbalance"] >= 1.0 and 0.0 <= r["expert_dropped"] < 1.0 for r in logged)
