"""Batched multi-adapter forward (core.batched_lowrank): rows of different low-rank adapters run as
ONE forward and each row equals the same prompt run alone with its own adapter."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import petkit as pk
from petkit.core.batched_lowrank import LowRankBank
from petkit.core.capabilities import RowBatchable
from petkit.core.delta import iter_deltas
from petkit.core.mixed_batch import adapter_terms
from toys import gpt2, llama, perturb

ADAPTERS = {
    "lora2": pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]),
    "lora8": pk.LoraConfig(r=8, targets="all-linear"),
    "rs4": pk.LoraConfig(r=4, rslora=True, bias="lora_only", targets=["o_proj", "up_proj"]),
    "dora3": pk.DoraConfig(r=3, targets=["q_proj", "k_proj", "down_proj"]),
    "dora5": pk.DoraConfig(r=5, targets=["v_proj", "gate_proj"]),
    "dy": pk.DyLoraConfig(r=6, targets=["q_proj", "v_proj"]),
}


def many(model_fn=llama, configs=ADAPTERS, scale=0.6):
    m = model_fn()
    with torch.no_grad():  # peaked logits, so greedy answers differ between adapters
        for p in m.parameters():
            p.mul_(4.0)
    for i, (name, cfg) in enumerate(configs.items()):
        pk.attach(m, cfg, name=name, seed=i)
        perturb(pk.trainable_parameters(m), seed=i + 1, scale=scale)
    if "dy" in configs:
        pk.set_rank(m, 3, name="dy")  # DyLoRA served at a chosen rank
    return m.eval()


def prompts(rows: int, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generate wants
    mask[-1, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def generate_alone(m, name, batch, row, n):
    pk.activate(m, [] if name is None else [name])
    sub = {k: v[row: row + 1] for k, v in batch.items()}
    keep = int(sub["attention_mask"].sum())
    sub = {k: v[:, -keep:] for k, v in sub.items()}  # the prompt without its padding
    out = m.generate(**sub, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, keep:].tolist()


def count_forwards(m):
    calls = []
    handle = m.lm_head.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
    return calls, handle


def test_every_row_equals_its_adapter_generated_alone_in_one_pass():
    m = many()
    names = [None, "lora2", "lora8", "rs4", "dora3", "dora5", "dy", "lora2", None]
    batch = prompts(len(names))
    calls, handle = count_forwards(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all low-rank: no fallback warning
        seqs = pk.mixed_generate(m, names, **batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
    handle.remove()
    assert calls == [len(names)] * 8  # one forward of the whole batch per generated token
    for row, name in enumerate(names):
        new = seqs[row, batch["input_ids"].shape[1]:].tolist()
        assert new == generate_alone(m, name, batch, row, 8), name
    answers = {tuple(generate_alone(m, n, batch, 0, 8)) for n in [None, *ADAPTERS]}
    assert len(answers) >= 5  # the adapters matter


def test_forward_logits_match_per_row_and_base_rows_are_the_base():
    m = many()
    names = ["dora5", None, "lora8", "rs4", None, "dy"]
    batch = prompts(len(names))
    out = pk.mixed_forward(m, names, **batch).logits
    for row, name in enumerate(names):
        pk.activate(m, [] if name is None else [name])
        ref = m(**{k: v[row: row + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(out[row: row + 1], ref, rtol=1e-4, atol=1e-4)
    base = copy.deepcopy(m)
    with pk.disabled(base):
        ref = base(**{k: v[[1, 4]] for k, v in batch.items()}).logits
    torch.testing.assert_close(out[[1, 4]], ref, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers_and_beams():
    m = many(gpt2, {"a": pk.LoraConfig(r=2), "d": pk.DoraConfig(r=4)})
    names = ["a", None, "d", "a"]
    batch = prompts(4)
    seqs = pk.mixed_generate(m, names, **batch, max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    for row, name in enumerate(names):
        pk.activate(m, [] if name is None else [name])
        keep = int(batch["attention_mask"][row].sum())
        sub = {k: v[row: row + 1, -keep:] for k, v in batch.items()}
        alone = m.generate(**sub, max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
        assert seqs[row, batch["input_ids"].shape[1]:].tolist()[: alone.shape[1] - keep] == alone[0, keep:].tolist()


def test_other_methods_fall_back_to_groups_and_say_which():
    m = many(configs={"a": pk.LoraConfig(r=2)})
    pk.attach(m, pk.PromptConfig(num_virtual_tokens=2), name="p")
    perturb(pk.trainable_parameters(m), seed=9)
    m.eval()
    names = ["a", "p", None, "p"]
    batch = prompts(4)
    with pytest.warns(UserWarning, match=r"adapters of prompt .*run as 1 separate group"):
        seqs = pk.mixed_generate(m, names, **batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row, name in enumerate(names):
        assert seqs[row, 6:10].tolist()[: 4] == generate_alone(m, name, batch, row, 4), name


def test_only_row_batchable_wrappers_claim_it():
    m = many(configs={"a": pk.LoraConfig(r=2), "d": pk.DoraConfig(r=2)})
    pk.attach(m, pk.PromptConfig(num_virtual_tokens=2), name="p")
    pk.attach(m, pk.make_config("ia3"), name="i")
    kinds = {w.adapter_name: isinstance(w, RowBatchable) for _, w in iter_deltas(m)}
    assert kinds == {"a": True, "d": True, "p": False, "i": False}


def test_bank_slots_put_clear_and_grow_rank():
    m = many(configs={"a": pk.LoraConfig(r=2, targets=["q_proj"]), "b": pk.LoraConfig(r=6, targets=["q_proj", "v_proj"])})
    batch = prompts(3)
    with pk.disabled(m):
        base = m(**batch).logits
        bank = LowRankBank(m, 3)
        bank.put(1, adapter_terms(m, "a"))
        bank.put(2, adapter_terms(m, "b"))  # rank 6 > 2: the q_proj stack grows, slot 1 kept
        bank.rows([1, 2, 0])
        mixed = m(**batch).logits
        bank.clear(1)
        cleared = m(**batch).logits
        bank.close()
        after = m(**batch).logits
    for row, name in enumerate(["a", "b"]):
        pk.activate(m, [name])
        torch.testing.assert_close(mixed[row], m(**{k: v[row: row + 1] for k, v in batch.items()}).logits[0],
                                   rtol=1e-4, atol=1e-5)
    assert torch.equal(mixed[2], base[2])  # slot 0 adds exactly nothing
    assert torch.equal(cleared[0], base[0]) and torch.equal(after, base)
    with pytest.raises(pk.ConfigError, match="slot must be in"):
        LowRankBank(m, 2).put(2, {})


@pytest.mark.parametrize("shape", [(1, 5, 16), (5, 16), (3, 5, 16)], ids=["prefill", "tokens-2d", "beams-of-one-row"])
def test_one_row_bank_equals_the_layer_with_its_adapter_in_every_input_layout(shape):
    """One row's slot serves a [1, T, in] prefill (bmm path), a [T, in] input and the repeated
    rows of beams (matmul path) exactly as the attached LoRA layer does."""
    layer = torch.nn.Sequential(torch.nn.Linear(16, 12))
    pk.attach(layer, pk.LoraConfig(r=4, targets=["0"]), name="a")
    perturb(pk.trainable_parameters(layer), seed=2, scale=0.5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x)
        with pk.disabled(layer):
            bank = LowRankBank(layer, 2)
            bank.put(1, adapter_terms(layer, "a"))
            with bank.using([1]):
                got = layer(x)
            base = layer(x)
            bank.close()
        with pk.disabled(layer):
            plain = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32, another summation order
    assert not torch.allclose(got, base, atol=1e-2) and torch.equal(base, plain)


def test_an_indexed_row_reads_its_slot_at_run_time_and_the_layout_counts_reallocations():
    """`indexed_row` (what a captured prefill graph replays) gives, for whichever slot the device
    tensor holds, exactly the one-row path of `using([slot])`; a slot with no terms at a path adds
    nothing there; the layout counter moves when stacks are (re)allocated, not on in-place writes."""
    m = many(configs={"a": pk.LoraConfig(r=2, targets=["q_proj"]),
                      "b": pk.DoraConfig(r=3, targets=["q_proj", "v_proj"])})
    batch = {"input_ids": prompts(2)["input_ids"][:1]}
    with pk.disabled(m), torch.no_grad():
        base = m(**batch).logits
        bank = LowRankBank(m, 3)
        layouts = [bank.layout]
        bank.put(1, adapter_terms(m, "a"))
        layouts.append(bank.layout)
        bank.put(2, adapter_terms(m, "b"))  # v_proj appears, q_proj's rank grows, gains appear
        layouts.append(bank.layout)
        bank.put(1, adapter_terms(m, "a"))  # in place: graphs captured before stay valid
        layouts.append(bank.layout)
        index = torch.zeros(1, dtype=torch.long)
        for slot in (1, 2, 0):
            with bank.using([slot]):
                want = m(**batch).logits
            index.fill_(slot)
            with bank.indexed_row(index):
                got = m(**batch).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(got, base)  # slot 0 through the gather is the exact base
        bank.close()
    assert layouts[0] < layouts[1] < layouts[2] == layouts[3]
