"""PEQA numerics: RTN integers frozen bit for bit, scales the only delta, init = the RTN-quantised base."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import petkit as pk
from petkit.methods.peqa import rtn_quantize
from toys import One, gpt2, inputs, llama, perturb, run


def _reference_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Textbook asymmetric RTN of each group of `group` inputs per row, dequantised."""
    qmax, out = 2**bits - 1, torch.empty_like(w)
    for i in range(w.shape[0]):
        for g in range(0, w.shape[1], group):
            v = w[i, g:g + group]
            lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
            s = max((hi - lo) / qmax, 1e-8)
            z = min(max(round(-lo / s), 0), qmax)
            q = torch.clamp(torch.round(v / s) + z, 0, qmax)
            out[i, g:g + group] = s * (q - z)
    return out


@pytest.mark.parametrize("bits,group", [(4, None), (3, None), (4, 2), (3, 3)])
def test_forward_is_scales_times_centred_integers(bits, group):
    m = One()
    W, b = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    pk.attach(m, pk.PeqaConfig(bits=bits, group_size=group, targets=["proj"]))
    expected_w = _reference_rtn(W, bits, group or 6)
    x = torch.randn(4, 6)
    torch.testing.assert_close(m(x), x @ expected_w.T + b)
    assert int(m.proj.codes.max()) <= 2**bits - 1
    assert list(pk.trainable_parameters(m)) == ["proj.scales"]
    assert m.proj.scales.numel() == 5 * (6 // (group or 6))


def test_init_equals_rtn_quantised_base_and_disabled_is_full_precision():
    base = llama()
    model = copy.deepcopy(base)
    pk.attach(model, pk.PeqaConfig(bits=4))
    quantised = copy.deepcopy(base)
    with torch.no_grad():  # the same RTN written into a plain copy
        for name, mod in quantised.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                codes, zeros, scales = rtn_quantize(mod.weight, 4, mod.in_features)
                mod.weight.copy_((scales[..., None] * (codes.float() - zeros[..., None].float())).reshape(mod.weight.shape))
    batch = inputs("llama")
    torch.testing.assert_close(run(model, batch), run(quantised, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(model, batch), run(base, batch))
    with pk.disabled(model):
        assert torch.equal(run(model, batch), run(base, batch))


def test_training_changes_scales_only_integers_bit_for_bit(tmp_path):
    model = llama()
    pk.attach(model, pk.PeqaConfig(bits=3, group_size=8), name="a")
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("codes", "zeros"))}
    scales = {n: p.detach().clone() for n, p in pk.trainable_parameters(model).items()}
    model.train()
    opt = torch.optim.AdamW(pk.trainable_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    batch = inputs("llama")
    for _ in range(3):
        opt.zero_grad()
        run(model, batch).pow(2).mean().backward()
        opt.step()
    after = dict(model.named_buffers())
    assert before and all(torch.equal(before[n], after[n]) and after[n].dtype == torch.uint8 for n in before)
    assert all(not torch.equal(scales[n], p) for n, p in pk.trainable_parameters(model).items())
    pk.save_adapter(model, tmp_path / "ad", name="a")
    keys = load_file(str(tmp_path / "ad" / "adapter.safetensors")).keys()
    assert keys and all(k.endswith("scales") for k in keys)


def test_merge_writes_the_quantised_weight_on_gpt2_conv1d():
    model = gpt2()
    pk.attach(model, pk.PeqaConfig(bits=4, group_size=16))
    perturb(pk.trainable_parameters(model), scale=1e-3)
    batch = inputs("gpt2")
    expected = run(model, batch)
    plain = pk.unload(model, merge=True)
    torch.testing.assert_close(run(plain, batch), expected, rtol=1e-5, atol=1e-5)


def test_bad_values_raise_config_errors():
    with pytest.raises(pk.ConfigError, match="bits"):
        pk.PeqaConfig(bits=1)
    with pytest.raises(pk.ConfigError, match="group_size"):
        pk.attach(One(), pk.PeqaConfig(group_size=4, targets=["proj"]))
