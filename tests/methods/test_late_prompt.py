"""Late prompt tuning numerics: blocks 0..k-1 run on the tokens alone; block k onwards runs on
[P; h] with P = W_up relu(AvgPool_n(W_down H_k)) and the mask/positions of a prompt that sits in
front (prompt rows causal among themselves, at rotary position 0); outputs drop the prompt."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

import petkit as pk
from petkit.methods.late_prompt import segment_weights
from toys import bert_cls, gpt2, llama, mlp, perturb


def manual_prompt(gen, hidden, mask):
    """Adaptive average pooling written out segment by segment, then the generator's MLP."""
    z = hidden @ gen.down.weight.detach().T + gen.down.bias.detach()
    rows = []
    for b in range(hidden.shape[0]):
        real = z[b, mask[b].bool()]
        length = real.shape[0]
        segs = [real[math.floor(j * length / gen.n): math.ceil((j + 1) * length / gen.n)].mean(0) for j in range(gen.n)]
        rows.append(torch.stack(segs))
    return F.relu(torch.stack(rows)) @ gen.up.weight.detach().T + gen.up.bias.detach()


def llama_reference(base, ids, mask, gen, k, prompt=None):
    inner, n = base.model, gen.n

    def blocks(h, layers, mask2d, pos):
        m4 = create_causal_mask(config=base.config, inputs_embeds=h, attention_mask=mask2d, cache=None, position_ids=pos)
        rot = inner.rotary_emb(h, position_ids=pos)
        for layer in layers:
            h = layer(h, attention_mask=m4, position_embeddings=rot, position_ids=pos)
        return h

    pos = torch.arange(ids.shape[1])[None]
    h = blocks(inner.embed_tokens(ids), inner.layers[:k], mask, pos)
    prompt = manual_prompt(gen, h, mask) if prompt is None else prompt
    ones = torch.ones(ids.shape[0], n, dtype=mask.dtype)
    h = blocks(torch.cat([prompt, h], 1), inner.layers[k:], torch.cat([ones, mask], 1),
               torch.cat([torch.zeros(1, n, dtype=pos.dtype), pos], 1))
    return base.lm_head(inner.norm(h[:, n:])), prompt


def attached(make, **cfg):
    base = make()
    m = copy.deepcopy(base)
    pk.attach(m, pk.LatePromptConfig(**cfg))
    perturb(pk.trainable_parameters(m), scale=0.5)
    return base, m


def test_segments_follow_adaptive_pooling():
    keep = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    member = segment_weights(keep, 3).long()
    assert member[0].tolist() == [[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]]
    assert member[1].tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # boolean and additive float masks
def test_decoder_forward_and_loss_equal_the_reference(attn):
    k = 1

    def make():
        model = llama()
        model.set_attn_implementation(attn)
        return model

    base, m = attached(make, num_virtual_tokens=3, layer=k)
    gen = m.model.layers[k].generator
    ids = torch.randint(3, 60, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    expected, _ = llama_reference(base, ids, mask, gen, k)
    out = m(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 6, base.config.vocab_size)
    torch.testing.assert_close(out.logits, expected)
    labels = ids.masked_fill(mask == 0, -100)
    loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref = F.cross_entropy(expected[:, :-1].reshape(-1, expected.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_blocks_before_k_see_no_prompt():
    base, m = attached(llama, num_virtual_tokens=2, layer=1)
    ids = torch.randint(3, 60, (1, 5))
    got = m(input_ids=ids, output_hidden_states=True).hidden_states
    ref = base(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)  # output of block 0
    assert got[-1].shape == ref[-1].shape  # the prompt is dropped before the final norm
    assert not torch.allclose(got[-1], ref[-1])


def test_cached_greedy_generation_matches_reference_decoding():
    base, m = attached(llama, num_virtual_tokens=3, layer=1)
    gen = m.model.layers[1].generator
    ids = torch.randint(3, 60, (1, 4))
    ones = torch.ones_like(ids)
    out = m.generate(ids, attention_mask=ones, max_new_tokens=5, do_sample=False)
    _, prompt = llama_reference(base, ids, ones, gen, 1)  # generated once, from the prompt
    seq = ids
    for _ in range(5):
        logits, _ = llama_reference(base, seq, torch.ones_like(seq), gen, 1, prompt=prompt)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_left_padded_batch_generation_matches_single_rows():
    _, m = attached(llama, num_virtual_tokens=2, layer=1)
    a, b = torch.tensor([[7, 8, 9, 10]]), torch.tensor([[11, 12]])
    ids = torch.tensor([[7, 8, 9, 10], [0, 0, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    both = m.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(both[0], m.generate(a, attention_mask=torch.ones_like(a), **kw)[0])
    assert torch.equal(both[1, 4:], m.generate(b, attention_mask=torch.ones_like(b), **kw)[0, 2:])


@pytest.mark.parametrize("make", [llama, gpt2])
def test_greedy_and_sampled_generation_reload_identically(make, tmp_path):
    _, m = attached(make, num_virtual_tokens=2, layer=1, pooling="max")
    ids = torch.randint(3, 60, (2, 4))
    ones = torch.ones_like(ids)
    greedy = m.generate(ids, attention_mask=ones, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.manual_seed(3)
    sampled = m.generate(ids, attention_mask=ones, max_new_tokens=4, do_sample=True, pad_token_id=0)
    scores = m.generate(ids, attention_mask=ones, max_new_tokens=2, do_sample=False, pad_token_id=0,
                        output_scores=True, return_dict_in_generate=True).scores
    with pk.disabled(m):
        plain = m.generate(ids, attention_mask=ones, max_new_tokens=2, do_sample=False, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True).scores
    assert all(not torch.allclose(a, b) for a, b in zip(scores, plain))  # every step sees the prompt
    pk.save_adapter(m, tmp_path / "a")
    other = make()
    pk.load_adapter(other, tmp_path / "a")
    assert torch.equal(other.generate(ids, attention_mask=ones, max_new_tokens=4, do_sample=False, pad_token_id=0), greedy)
    torch.manual_seed(3)
    assert torch.equal(other.generate(ids, attention_mask=ones, max_new_tokens=4, do_sample=True, pad_token_id=0), sampled)


def test_encoder_prompt_rows_see_every_token_and_cls_is_kept():
    base, m = attached(bert_cls, num_virtual_tokens=2, layer=1)
    gen = m.bert.encoder.layer[1].generator
    ids = torch.randint(3, 60, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    bert = base.bert

    def additive(m2d):
        return ((1 - m2d[:, None, None, :].float()) * torch.finfo(torch.float32).min)

    h = bert.embeddings(input_ids=ids)
    h = bert.encoder.layer[0](h, additive(mask))
    h = torch.cat([manual_prompt(gen, h, mask), h], 1)
    h = bert.encoder.layer[1](h, additive(torch.cat([torch.ones(2, 2, dtype=mask.dtype), mask], 1)))
    expected = base.classifier(bert.pooler(h[:, 2:]))
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, expected)


def test_bad_layer_and_models_without_blocks_fail_before_training():
    with pytest.raises(pk.ConfigError, match=r"layer must be in \[1, 1\].*got 2"):
        pk.attach(llama(), pk.LatePromptConfig(layer=2))
    with pytest.raises(pk.ConfigError, match="layer must be >= 1"):
        pk.LatePromptConfig(layer=0)
    with pytest.raises(pk.TargetError, match="transformer blocks"):
        pk.attach(mlp(), pk.LatePromptConfig())
    m = llama()
    with pytest.raises(pk.ConfigError):
        pk.attach(m, pk.LatePromptConfig(layer=5))
    assert not pk.adapters(m) and not any(isinstance(x, pk.core.delta.DeltaModule) for x in m.modules())


def test_two_d_padding_masks_get_the_prompt_in_front():
    from petkit.methods.family import layer_prompts as lt

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert lt.extend_mask(mask, 2, True, True).tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert lt.visible_keys(mask, 2, 3, mask.device).tolist() == [[True, True, False], [True, True, True]]
