"""EfficientQAT (Block-AP + E2E-QP through PEQA) on tiny random models: numerics and the saved folder."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petkit as pk
from petkit.compress.efficientqat import QatConfig, block_inputs, cosine_to, fit_block, rtn_grids, set_grid
from petkit.core.blocks import layer_paths
from petkit.core.errors import ConfigError
from petkit.core.qweight import integer_grid
from petkit.methods.peqa import rtn_quantize
from petkit.models import tiny_model

pytest.importorskip("compressed_tensors")


def _calibration(n: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _first_block_mse(grids_of) -> float:  # type: ignore[no-untyped-def]
    model, _ = tiny_model("llama")
    block = model.get_submodule(layer_paths(model)[0])
    inputs, kwargs = block_inputs(model, block, _calibration(), batch_size=4)
    with torch.no_grad():
        targets = [block(x, **kw) for x, kw in zip(inputs, kwargs)]
    for path, grid in grids_of(block, inputs, targets, kwargs).items():
        set_grid(block.get_submodule(path), *grid)
    with torch.no_grad():
        return sum(F.mse_loss(block(x, **kw), t).item() for x, kw, t in zip(inputs, kwargs, targets))


@pytest.mark.parametrize(("bits", "at_most"), [(4, 0.8), (3, 0.85), (2, 0.85)])
def test_block_ap_lowers_the_blocks_output_mse_below_rtn_at_the_same_bits(bits: int, at_most: float) -> None:
    # the paper's learning rates, cosine to 1/20; measured ratios 0.69 / 0.77 / 0.73
    config = QatConfig(bits=bits, group_size=16, epochs=20, batch_size=4, lr_weight=2e-5, lr_quant=1e-4)
    rtn = _first_block_mse(lambda block, *_: rtn_grids(block, config))
    ap = _first_block_mse(lambda block, x, y, kw: fit_block(block, x, y, kw, config))
    assert ap < at_most * rtn, (bits, ap, rtn)


def test_frozen_layers_sit_exactly_on_their_integer_grid() -> None:
    model, _ = tiny_model("llama")
    pk.quantize(model, "int3", method="efficientqat", calibration=_calibration(), group_size=16,
                epochs=2, lr_weight=1e-3, lr_quant=1e-3)
    layer = model.model.layers[1].mlp.down_proj
    codes, zeros, scales = integer_grid(layer)
    assert codes.max() <= 7 and zeros.max() <= 7 and scales.shape == (32, 4)
    rebuilt = (scales[..., None] * (codes.float() - zeros.float()[..., None])).reshape(32, 64)
    torch.testing.assert_close(rebuilt, layer.weight, rtol=0, atol=1e-6)
    assert integer_grid(model.lm_head) is None  # the head stays dense


def test_saved_folder_reloads_with_transformers_to_the_same_logits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _ = tiny_model("llama")
    pk.quantize(model, "int4", method="efficientqat", calibration=_calibration(), group_size=16, epochs=1)
    ids = _calibration(2, 10, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    pk.save_quantized(model, tmp_path / "q")
    config = (tmp_path / "q" / "config.json").read_text()
    assert '"quant_method": "compressed-tensors"' in config and '"num_bits": 4' in config
    reloaded = pk.load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        mine, theirs = integer_grid(model.get_submodule(path)), integer_grid(reloaded.get_submodule(path))
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["load_quantized", "load_model"])
def test_peqa_attached_to_a_reloaded_folder_before_any_forward_starts_from_its_grid(loader, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Regression: transformers keeps a compressed-tensors folder's layers compressed (int8 codes in
    `weight`) until the first forward; PEQA attached before it read the codes as weights, and the
    EfficientQAT task arm trained from garbage (one label for every example). petkit's loaders
    (`pk.load_quantized`, and `load_model` under `petkit train --model DIR`) decompress at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from petkit.models import load_model
    from toys import save_tiny_llama

    fp = save_tiny_llama(tmp_path / "fp")  # with a tokenizer: `load_model` reads one
    model = AutoModelForCausalLM.from_pretrained(fp)
    pk.quantize(model, "int4", method="efficientqat", calibration=_calibration(), group_size=16, epochs=1,
                e2e_steps=0)
    ids = _calibration(2, 10, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    pk.save_quantized(model, tmp_path / "q", AutoTokenizer.from_pretrained(fp))
    reloaded = pk.load_quantized(tmp_path / "q") if loader == "load_quantized" else \
        load_model(str(tmp_path / "q"), task="causal-lm")[0]
    assert reloaded.model.layers[0].mlp.up_proj.weight.is_floating_point()
    pk.attach(reloaded, pk.PeqaConfig())  # before any forward
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_the_grid_of_a_still_compressed_layer_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model, _ = tiny_model("llama")
    pk.quantize(model, "int4", method="rtn", group_size=16)
    pk.save_quantized(model, tmp_path / "q")
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # no forward yet: int8 codes
    with pytest.raises(ConfigError, match="still compressed"):
        integer_grid(compressed.model.layers[0].mlp.up_proj)


def test_a_group_that_does_not_divide_a_layer_leaves_a_short_last_group(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # 64 inputs in groups of 24: 24 + 24 + 16, the last 16 quantised on their own (as 128 on
    # SmolLM2's 576); the folder stores groups of gcd(24, 64) = 8 with the scales repeated
    model, _ = tiny_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    pk.quantize(model, "int3", method="rtn", group_size=24)
    quantised = model.model.layers[0].mlp.down_proj.weight
    codes, zeros, scales = rtn_quantize(weight[:, 48:], 3, 16)  # the short group alone
    alone = (scales[..., None] * (codes.float() - zeros.float()[..., None])).reshape(-1, 16)
    torch.testing.assert_close(quantised[:, 48:], alone, rtol=0, atol=1e-6)
    assert model.__dict__["_petkit_int_quantization"]["stored_group_size"] == 8
    ids = _calibration(2, 10, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    pk.save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(pk.load_quantized(tmp_path / "q")(input_ids=ids).logits, expected,
                                   rtol=0, atol=1e-5)


def test_block_ap_rates_follow_a_cosine_down_to_a_twentieth() -> None:
    factor = cosine_to(10)
    assert factor(0) == 1.0 and factor(10) == pytest.approx(1 / 20) and factor(5) == pytest.approx(0.525)


def test_peqa_on_the_quantised_model_is_e2e_qp_starting_exactly_from_it() -> None:
    model, _ = tiny_model("llama")
    pk.quantize(model, "int2", method="efficientqat", calibration=_calibration(), group_size=16, epochs=1)
    ids = _calibration(2, 10, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    pk.attach(model, pk.PeqaConfig())  # no bits / group given: the model's own grid
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    trainable = pk.trainable_parameters(model)
    assert trainable and all(name.endswith("scales") for name in trainable)
    assert trainable["model.layers.0.mlp.up_proj.scales"].shape == (64, 2)  # int2, groups of 16
    data = [{"input_ids": row, "labels": row} for row in _calibration(8, 12, seed=3)]
    pk.train(model, data, pk.TrainConfig(max_steps=3, batch_size=4, lr=1e-2, progress=False))
    codes_after = model.model.layers[0].mlp.up_proj.codes
    assert int(codes_after.max()) <= 3


def test_e2e_qp_on_the_calibration_trains_only_the_step_sizes_and_lowers_its_loss() -> None:
    cal = _calibration()
    block_ap_only, _ = tiny_model("llama")
    with_e2e, _ = tiny_model("llama")
    options = {"method": "efficientqat", "calibration": cal, "group_size": 16, "epochs": 1}
    pk.quantize(block_ap_only, "int3", **options)
    pk.quantize(with_e2e, "int3", e2e_steps=12, e2e_lr=1e-2, **options)
    changed = 0
    for path in layer_paths(with_e2e):
        for name, layer in with_e2e.get_submodule(path).named_modules():
            if isinstance(layer, torch.nn.Linear):
                (c0, z0, s0), (c1, z1, s1) = (integer_grid(m.get_submodule(f"{path}.{name}"))
                                              for m in (block_ap_only, with_e2e))
                torch.testing.assert_close(c1, c0, rtol=0, atol=0)  # the integers stay
                torch.testing.assert_close(z1, z0, rtol=0, atol=0)
                changed += not torch.equal(s1, s0)
                rebuilt = (s1[..., None] * (c1.float() - z1.float()[..., None])).reshape(layer.weight.shape)
                torch.testing.assert_close(rebuilt, layer.weight, rtol=0, atol=1e-6)
    assert changed == 14  # every linear layer of both blocks
    torch.testing.assert_close(with_e2e.lm_head.weight, block_ap_only.lm_head.weight, rtol=0, atol=0)
    assert all(p.requires_grad for p in with_e2e.model.embed_tokens.parameters())  # restored
    with torch.no_grad():
        before, after = (m(input_ids=cal, labels=cal).loss.item() for m in (block_ap_only, with_e2e))
    assert after < 0.98 * before, (before, after)


def test_lora_trains_on_top_of_the_quantised_model() -> None:
    model, _ = tiny_model("llama")
    pk.quantize(model, "int4", method="rtn", group_size=16)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    pk.attach(model, pk.LoraConfig(r=4, targets="all-linear"))
    data = [{"input_ids": row, "labels": row} for row in _calibration(8, 12, seed=3)]
    result = pk.train(model, data, pk.TrainConfig(max_steps=3, batch_size=4, lr=1e-2, progress=False))
    assert result is not None
    inner = model.model.layers[0].self_attn.q_proj.base
    torch.testing.assert_close(inner.weight, before, rtol=0, atol=0)


def test_bad_settings_are_config_errors() -> None:
    model, _ = tiny_model("llama")
    with pytest.raises(ConfigError, match="--bits"):
        pk.quantize(model, "int5", method="efficientqat", calibration=_calibration())
    with pytest.raises(ConfigError, match="calibration"):
        pk.quantize(model, "int4", method="efficientqat")
    with pytest.raises(ConfigError, match="--e2e-steps must be >= 0"):
        pk.quantize(model, "int4", method="efficientqat", calibration=_calibration(), e2e_steps=-1)
    with pytest.raises(ConfigError, match="no integer quantisation"):
        pk.save_quantized(tiny_model("llama")[0], "/tmp/never-written")


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "gptq"], "--method must be one of efficientqat, rtn"),
    (["--bits", "int5"], "--bits must be int4, int3 or int2"),
    (["--calibration", "bbc-new"], "did you mean 'bbc-news'"),
    (["--e2e-steps", "-1"], "--e2e-steps must be >= 0"),
    (["--e2e-lr", "-0.1"], "--e2e-lr must be >= 0.0"),
    (["--group-size", "0"], "--group-size must be >= 1"),
])
def test_quantize_cli_mistakes_are_one_red_line(argv, message, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from petkit.cli import main

    assert main(["quantize", "--output", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_quantize_cli_refuses_a_folder_that_holds_files(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from petkit.cli import main

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("x")
    assert main(["quantize", "--output", str(tmp_path / "q")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_cli_runs_block_ap_then_e2e_qp_on_the_embedded_model(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from petkit.cli import main

    out = tmp_path / "q"
    argv = ["quantize", "--output", str(out), "--samples", "4", "--seq-len", "16", "--epochs", "1",
            "--e2e-steps", "2", "--eval-samples", "2"]
    assert main(argv) == 0
    report = json.loads((out / "quantize.json").read_text())
    assert report["e2e_steps"] == 2 and report["e2e_lr"] == 1e-4 and len(report["block_mse"]) == 30
    reloaded = pk.load_quantized(out)
    codes, zeros, scales = integer_grid(reloaded.model.layers[3].mlp.down_proj)
    assert int(codes.max()) <= 15 and scales.shape[1] == 1536 // 64  # g128 stored at gcd 64


@pytest.mark.slow
def test_petkit_train_peqa_on_a_saved_integer_folder_trains_its_grid_scales(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`petkit train --model q4/ --method peqa` (E2E-QP on a task) from the folder on disk."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from petkit.cli import main
    from toys import save_tiny_llama

    fp = save_tiny_llama(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(fp)
    pk.quantize(model, "int4", method="rtn", group_size=16)
    pk.save_quantized(model, tmp_path / "q4", AutoTokenizer.from_pretrained(fp))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "q4"), "--method", "peqa", "--output", str(out),
                 "--data", "rotten-tomatoes", "--steps", "3", "--train-size", "12", "--test-size", "4",
                 "--max-length", "24", "--batch-size", "4", "--lr", "1e-2", "--train.progress=false"]) == 0
    stored = pk.load_quantized(tmp_path / "q4").model.layers[1].mlp.down_proj.weight_scale
    with safe_open(str(out / "adapter" / "adapter.safetensors"), "pt") as f:
        assert f.keys() and all(k.endswith("scales") for k in f.keys())
        trained = f.get_tensor(next(k for k in f.keys() if "layers.1.mlp.down_proj" in k))
    assert trained.shape == stored.shape == (32, 64 // 16)  # the folder's groups, not PEQA's per channel
    assert not torch.allclose(trained, stored.float())  # the step sizes trained
