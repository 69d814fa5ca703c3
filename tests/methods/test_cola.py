"""Chain of LoRA: links train in turn on the schedule, earlier links stay frozen, the chain sums.

    h = W0 x + (alpha / r) * sum_{i <= j} B_i A_i x
"""
import copy

import torch

import petkit as pk
from petkit.training import TrainConfig, train
from toys import One, inputs, llama, perturb, run


def lm_data(n: int = 16) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 60, (8,), generator=gen).tolist() for _ in range(n)]
    return [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows]


def test_eval_forward_is_the_sum_of_every_link():
    m = One()
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.ColaConfig(r=2, links=3, alpha=4.0, targets=["proj"]))
    perturb(pk.trainable_parameters(m), scale=0.3)
    w, x = m.proj.eval(), torch.randn(3, 6)
    links = sum(w.lora_B[:, 2 * i:2 * i + 2] @ w.lora_A[2 * i:2 * i + 2] for i in range(3))
    torch.testing.assert_close(m(x), (x @ (w0 + 2.0 * links).T + b0).detach())


def test_training_link_j_learns_on_the_base_plus_earlier_links_only():
    m = One()
    pk.attach(m, pk.ColaConfig(r=2, links=3, link_steps=4, targets=["proj"]))
    perturb(pk.trainable_parameters(m), scale=0.3)
    w = m.proj.train()
    w.on_train_step(5, 12)  # step 5 of 4-step links: link 1 trains
    assert w.link == 1
    x = torch.randn(3, 6)
    m(x).pow(2).sum().backward()
    assert torch.count_nonzero(w.lora_A.grad[:2]) == 0 and torch.count_nonzero(w.lora_A.grad[4:]) == 0
    assert torch.count_nonzero(w.lora_A.grad[2:4]) > 0
    merged_base = w.base.weight + w.scaling * (w.lora_B[:, :2] @ w.lora_A[:2])  # "merge link 0 into W0"
    link1 = w.scaling * (w.lora_B[:, 2:4] @ w.lora_A[2:4])
    torch.testing.assert_close(m(x), x @ (merged_base + link1).T + w.base.bias)


def test_the_loop_advances_the_chain_and_frozen_links_never_move():
    model = llama()
    torch.manual_seed(0)
    pk.attach(model, pk.ColaConfig(r=2, links=3, link_steps=3))
    w = model.model.layers[0].self_attn.q_proj
    seen = {}
    original = type(w).on_train_step

    def spy(self, step, total):
        original(self, step, total)
        if self is w:
            seen[step] = (self.link, self.lora_B.detach().clone())

    type(w).on_train_step = spy
    try:
        train(model, lm_data(), TrainConfig(lr=1e-2, max_steps=9, batch_size=4, progress=False))
    finally:
        type(w).on_train_step = original
    assert [seen[s][0] for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    for i in range(3):
        assert torch.count_nonzero(w.lora_B[:, 2 * i:2 * i + 2]) > 0  # every link trained
    torch.testing.assert_close(seen[9][1][:, :2], seen[3][1][:, :2], rtol=0, atol=0)  # link 0 frozen after step 3
    torch.testing.assert_close(seen[9][1][:, 2:4], seen[6][1][:, 2:4], rtol=0, atol=0)


def test_chain_saves_as_one_adapter_or_as_its_links(tmp_path):
    base, batch = llama(), inputs("llama")
    m = copy.deepcopy(base)
    pk.attach(m, pk.ColaConfig(r=2, links=3))
    perturb(pk.trainable_parameters(m))
    expected = run(m, batch)
    folders = pk.save_links(m, tmp_path / "links")
    assert [f.name for f in folders] == ["link0", "link1", "link2"]
    assert pk.active_adapters(m) == ["default"] and set(pk.adapters(m)) == {"default"}
    other = copy.deepcopy(base)
    for f in folders:
        pk.load_adapter(other, f, name=f.name)
        assert pk.adapters(other)[f.name].config.method == "lora"
    pk.activate(other, [f.name for f in folders])
    torch.testing.assert_close(run(other, batch), expected, rtol=1e-5, atol=1e-5)
    pk.merge_adapters(m, ["default"], how="cat", name="summed")  # one plain LoRA of rank 3 * 2
    assert pk.adapters(m)["summed"].config.r == 6
    torch.testing.assert_close(run(m, batch), expected, rtol=1e-5, atol=1e-5)


def test_a_loaded_frozen_chain_uses_every_link_even_in_training_mode(tmp_path):
    base, batch = llama(), inputs("llama")
    m = copy.deepcopy(base)
    pk.attach(m, pk.ColaConfig(r=2, links=3))
    perturb(pk.trainable_parameters(m))
    expected = run(m, batch)
    pk.save_adapter(m, tmp_path / "chain")
    other = copy.deepcopy(base)
    pk.load_adapter(other, tmp_path / "chain")  # frozen
    other.train()
    torch.testing.assert_close(run(other, batch), expected, rtol=0, atol=0)
