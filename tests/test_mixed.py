"""Mixed-adapter batches: each row gets exactly what a single-adapter run of its rows gives."""
import copy

import pytest
import torch

import petkit as pk
from toys import inputs, llama, perturb, run


def model_with_three():
    """LoRA "a", prompt tuning "p" (changes the sequence) and DoRA "d" on one model."""
    m = llama()
    for name, cfg, seed in (("a", pk.LoraConfig(r=2), 1), ("p", pk.PromptConfig(num_virtual_tokens=3), 2),
                            ("d", pk.DoraConfig(r=2), 3)):
        pk.attach(m, cfg, name=name)
        perturb(pk.trainable_parameters(m), seed=seed)
    return m.eval()


def batch_of(rows: int) -> dict:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 60, (rows, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


def single(m, name, batch, rows):
    pk.activate(m, [] if name is None else [name])
    sub = {k: v[rows] for k, v in batch.items()}
    return run(m, sub)


def test_each_row_gets_its_single_adapter_output():
    m, batch = model_with_three(), batch_of(6)
    names = ["a", None, "p", "d", "a", None]
    pk.activate(m, ["d"])
    out = pk.mixed_forward(m, names, **batch).logits
    assert pk.active_adapters(m) == ["d"]  # activation restored
    for name in ("a", None, "p", "d"):
        rows = [i for i, n in enumerate(names) if n == name]
        # low-rank rows share a batched forward: equal up to float rounding of the batched product
        torch.testing.assert_close(out[rows], single(m, name, batch, rows), rtol=1e-5, atol=1e-6)
        whole = single(m, name, batch, list(range(6)))  # the full batch with that adapter
        torch.testing.assert_close(out[rows], whole[rows], rtol=1e-5, atol=1e-5)


def test_a_row_can_stack_adapters():
    m, batch = model_with_three(), batch_of(2)
    out = pk.mixed_forward(m, [("a", "d"), None], **batch).logits
    pk.activate(m, ["a", "d"])
    torch.testing.assert_close(out[:1], run(m, {k: v[:1] for k, v in batch.items()}), rtol=0, atol=0)


def test_mixed_generate_matches_per_adapter_generate():
    m, batch = model_with_three(), batch_of(4)
    names = ["a", None, "a", "d"]
    seqs = pk.mixed_generate(m, names, **batch, max_new_tokens=4, do_sample=False)
    assert seqs.shape[0] == 4
    for name in ("a", None, "d"):
        rows = [i for i, n in enumerate(names) if n == name]
        pk.activate(m, [] if name is None else [name])
        alone = m.generate(**{k: v[rows] for k, v in batch.items()}, max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(seqs[rows, : alone.shape[1]], alone, rtol=0, atol=0)


def test_mistakes_are_clear_errors():
    m, batch = model_with_three(), batch_of(3)
    with pytest.raises(pk.ConfigError, match="the batch has 3 rows, got 2 names"):
        pk.mixed_forward(m, ["a", None], **batch)
    with pytest.raises(pk.AdapterStateError, match="unknown adapter"):
        pk.mixed_forward(m, ["a", None, "zz"], **batch)
    with pytest.raises(pk.ConfigError, match="pass no labels"):
        pk.mixed_forward(m, ["a", None, "a"], **batch, labels=batch["input_ids"])
    m.train()
    with pytest.raises(pk.AdapterStateError, match="model.eval"):
        pk.mixed_forward(m, ["a", None, "a"], **batch)
    m.eval()
    pk.activate(m, ["a"])
    pk.merge(m, ["a"])
    with pytest.raises(pk.AdapterStateError, match="merged"):
        pk.mixed_forward(m, ["a", None, "d"], **batch)


def test_plain_module_with_positional_input():
    from toys import mlp

    m = mlp()
    pk.attach(m, pk.LoraConfig(r=2), name="a")
    perturb(pk.trainable_parameters(m))
    x = torch.randn(3, 8)
    out = pk.mixed_forward(m, [None, "a", None], x)
    base = copy.deepcopy(m)
    with pk.disabled(base):  # one shared base matmul over 3 rows: equal up to its float rounding
        torch.testing.assert_close(out[[0, 2]], base(x[[0, 2]]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1:2], m(x[1:2]), rtol=1e-6, atol=1e-6)
