"""The declared schema of adapter metadata, checked before anything else reads it.

`read_json` refuses a file above a size cap (checked with `stat`, before reading), text that is
not UTF-8 JSON, NaN/Infinity, and nesting deeper than a cap. `check_meta` then checks every
field of `adapter.json` against `ADAPTER_SCHEMA` (type, range, length); `HEADER_ENTRY` is the
schema of one safetensors header entry (read by `safetensors_header`). Every failure is an
`AdapterLoadError` naming the file and the field.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdapterLoadError

FORMAT_VERSION = 1  # adapter folder format this petkit writes and reads
MAX_JSON_BYTES = 1 << 20  # adapter.json / adapter_config.json
MAX_DEPTH = 16
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
               "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_PATH = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, field: str, need: str, value: Any) -> AdapterLoadError:
    return AdapterLoadError(f"{where}: field {field!r} must be {need}, got {_short(value)}")


# --- schema nodes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Int:
    low: int = 0
    high: int = 2**63 - 1

    def check(self, value: Any, where: str, field: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            raise _fail(where, field, f"an integer in [{self.low}, {self.high}]", value)


@dataclass(frozen=True)
class Str:
    max_len: int = 256
    pattern: re.Pattern[str] | None = None
    what: str = "a string"

    def check(self, value: Any, where: str, field: str) -> None:
        if not isinstance(value, str) or len(value) > self.max_len or (
                self.pattern is not None and not self.pattern.fullmatch(value)):
            raise _fail(where, field, f"{self.what} of at most {self.max_len} characters", value)


@dataclass(frozen=True)
class List:
    item: Any
    max_len: int = 100_000
    min_len: int = 0

    def check(self, value: Any, where: str, field: str) -> None:
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            raise _fail(where, field, f"a list of {self.min_len} to {self.max_len} items", value)
        for i, item in enumerate(value):
            self.item.check(item, where, f"{field}[{i}]")


@dataclass(frozen=True)
class Map:
    """A JSON object with free string keys (`key`) and values of one kind."""

    key: Str
    value: Any
    max_len: int = 100_000

    def check(self, value: Any, where: str, field: str) -> None:
        if not isinstance(value, dict) or len(value) > self.max_len:
            raise _fail(where, field, f"an object of at most {self.max_len} entries", value)
        for k, v in value.items():
            self.key.check(k, where, f"{field} key")
            self.value.check(v, where, f"{field}[{k!r}]")


@dataclass(frozen=True)
class Obj:
    """A JSON object with declared fields; `required` must be present, others are ignored."""

    fields: Mapping[str, Any]
    required: tuple[str, ...] = ()

    def check(self, value: Any, where: str, field: str) -> None:
        if not isinstance(value, dict):
            raise _fail(where, field or "(top level)", "an object", value)
        missing = [k for k in self.required if k not in value]
        if missing:
            raise AdapterLoadError(f"{where}: lacks field(s) {[_join(field, m) for m in missing]}")
        for name, node in self.fields.items():
            if name in value:
                node.check(value[name], where, _join(field, name))


@dataclass(frozen=True)
class Num:
    """A finite JSON number (int or float) in [low, high]."""

    low: float = -1e30
    high: float = 1e30

    def check(self, value: Any, where: str, field: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            raise _fail(where, field, f"a number in [{self.low:g}, {self.high:g}]", value)


class Bool:
    def check(self, value: Any, where: str, field: str) -> None:
        if not isinstance(value, bool):
            raise _fail(where, field, "true or false", value)


@dataclass(frozen=True)
class Opt:
    """`node`, or null."""

    node: Any

    def check(self, value: Any, where: str, field: str) -> None:
        if value is not None:
            self.node.check(value, where, field)


class Scalar:
    """A config value: a JSON scalar, or a flat list of scalars."""

    def check(self, value: Any, where: str, field: str) -> None:
        ok = value is None or isinstance(value, (bool, int, float)) or (
            isinstance(value, str) and len(value) <= 4096)
        if isinstance(value, list) and len(value) <= 100_000:
            ok = all(v is None or isinstance(v, (bool, int, float, str)) for v in value)
        if not ok:
            raise _fail(where, field, "a number, string, boolean, null or a flat list of them", value)


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


MODULE_PATH = Str(512, _PATH, "a module path (letters, digits, '_', '-', '.')")
SHAPE = List(Int(0, 2**40), max_len=8)
FINGERPRINT = Obj({"architecture": Str(256), "model_type": Str(256),
                   "shapes": Map(MODULE_PATH, List(SHAPE, max_len=64)),
                   "weights_sha256": Str(64, _HEX64, "a sha256 hex digest"),
                   "quantization": Opt(Obj({"mode": Str(64), "backend": Str(64),
                                            "block_size": Opt(Int(0, 1 << 30)),
                                            "compute_dtype": Opt(Str(64))},
                                           required=("mode", "backend")))},
                  required=("architecture", "shapes", "weights_sha256"))
TASK_TYPES = ("verbaliser", "head", "instruction")
TASK = Obj({"type": Str(16, re.compile("|".join(TASK_TYPES)), f"one of {', '.join(TASK_TYPES)}"),
            "labels": List(Str(1024), 100_000), "label_words": List(Str(1024), 100_000),
            "template": Str(8192), "input_column": Str(1024), "target_column": Str(1024), "data": Str(4096),
            "test_file": Str(4096)}, required=("type",))
PRIVACY = Obj({"mechanism": Str(32), "epsilon": Num(), "target_epsilon": Num(), "delta": Num(),
               "max_grad_norm": Num(), "noise_multiplier": Num(), "sample_rate": Num(),
               "steps": Int(0), "accountant": Str(16)}, required=("mechanism", "epsilon", "delta"))
ADAPTER_SCHEMA = Obj({
    "format_version": Int(1, FORMAT_VERSION),
    "library": Str(64),
    "library_version": Str(64),
    "name": Str(128, re.compile(r"[A-Za-z0-9_\-]+"), "an adapter name (letters, digits, '_', '-')"),
    "method": Str(64, re.compile(r"[a-z0-9_\-]+"), "a method name"),
    "config": Map(Str(64, re.compile(r"[A-Za-z_][A-Za-z0-9_]*"), "a field name"), Scalar(), 256),
    "targets": List(MODULE_PATH),
    "base_fingerprint": FINGERPRINT,
    "tensors_sha256": Str(64, _HEX64, "a sha256 hex digest"),
    "num_parameters": Int(0),
    "base_model": Str(4096),  # embedded name, hub id or folder (absent in older adapters)
    "task": TASK,
    "privacy": PRIVACY,  # DP-SGD runs: the budget spent (training/dp.py)
}, required=("format_version", "method", "config", "targets", "base_fingerprint",
             "tensors_sha256"))


# The fields of a PEFT `adapter_config.json` that `import_peft` reads (others are ignored).
PEFT_SCHEMA = Obj({
    "peft_type": Str(32), "r": Int(0, 1 << 20), "lora_alpha": Num(), "lora_dropout": Num(0.0, 1.0),
    "use_rslora": Bool(), "use_dora": Bool(), "lora_bias": Bool(), "bias": Str(16),
    "modules_to_save": Opt(List(MODULE_PATH, 1000)), "rank_pattern": Opt(Map(Str(512), Scalar())),
    "alpha_pattern": Opt(Map(Str(512), Scalar())),
    "target_parameters": Opt(List(MODULE_PATH, 1000)), "feedforward_modules": Opt(Scalar()),
    "stride_A": Int(1, 1 << 20), "num_B": Int(1, 1 << 20), "scaling": Num(),
    "task_type": Opt(Str(32)), "num_virtual_tokens": Int(1, 1 << 20), "num_layers": Int(1, 1 << 20),
    "num_attention_heads": Int(1, 1 << 20), "num_transformer_submodules": Opt(Int(1, 8)),
}, required=("peft_type",))  # each method's fields: its PeftLayout.from_peft and config


# --- reading -------------------------------------------------------------------------------


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (iterative; stops counting past `limit`)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_json(raw: bytes, where: str) -> Any:
    """Parse bounded JSON bytes: UTF-8, no NaN/Infinity, nesting at most `MAX_DEPTH`."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                           parse_float=_finite_float)
    except RecursionError:
        raise AdapterLoadError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{where} is not valid JSON: {_short(str(exc))}") from None
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise AdapterLoadError(f"{where} nests deeper than {MAX_DEPTH} levels")
    return value


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file after checking its size on disk (nothing is read above the cap)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise AdapterLoadError(f"{path} is {size:,} bytes; metadata files are at most "
                                   f"{max_bytes:,} bytes")
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise AdapterLoadError(f"{path} cannot be read: {exc}") from None
    if len(raw) > max_bytes:
        raise AdapterLoadError(f"{path} is over {max_bytes:,} bytes")
    return parse_json(raw, str(path))


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """Check parsed `adapter.json` against `ADAPTER_SCHEMA`; returns it."""
    if not isinstance(meta, dict):
        raise AdapterLoadError(f"{where} is a JSON {type(meta).__name__}, not an object: lacks "
                               f"field(s) {list(ADAPTER_SCHEMA.required)}")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise AdapterLoadError(f"{where} has format version {version}; this petkit reads "
                               f"<= {FORMAT_VERSION} (upgrade petkit)")
    ADAPTER_SCHEMA.check(meta, where, "")
    if set(meta["base_fingerprint"]["shapes"]) != set(meta["targets"]):
        raise AdapterLoadError(f"{where}: fields 'targets' and 'base_fingerprint.shapes' name "
                               "different modules")
    return meta


HEADER_ENTRY = Obj({"dtype": Str(16), "shape": SHAPE, "data_offsets": List(Int(0), 2, 2)},
                   required=("dtype", "shape", "data_offsets"))
