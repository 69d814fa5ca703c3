"""Quantised bases: pk.quantize through bitsandbytes / torchao, methods over them, merges with a bound."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import petkit as pk
from petkit.models.quant_merge import merge_dense, merge_quantized, relative_error
from petkit.models.quantize import quantization_info, quantize
from toys import inputs, llama, perturb, run

pytest.importorskip("bitsandbytes")
LINEAR_METHODS = ["lora", "dora", "dylora", "krona", "adapter", "ia3", "sira", "cola"]
IDENTITY = {"lora", "dora", "dylora", "krona", "adapter", "ia3", "cola"}  # sira: identity too but routed


def _stored(model):
    """The packed base weights, in model order (names change when a wrapper moves them under .base)."""
    return [p for p in model.parameters() if not p.is_floating_point()]


@pytest.mark.parametrize("mode,bound", [("nf4", 0.3), ("fp4", 0.3), ("int8", 0.02)])
def test_quantize_keeps_linear_classes_packs_weights_and_leaves_the_head(mode, bound):
    base = llama()
    model = quantize(copy.deepcopy(base), mode)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, torch.nn.Linear) and type(layer).__name__ != "Linear"
    assert layer.weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    info = quantization_info(model)
    assert info["mode"] == mode and info["layers"] == 14 and info["backend"] == "bitsandbytes"
    batch = inputs("llama")
    assert 0 < relative_error(run(model, batch), run(base, batch)) < bound


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_every_linear_method_trains_over_a_4bit_base_without_touching_it(method):
    quantised = quantize(llama(), "nf4")
    batch = inputs("llama")
    expected = run(quantised, batch)
    packed = [p.detach().clone() for p in _stored(quantised)]
    model = pk.attach(copy.deepcopy(quantised), pk.make_config(method), name="a")
    if method in IDENTITY:
        torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)
    params = pk.trainable_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    model.train()
    opt = torch.optim.SGD(params.values(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        run(model, batch).pow(2).mean().backward()
        opt.step()
    after = _stored(model)
    assert len(packed) == len(after) == 14 and all(torch.equal(a, b) for a, b in zip(packed, after))
    assert all(p.grad is None for p in after)
    with pk.disabled(model):
        torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)


def test_bf16_compute_keeps_base_packed_and_delta_in_bf16():
    model = llama().to(torch.bfloat16)
    quantize(model, "nf4")
    pk.attach(model, pk.LoraConfig(targets="all-linear"))
    assert {p.dtype for p in pk.trainable_parameters(model).values()} == {torch.bfloat16}
    floating = {p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert floating == {torch.bfloat16}  # nothing upcast to fp32
    run(model, inputs("llama")).float().pow(2).mean().backward()


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_merge_into_quantised_base_adds_at_most_1_5x_the_base_quantisation_error(mode):
    base, batch = llama(), inputs("llama")
    model = quantize(copy.deepcopy(base), mode)
    quant_error = relative_error(run(model, batch), run(base, batch))
    pk.attach(model, pk.LoraConfig(targets="all-linear"), name="a")
    perturb(pk.trainable_parameters(model), seed=3, scale=0.01)
    report = merge_quantized(model, batch)
    assert report.layers == 14 and 0 < report.relative_error <= 1.5 * quant_error
    assert not any(isinstance(m, pk.core.delta.DeltaModule) for m in model.modules())
    assert model.model.layers[0].mlp.down_proj.weight.dtype in (torch.uint8, torch.int8)


def test_merge_dense_saves_a_plain_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model, batch = quantize(llama(), "nf4"), inputs("llama")
    pk.attach(model, pk.LoraConfig(), name="a")
    perturb(pk.trainable_parameters(model), seed=3, scale=0.01)
    expected = run(model, batch)
    dense = merge_dense(model, torch.float32)
    assert all(p.is_floating_point() for p in dense.parameters())
    torch.testing.assert_close(run(dense, batch), expected, rtol=1e-4, atol=1e-4)
    dense.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(run(again, batch), run(dense, batch), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_torchao_backend_runs_lora(mode):
    pytest.importorskip("torchao")
    base, batch = llama(), inputs("llama")
    model = quantize(copy.deepcopy(base), mode, backend="torchao", block_size=32)
    assert quantization_info(model)["backend"] == "torchao"
    expected = run(model, batch)
    assert relative_error(expected, run(base, batch)) < 0.3
    pk.attach(model, pk.LoraConfig(targets="all-linear"))
    torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)
    model.train()
    run(model, batch).pow(2).mean().backward()
    assert all(p.grad is not None for p in pk.trainable_parameters(model).values())


def test_fingerprint_records_quantisation_and_loading_on_the_dense_base_warns(tmp_path):
    base, batch = llama(), inputs("llama")
    model = quantize(copy.deepcopy(base), "nf4")
    pk.attach(model, pk.LoraConfig(), name="a")
    perturb(pk.trainable_parameters(model), seed=3)
    pk.save_adapter(model, tmp_path / "ad", name="a")
    meta = pk.read_adapter(tmp_path / "ad")[0]
    assert meta["base_fingerprint"]["quantization"]["mode"] == "nf4"
    shapes = meta["base_fingerprint"]["shapes"]["model.layers.0.self_attn.q_proj"]
    assert shapes[0] == [32, 32]  # logical (out, in), not the packed storage
    with pytest.warns(UserWarning, match="nf4 .*this base is not quantised"):
        pk.load_adapter(base, tmp_path / "ad")
    with pytest.raises(pk.AdapterLoadError):  # another base quantised the same way is refused
        pk.load_adapter(quantize(llama(seed=5), "nf4"), tmp_path / "ad", name="b")


def test_user_mistakes_raise_petkit_errors(monkeypatch):
    with pytest.raises(pk.ConfigError, match="mode"):
        quantize(llama(), "int3")
    with pytest.raises(pk.ConfigError, match="backend"):
        quantize(llama(), "fp4", backend="torchao")
    attached = pk.attach(llama(), pk.LoraConfig())
    with pytest.raises(pk.ConfigError, match="before attaching"):
        quantize(attached, "nf4")
    with pytest.raises(pk.ConfigError, match="already quantised"):
        quantize(quantize(llama(), "nf4"), "nf4")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(pk.MissingPackageError, match="pip install bitsandbytes"):
        quantize(llama(), "nf4", backend="bitsandbytes")


@pytest.mark.slow
def test_cli_trains_lora_over_an_nf4_base(tmp_path):
    import json

    from petkit.cli import main

    out = tmp_path / "run"
    args = ["train", "--quantize", "nf4", "--steps", "2", "--train-size", "16", "--test-size", "8",
            "--max-length", "32", "--batch-size", "4", "--output", str(out), "--train.progress=false"]
    assert main(args) == 0
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["base_fingerprint"]["quantization"]["mode"] == "nf4"
    assert "quantize: nf4" in (out / "recipe.yaml").read_text()


def test_an_eval_forward_does_not_break_later_gradients():
    """bitsandbytes repacks 4-bit weights for CPU inference (eval + no grad) into a layout whose
    matmul has no autograd; petkit turns that off, so training after an evaluation is exact."""
    from petkit.models.quantize import dequantize

    model, batch = quantize(llama(), "nf4", block_size=32), inputs("llama")
    pk.attach(model, pk.LoraConfig(targets="all-linear"))
    dense = dequantize(copy.deepcopy(model), torch.float32)
    model.eval()
    with torch.no_grad():
        run(model, batch)

    def grads(m):
        m.train()
        run(m, batch).pow(2).mean().backward()
        return [p.grad for p in pk.trainable_parameters(m).values()]

    for got, expected in zip(grads(model), grads(dense)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_quantize_lets_go_of_the_memory_mapped_checkpoint(tmp_path):
    """The dense tensors left after quantising are copied out of the checkpoint's memory map, so the
    map (and with it the full-precision weights of the quantised layers) can be released."""
    from transformers import AutoModelForCausalLM

    llama().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    dense = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()
             if "layers" not in n or "norm" in n}
    quantize(model, "nf4")
    for name, param in model.named_parameters():
        if name in dense:
            assert param.data_ptr() != dense[name][0], name
            assert torch.equal(param, dense[name][1]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
