"""BitFit numerics: h = W x + b + db, zero biases added where a layer had none."""
import torch
from torch import nn

import petkit as pk
from toys import llama, mlp, perturb


def test_closed_form_and_added_bias():
    m = mlp()
    W2 = m.fc2.weight.detach().clone()
    pk.attach(m, pk.BitFitConfig(targets=["fc2"]))
    assert m.fc2.base.bias is None and "added zero bias" in pk.summary(m)
    perturb(pk.trainable_parameters(m))
    x = torch.randn(2, 16)
    torch.testing.assert_close(m.fc2(x), (x @ W2.T + m.fc2.bias_delta).detach())
    pk.merge(m)
    assert isinstance(m.fc2.base.bias, nn.Parameter)
    pk.unmerge(m)
    assert m.fc2.base.bias is None


def test_defaults_cover_linears_and_norms_only_biases():
    m = mlp()
    pk.attach(m, pk.BitFitConfig())
    counts = {n: p.numel() for n, p in pk.trainable_parameters(m).items()}
    assert counts == {"fc1.bias_delta": 16, "norm.bias_delta": 16, "fc2.bias_delta": 16}


def test_llama_has_no_biases_so_all_are_added():
    m = llama()
    pk.attach(m, pk.BitFitConfig())
    assert pk.summary(m).count("added zero bias") == 7
