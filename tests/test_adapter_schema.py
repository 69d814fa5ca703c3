"""Hostile adapter metadata: whatever `adapter.json` holds, loading ends in a petkit error, fast,
without large allocations, and leaves the model unchanged."""
from __future__ import annotations

import copy
import hashlib
import json
import resource
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import petkit as pk
from petkit.core.adapter_schema import MAX_DEPTH, MAX_JSON_BYTES
from petkit.core.delta import DeltaModule
from toys import mlp, perturb

MODEL = mlp()


def trained() -> torch.nn.Module:
    """The toy MLP with a perturbed rank-2 LoRA "a" on fc1 and fc2."""
    model = copy.deepcopy(MODEL)
    pk.attach(model, pk.LoraConfig(r=2, targets=["fc1", "fc2"]), name="a")
    perturb(pk.trainable_parameters(model))
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pk.save_adapter(trained(), tmp_path_factory.mktemp("schema") / "ad", name="a")


def untouched(model: torch.nn.Module) -> bool:
    return not pk.adapters(model) and not any(isinstance(m, DeltaModule) for m in model.modules())


def meta_of(folder: Path) -> dict:
    return json.loads((folder / "adapter.json").read_text())


def write(out: Path, folder: Path, meta: dict | str, tensors: dict | None = None) -> Path:
    """An adapter folder `out` with `meta` and `folder`'s tensors (or `tensors`, re-hashed)."""
    out.mkdir()
    if tensors is None:
        (out / "adapter.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes())
    else:
        save_file(tensors, str(out / "adapter.safetensors"))
        assert isinstance(meta, dict)
        meta["tensors_sha256"] = hashlib.sha256((out / "adapter.safetensors").read_bytes()).hexdigest()
    (out / "adapter.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return out


def load_with(folder: Path, tmp: Path, change) -> pk.PetkitError:
    """Copy the adapter, edit its metadata with `change(meta)`, load it: the petkit error."""
    meta = meta_of(folder)
    text = change(meta)
    out = write(tmp / f"case{len(list(tmp.iterdir()))}", folder, text if isinstance(text, str) else meta)
    model = copy.deepcopy(MODEL)
    with pytest.raises(pk.PetkitError) as info:
        pk.load_adapter(model, out)
    assert untouched(model)
    return info.value


def test_the_unchanged_adapter_loads(folder: Path) -> None:
    pk.load_adapter(copy.deepcopy(MODEL), folder)


def _set(path: str, value):
    def change(meta):
        node = meta
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
        if path == "targets" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            meta["base_fingerprint"]["shapes"] = {v: [[1]] for v in value}  # consistent record
    return change


@pytest.mark.parametrize("path,value,field", [
    ("format_version", "1", "format_version"), ("format_version", None, "format_version"),
    ("targets", 7, "targets"), ("targets", [3], "targets[0]"), ("name", ["a"], "name"),
    ("base_fingerprint", [1, 2], "base_fingerprint"),
    ("base_fingerprint.shapes", [[1]], "base_fingerprint.shapes"),
    ("base_fingerprint.shapes.fc1", "8x16", "base_fingerprint.shapes['fc1']"),
    ("tensors_sha256", 5, "tensors_sha256"), ("config", "r=2", "config"),
    ("base_fingerprint.quantization", "4bit", "base_fingerprint.quantization"),
    ("base_fingerprint.quantization", {"mode": 4, "backend": "bnb"}, "base_fingerprint.quantization.mode"),
    ("config.r", {"a": 1}, "config['r']"), ("method", None, "method"),
])
def test_wrong_json_types_name_the_field(folder, tmp_path, path, value, field) -> None:
    err = load_with(folder, tmp_path, _set(path, value))
    assert isinstance(err, pk.AdapterLoadError) and repr(field) in str(err)


@pytest.mark.parametrize("path,value,match", [
    ("method", "nosuch", "field 'method'"), ("config.r", "8", "r must be int"),
    ("config.r", -1, "r must be >= 1"), ("config.alpha", 1e308 * 10, "not valid JSON"),
    ("targets", ["fc1.weight", "fc2"], "not modules"), ("targets", ["__class__"], "not modules"),
    ("format_version", 99, "format version 99"),
    ("base_fingerprint.shapes", {"fc1": [[1]]}, "name different modules"),
])
def test_wrong_values_are_refused(folder, tmp_path, path, value, match) -> None:
    err = load_with(folder, tmp_path, _set(path, value))
    assert isinstance(err, pk.AdapterLoadError) and match in str(err)


def test_targets_the_config_would_not_select_are_refused_even_with_strict_false(folder, tmp_path) -> None:
    """Recorded targets naming real modules the method cannot wrap (a LayerNorm for LoRA)."""
    meta = meta_of(folder)
    shapes = meta["base_fingerprint"]["shapes"]
    meta["targets"] = ["norm", "fc2"]
    meta["base_fingerprint"]["shapes"] = {"norm": [[16], [16]], "fc2": shapes["fc2"]}
    meta["config"]["targets"] = ["norm", "fc2"]
    out = write(tmp_path / "norm", folder, meta)
    model = copy.deepcopy(MODEL)
    with pytest.warns(UserWarning), pytest.raises(pk.AdapterLoadError, match="does not fit"):
        pk.load_adapter(model, out, strict=False)
    assert untouched(model)


def test_catastrophic_regex_targets_is_never_run(folder, tmp_path, monkeypatch) -> None:
    """A regex from a file is replaced by the recorded exact paths: never compiled, loads fine."""
    import re

    evil = "(" + "(.*)*" * 30 + ")x"
    compile_ = re.compile

    def guarded(pattern, *args, **kwargs):
        assert pattern != evil, "a regex read from a file was compiled"
        return compile_(pattern, *args, **kwargs)

    monkeypatch.setattr(re, "compile", guarded)
    meta = meta_of(folder)
    meta["config"]["targets"] = evil
    out = write(tmp_path / "regex", folder, meta)
    started = time.perf_counter()
    model = pk.load_adapter(copy.deepcopy(MODEL), out)
    assert time.perf_counter() - started < 5
    assert pk.adapters(model)["a"].targets == ["fc1", "fc2"]


def test_rank_of_ten_million_is_refused_before_any_allocation(folder, tmp_path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = load_with(folder, tmp_path, _set("config.r", 10**7))
    assert "config.r=10000000" in str(err)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_rank_above_the_layer_dims_is_refused(folder, tmp_path) -> None:
    """r=40 on 8x16 / 16x16 layers: refused by name, not by a shape error after attaching."""
    model = copy.deepcopy(MODEL)
    pk.attach(model, pk.LoraConfig(r=2, targets=["fc1", "fc2"]), name="a")
    big = {k: torch.zeros(40, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 40)
           for k, v in pk.adapter_state(model, "a").items()}
    meta = meta_of(folder)
    meta["config"]["r"] = 40
    out = write(tmp_path / "big", folder, meta, big)
    with pytest.raises(pk.AdapterLoadError, match="above the dimensions"):
        pk.load_adapter(copy.deepcopy(MODEL), out)


def test_a_config_that_builds_other_shapes_is_refused_on_the_meta_skeleton(folder, tmp_path) -> None:
    err = load_with(folder, tmp_path, _set("config.r", 3))
    assert "shape" in str(err) and "lora_A" in str(err)


def test_two_gigabyte_json_is_refused_by_its_size(folder, tmp_path) -> None:
    out = write(tmp_path / "huge", folder, "{}")
    with open(out / "adapter.json", "wb") as fh:  # sparse: 2 GB on paper, nothing on disk
        fh.truncate(2 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(pk.AdapterLoadError, match="metadata files are at most"):
        pk.load_adapter(copy.deepcopy(MODEL), out)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_deep_nesting_is_refused(folder, tmp_path, depth) -> None:
    err = load_with(folder, tmp_path, lambda meta: json.dumps(meta)[:-1]
                    + ', "extra": ' + "[" * depth + "]" * depth + "}")
    assert "nests deeper" in str(err)


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_tensors_with_nan_inf_or_integers_are_refused_and_warned_with_strict_false(
        folder, tmp_path, bad) -> None:
    tensors = load_file(str(folder / "adapter.safetensors"))
    key = sorted(tensors)[0]
    if bad == "int":
        tensors[key] = tensors[key].to(torch.int32)
    else:
        tensors[key][0, 0] = float(bad)
    out = write(tmp_path / bad, folder, meta_of(folder), tensors)
    model = copy.deepcopy(MODEL)
    with pytest.raises(pk.AdapterLoadError, match="NaN or inf" if bad != "int" else "dtype"):
        pk.load_adapter(model, out)
    assert untouched(model)
    with pytest.warns(UserWarning, match="NaN or inf" if bad != "int" else "dtype"):
        pk.load_adapter(model, out, strict=False)


# --- property: any JSON at all ----------------------------------------------------------------

LARGE = (st.integers(0, 2 * MAX_JSON_BYTES).map(lambda n: "x" * n)  # up to twice the size cap
         | st.integers(0, 200_000).map(lambda n: ["fc1"] * n)  # long lists (e.g. of targets)
         | st.integers(1, 200).map(lambda n: json.loads("[" * n + "]" * n)))  # deep nesting
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=30) | LARGE,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=40)
FINGERPRINT_FIELDS = ["architecture", "shapes", "weights_sha256", "quantization"]
FIELDS = ["format_version", "library", "library_version", "name", "method", "config", "targets",
          "base_fingerprint", "tensors_sha256", "num_parameters"]
CONFIG_FIELDS = ["r", "alpha", "dropout", "rslora", "bias", "targets", "modules_to_save"]


@st.composite
def metadata(draw: st.DrawFn):
    """A real adapter.json with some fields (or config fields) replaced by arbitrary JSON."""
    meta = json.loads(ORIGINAL)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        meta[name] = draw(JSON)
    if isinstance(meta.get("base_fingerprint"), dict):
        for name in draw(st.lists(st.sampled_from(FINGERPRINT_FIELDS), max_size=2)):
            meta["base_fingerprint"][name] = draw(JSON)
    if isinstance(meta.get("config"), dict):
        for name in draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=3)):
            meta["config"][name] = draw(JSON | st.integers(10**6, 10**12))
    if draw(st.booleans()):
        meta = draw(JSON) if draw(st.integers(0, 9)) == 0 else meta
    return meta


ORIGINAL = ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(meta=metadata())
def test_any_metadata_gives_only_petkit_errors_fast_and_small(folder, tmp_path, meta) -> None:
    global ORIGINAL
    out = tmp_path / "prop"
    out.mkdir(exist_ok=True)
    (out / "adapter.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes())
    (out / "adapter.json").write_text(json.dumps(meta))
    model = copy.deepcopy(MODEL)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        pk.load_adapter(model, out)
    except pk.PetkitError:
        assert untouched(model)
    assert time.perf_counter() - started < 5.0  # generous: a shared, loaded CI machine
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


@pytest.fixture(autouse=True)
def _original(folder: Path) -> None:
    global ORIGINAL
    ORIGINAL = (folder / "adapter.json").read_text()


def test_metadata_above_the_size_cap_is_refused(folder, tmp_path) -> None:
    err = load_with(folder, tmp_path, lambda meta: json.dumps({**meta, "pad": "x" * MAX_JSON_BYTES}))
    assert "at most" in str(err)


# --- PEFT folders: the same checks where they apply --------------------------------------------


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pk.export_peft(trained(), tmp_path_factory.mktemp("peft") / "p", name="a")


@pytest.mark.parametrize("field,value,match", [
    ("r", "2", "field 'r'"), ("r", 10**7, "field 'r'"), ("r", 10**5, "config.r=100000"),
    ("lora_alpha", None, "field 'lora_alpha'"), ("lora_dropout", 2.0, "field 'lora_dropout'"),
    ("modules_to_save", 5, "field 'modules_to_save'"), ("use_dora", "yes", "field 'use_dora'"),
    ("r", 3, "shape"),
])
def test_peft_config_values_are_checked_before_attaching(peft_folder, tmp_path, field, value, match) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((peft_folder / "adapter_model.safetensors").read_bytes())
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    config[field] = value
    (out / "adapter_config.json").write_text(json.dumps(config))
    model = copy.deepcopy(MODEL)
    with pytest.raises(pk.AdapterLoadError, match=match):
        pk.import_peft(model, out)
    assert untouched(model)
    pk.import_peft(copy.deepcopy(MODEL), peft_folder)  # the unchanged folder imports


def test_peft_config_size_and_depth_caps(peft_folder, tmp_path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((peft_folder / "adapter_model.safetensors").read_bytes())
    with open(out / "adapter_config.json", "wb") as fh:
        fh.truncate(2 << 30)
    with pytest.raises(pk.AdapterLoadError, match="at most"):
        pk.import_peft(copy.deepcopy(MODEL), out)
    (out / "adapter_config.json").write_text('{"x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(pk.AdapterLoadError, match="nests deeper"):
        pk.import_peft(copy.deepcopy(MODEL), out)


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter"])
def test_a_regex_saved_by_the_user_loads_by_its_recorded_paths(tmp_path, method) -> None:
    """Round trip of a regex-targeted adapter (IA3: a second, default target field beside it)."""
    from toys import inputs, llama, run

    base = llama()
    model = pk.attach(copy.deepcopy(base), pk.make_config(method, targets=r".*self_attn\.(q|v)_proj"),
                      name="a")
    perturb(pk.trainable_parameters(model))
    other = pk.load_adapter(copy.deepcopy(base), pk.save_adapter(model, tmp_path / "ad", name="a"))
    batch = inputs("llama")
    torch.testing.assert_close(run(other, batch), run(model, batch), rtol=0, atol=0)
    assert sorted(pk.adapters(other)["a"].targets) == sorted(pk.adapters(model)["a"].targets)


@pytest.mark.parametrize("bad", [[None], [""], [3], "head", None])
def test_modules_to_save_must_be_names(bad) -> None:
    """Found by the metadata property test: `modules_to_save: [null]` reached the target matcher
    as a TypeError; every config (Python, recipe, adapter.json) now refuses it by name."""
    with pytest.raises(pk.ConfigError, match="modules_to_save"):
        pk.LoraConfig(modules_to_save=bad)
