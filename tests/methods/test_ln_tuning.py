"""LayerNorm tuning numerics: y = (γ + Δγ) x̂ + (β + Δβ); RMSNorm: y = (γ + Δγ) x / rms(x)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import petkit as pk
from toys import bert_cls, llama, mlp, perturb


def test_layernorm_closed_form_and_merge():
    m = mlp()
    g, b = m.norm.weight.detach().clone(), m.norm.bias.detach().clone()
    pk.attach(m, pk.LNTuningConfig())
    assert set(pk.trainable_parameters(m)) == {"norm.weight_delta", "norm.bias_delta"}
    perturb(pk.trainable_parameters(m))
    dg, db = m.norm.weight_delta.detach(), m.norm.bias_delta.detach()
    x = torch.randn(4, 16) * 3 + 1
    expected = F.layer_norm(x, (16,), g + dg, b + db, m.norm.base.eps)
    torch.testing.assert_close(m.norm(x), expected)
    pk.merge(m)
    torch.testing.assert_close(m.norm.base.weight.detach(), g + dg)
    torch.testing.assert_close(m.norm(x), expected)


def test_rmsnorm_closed_form_has_no_bias():
    m = llama()
    norm = m.model.layers[0].input_layernorm
    g, eps = norm.weight.detach().clone(), norm.variance_epsilon
    pk.attach(m, pk.LNTuningConfig())
    wrapped = m.model.layers[0].input_layernorm
    assert wrapped.bias_delta is None
    perturb(pk.trainable_parameters(m))
    x = torch.randn(2, 5, 32)
    expected = (g + wrapped.weight_delta.detach()) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(wrapped(x), expected)
    n_norms = 2 * m.config.num_hidden_layers + 1
    assert sum(p.numel() for p in pk.trainable_parameters(m).values()) == n_norms * 32


def test_bert_counts_every_layernorm_weight_and_bias():
    m = bert_cls()
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    pk.attach(m, pk.LNTuningConfig())
    assert sum(p.numel() for p in pk.trainable_parameters(m).values()) == sum(2 * n.weight.numel() for n in norms)


def test_no_norms_and_wrong_targets_are_errors():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

    with pytest.raises(pk.TargetError, match="LayerNorm"):
        pk.attach(Plain(), pk.LNTuningConfig())
    with pytest.raises(pk.TargetError, match="LayerNorm/RMSNorm"):
        pk.attach(mlp(), pk.LNTuningConfig(targets=["fc1"]))
