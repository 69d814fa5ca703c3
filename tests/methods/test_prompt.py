"""Prompt tuning numerics: equals the model run on [P; E(x)] with an extended mask; generate works."""
import copy

import torch

import petkit as pk
from toys import bert_cls, llama, perturb


def manual_logits(base, prompt, ids, mask):
    emb = base.get_input_embeddings()(ids)
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), emb], dim=1)
    full_mask = torch.cat([torch.ones(ids.shape[0], prompt.shape[0], dtype=mask.dtype), mask], dim=1)
    return base(inputs_embeds=embeds, attention_mask=full_mask).logits


def test_forward_equals_manual_concatenation_with_padding():
    base = llama()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PromptConfig(num_virtual_tokens=3))
    ids = torch.randint(3, 60, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    prompt = m.model.embed_tokens.prompt.detach()
    expected = manual_logits(base, prompt, ids, mask)[:, 3:]
    out = m(input_ids=ids, attention_mask=mask).logits
    assert out.shape == (2, 5, base.config.vocab_size)  # virtual positions stripped
    torch.testing.assert_close(out, expected)


def test_labels_are_extended_and_loss_matches():
    base = llama()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PromptConfig(num_virtual_tokens=2, init="text", init_text_ids=(5, 6, 7)))
    torch.testing.assert_close(m.model.embed_tokens.prompt.detach(), base.get_input_embeddings().weight[[5, 6]].detach())
    ids = torch.randint(3, 60, (2, 5))
    loss = m(input_ids=ids, labels=ids).loss
    logits = manual_logits(base, m.model.embed_tokens.prompt.detach(), ids, torch.ones_like(ids))
    labels = torch.cat([torch.full((2, 2), -100), ids], dim=1)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_generate_greedy_matches_manual_decoding():
    base = llama()
    m = copy.deepcopy(base)
    pk.attach(m, pk.PromptConfig(num_virtual_tokens=3))
    perturb(pk.trainable_parameters(m), scale=1.0)
    ids = torch.randint(3, 60, (1, 4))
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    seq = ids
    prompt = m.model.embed_tokens.prompt.detach()
    for _ in range(5):  # no cache: recompute everything each step
        nxt = manual_logits(base, prompt, seq, torch.ones_like(seq))[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    with pk.disabled(m):
        plain = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(plain, base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False))


def test_left_padded_batch_generation_matches_single_rows():
    m = llama()
    pk.attach(m, pk.PromptConfig(num_virtual_tokens=2))
    perturb(pk.trainable_parameters(m), scale=1.0)
    a, b = torch.tensor([[7, 8, 9, 10]]), torch.tensor([[11, 12]])
    ids = torch.tensor([[7, 8, 9, 10], [0, 0, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    both = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    one = m.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 4:], one[0, 2:])
    first = m.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(both[0], first[0])


def test_encoder_with_token_types():
    m = bert_cls()
    pk.attach(m, pk.PromptConfig(num_virtual_tokens=2))
    ids = torch.randint(3, 60, (2, 5))
    out = m(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    assert out.logits.shape == (2, 3)


def test_too_many_virtual_tokens_is_a_config_error():
    import pytest

    with pytest.raises(pk.ConfigError, match="context"):
        pk.attach(llama(), pk.PromptConfig(num_virtual_tokens=10_000))
