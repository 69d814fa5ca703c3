"""Trainable tokens: only the chosen embedding rows change; a tied head's logits follow."""
import copy

import pytest
import torch

import petkit as pk
from toys import gpt2, inputs, llama, perturb, run


def test_only_the_chosen_rows_change_the_embedding():
    base = llama()
    m = pk.attach(copy.deepcopy(base), pk.TrainableTokensConfig(token_indices=[3, 5]))
    assert {n: p.shape for n, p in pk.trainable_parameters(m).items()} == {
        "model.embed_tokens.trainable_tokens_delta": (2, 32)}
    perturb(pk.trainable_parameters(m))
    ids = torch.tensor([[3, 4, 5, 6]])
    emb, ref = m.model.embed_tokens(ids), base.model.embed_tokens(ids)
    rows = m.model.embed_tokens.trainable_tokens_delta.detach()
    torch.testing.assert_close(emb[0, [0, 2]], rows)
    assert torch.equal(emb[0, [1, 3]], ref[0, [1, 3]])


def test_a_tied_head_scores_the_chosen_tokens_with_the_new_rows():
    base = gpt2()
    m = pk.attach(copy.deepcopy(base), pk.TrainableTokensConfig(token_indices=[4, 9]))
    perturb(pk.trainable_parameters(m))
    new = m.transformer.wte.trainable_tokens_delta.detach()
    weight = base.transformer.wte.weight.detach().clone()
    weight[[4, 9]] = new
    tied = copy.deepcopy(base)
    tied.transformer.wte.weight.data.copy_(weight)  # one tied weight with the rows written in
    batch = inputs("gpt2")
    torch.testing.assert_close(run(m, batch), run(tied, batch), rtol=1e-5, atol=1e-5)


def test_mistakes_raise():
    with pytest.raises(pk.ConfigError, match="token_indices must name"):
        pk.TrainableTokensConfig()
    with pytest.raises(pk.ConfigError, match="repeated"):
        pk.TrainableTokensConfig(token_indices=[1, 1])
    m = llama()
    with pytest.raises(pk.ConfigError, match="outside the vocabulary of 128"):
        pk.attach(m, pk.TrainableTokensConfig(token_indices=[500]))
    assert not pk.adapters(m)
