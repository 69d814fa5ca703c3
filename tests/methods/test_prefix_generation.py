"""`generate` on decoders with the prompt- and prefix-family methods active: greedy decoding with the KV cache
equals recomputing everything each step, left-padded batches equal single rows, sampling is
reproducible with a seed, and a saved + reloaded adapter generates exactly the same tokens."""
import copy

import pytest
import torch

import petkit as pk
from toys import gpt2, llama, perturb

METHODS = {
    "prompt": {"num_virtual_tokens": 3},
    "residual-prompt": {"num_virtual_tokens": 3, "bottleneck": 8},
    "prefix": {"num_virtual_tokens": 3},
    "prefix[after_prefix]": {"num_virtual_tokens": 3, "positions": "after_prefix"},  # PEFT's positions
    "adaptive-prefix": {"num_virtual_tokens": 3},
    "prefix-propagation": {"num_virtual_tokens": 3},
}
DECODERS = {"llama": llama, "gpt2": gpt2}
CASES = [(m, a) for m in METHODS for a in DECODERS]


def tuned(method, arch):
    base = DECODERS[arch]()
    model = copy.deepcopy(base)
    pk.attach(model, pk.make_config(method.split("[")[0], **METHODS[method]))
    perturb(pk.trainable_parameters(model), seed=3, scale=0.5)
    return base, model


def greedy(model, ids, mask, steps=5, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kw)


def sample(model, ids, mask, seed):
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5,
                          pad_token_id=0)


@pytest.mark.parametrize("method,arch", CASES)
def test_cached_greedy_generation_equals_full_recomputation(method, arch):
    base, m = tuned(method, arch)
    ids = torch.tensor([[7, 8, 9, 10]])
    gen = greedy(m, ids, torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
    out, seq = gen.sequences, ids
    for step in range(5):  # no cache: every step runs the whole sequence through the hooks again
        logits = m(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
        torch.testing.assert_close(gen.logits[step], logits[:, -1], rtol=1e-4, atol=1e-5)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(greedy(m, ids, torch.ones_like(ids), use_cache=False), seq)
    with pk.disabled(m):
        plain = greedy(m, ids, torch.ones_like(ids))
    assert torch.equal(plain, greedy(base, ids, torch.ones_like(ids)))
    assert not torch.allclose(m(input_ids=out).logits, base(input_ids=out).logits)  # the delta is active


@pytest.mark.parametrize("method,arch", CASES)
def test_left_padded_batch_equals_single_rows(method, arch):
    _, m = tuned(method, arch)
    ids = torch.tensor([[7, 8, 9, 10], [0, 0, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    both = greedy(m, ids, mask, steps=4)
    one = greedy(m, ids[1:, 2:], mask[1:, 2:], steps=4)
    first = greedy(m, ids[:1], mask[:1], steps=4)
    assert torch.equal(both[1, 4:], one[0, 2:])
    assert torch.equal(both[0], first[0])


@pytest.mark.parametrize("method,arch", CASES)
def test_sampling_is_seeded_and_reloaded_adapter_generates_identically(method, arch, tmp_path):
    base, m = tuned(method, arch)
    ids = torch.tensor([[7, 8, 9, 10], [0, 0, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    drawn = sample(m, ids, mask, seed=5)
    assert torch.equal(drawn, sample(m, ids, mask, seed=5))
    assert not torch.equal(drawn, sample(m, ids, mask, seed=6))
    pk.save_adapter(m, tmp_path / "ad", name="default")
    other = copy.deepcopy(base)
    pk.load_adapter(other, tmp_path / "ad")
    assert torch.equal(greedy(other, ids, mask), greedy(m, ids, mask))
    assert torch.equal(sample(other, ids, mask, seed=5), drawn)


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_prompt_and_prefixes_stacked_decode_like_full_recomputation(arch):
    m = DECODERS[arch]()
    for name, (method, kw) in {"p": ("prompt", {"num_virtual_tokens": 2}), "a": ("adaptive-prefix", {"num_virtual_tokens": 3}),
                               "q": ("prefix-propagation", {"num_virtual_tokens": 2})}.items():
        pk.attach(m, pk.make_config(method, **kw), name=name)
    pk.activate(m, ["p", "a", "q"])
    perturb(pk.trainable_parameters(m), seed=4, scale=0.5)
    ids = torch.tensor([[0, 7, 8, 9], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    gen = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                     output_logits=True, return_dict_in_generate=True)
    seq, seq_mask = ids, mask
    for step in range(4):  # no cache; positions from the mask, as generate makes them
        pos = (seq_mask.cumsum(-1) - 1).clamp(min=0)
        logits = m(input_ids=seq, attention_mask=seq_mask, position_ids=pos, use_cache=False).logits
        assert logits.shape[1] == seq.shape[1]  # virtual positions stripped
        torch.testing.assert_close(gen.logits[step], logits[:, -1], rtol=1e-4, atol=1e-5)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    assert torch.equal(gen.sequences, seq)
