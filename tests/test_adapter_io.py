"""Adapter files: every load-time mistake is a clear error that leaves the model unchanged."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import petkit as pk
from petkit.core.delta import DeltaModule
from petkit.core.disk import file_sha256
from toys import gpt2, inputs, llama, perturb, run


@pytest.fixture()
def saved(tmp_path):
    model = llama()
    pk.attach(model, pk.LoraConfig(r=4), name="a")
    perturb(pk.trainable_parameters(model))
    folder = pk.save_adapter(model, tmp_path / "ad", name="a")
    return model, folder


def untouched(model: torch.nn.Module) -> bool:
    return not pk.adapters(model) and not any(isinstance(m, DeltaModule) for m in model.modules())


def test_file_contents(saved):
    _, folder = saved
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 4
    assert meta["base_fingerprint"]["architecture"] == "LlamaForCausalLM"
    assert len(meta["tensors_sha256"]) == 64 and meta["format_version"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]


def expect_load_error(folder, match, model=None):
    model = model or llama()
    with pytest.raises(pk.AdapterLoadError, match=match):
        pk.load_adapter(model, folder)
    assert untouched(model)


def test_wrong_base_weights(saved):
    _, folder = saved
    expect_load_error(folder, "different base model.*weights differ", llama(seed=5))


def test_wrong_base_weights_with_strict_false_warns(saved):
    _, folder = saved
    other = llama(seed=5)
    with pytest.warns(UserWarning, match="different base model"):
        pk.load_adapter(other, folder, strict=False)
    assert pk.active_adapters(other) == ["a"]


def test_another_architecture(saved):
    _, folder = saved
    expect_load_error(folder, "made for another model", gpt2())


def test_shape_mismatch_names_tensor_and_shapes(saved):
    _, folder = saved
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, folder / "adapter.safetensors")
    meta = json.loads((folder / "adapter.json").read_text())
    meta["tensors_sha256"] = file_sha256(folder / "adapter.safetensors")
    (folder / "adapter.json").write_text(json.dumps(meta))
    expect_load_error(folder, rf"tensor '{key}' has shape \(5, 32\) in the file but \(4, 32\)")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_and_unexpected_keys(saved, change):
    _, folder = saved
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter.safetensors")
    if change == "missing":
        tensors.pop(sorted(tensors)[0])
    else:
        tensors["model.layers.0.self_attn.q_proj.extra"] = torch.zeros(2)
    save_file(tensors, folder / "adapter.safetensors")
    meta = json.loads((folder / "adapter.json").read_text())
    meta["tensors_sha256"] = file_sha256(folder / "adapter.safetensors")
    (folder / "adapter.json").write_text(json.dumps(meta))
    expect_load_error(folder, f"{change} \\['model")


def test_truncated_file(saved):
    _, folder = saved
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    expect_load_error(folder, "truncated")


def test_corrupted_byte(saved):
    _, folder = saved
    data = bytearray((folder / "adapter.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (folder / "adapter.safetensors").write_bytes(bytes(data))
    expect_load_error(folder, "checksum")


def test_empty_tensor_file(saved):
    _, folder = saved
    (folder / "adapter.safetensors").write_bytes(b"")
    expect_load_error(folder, "missing or empty")


@pytest.mark.parametrize("text,match", [("{not json", "not valid JSON"), ("{}", "lacks field"), ("[]", "lacks field")])
def test_bad_json(saved, text, match):
    _, folder = saved
    (folder / "adapter.json").write_text(text)
    expect_load_error(folder, match)


def test_missing_json_and_folder(saved, tmp_path):
    _, folder = saved
    (folder / "adapter.json").unlink()
    expect_load_error(folder, "adapter.json is missing")
    expect_load_error(tmp_path / "nowhere", "does not exist")


def test_bad_config_in_json(saved):
    _, folder = saved
    meta = json.loads((folder / "adapter.json").read_text())
    meta["config"]["r"] = -1
    (folder / "adapter.json").write_text(json.dumps(meta))
    expect_load_error(folder, "r must be >= 1")


def test_name_clash_leaves_model_unchanged(saved):
    model, folder = saved
    batch = inputs("llama")
    out = run(model, batch)
    with pytest.raises(pk.AdapterStateError, match="already attached"):
        pk.load_adapter(model, folder)
    torch.testing.assert_close(run(model, batch), out, rtol=0, atol=0)


def test_save_is_atomic_and_overwrites(saved, tmp_path):
    model, folder = saved
    pk.save_adapter(model, folder, name="a")  # overwrite in place
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == [folder.resolve()]  # only the version the folder links to
    other = llama()
    pk.load_adapter(other, folder)


def test_nothing_is_pickled(saved):
    _, folder = saved
    assert b"\x80\x04" not in (folder / "adapter.safetensors").read_bytes()[:8]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.load_adapter(copy.deepcopy(llama()), folder)
