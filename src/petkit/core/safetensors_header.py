"""What a safetensors file declares, checked before a byte of tensor data is read.

A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`) and the
data. `read_header` bounds `n` (by `MAX_HEADER_BYTES` and by the file's size) before reading the
header, parses it with the bounded JSON parser of `adapter_schema`, and checks the layout: every
tensor's byte range fits its dtype and shape, the ranges tile the data exactly (no overlap, no
gap) and end where the file ends, so a truncated file or a 3 GB declared tensor is known from
`stat` and the header alone. `check_declared` then compares names, shapes and dtypes with what
the caller expects (an adapter's config on this model, a checkpoint's trainable tensors) and
names the first mismatch. Every failure is an `AdapterLoadError` (a caller may re-raise it as its
own kind).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .adapter_schema import DTYPE_BYTES, FLOAT_DTYPES, HEADER_ENTRY, MODULE_PATH, _fail, parse_json
from .adapter_check import compare_shapes
from .errors import AdapterLoadError

MAX_HEADER_BYTES = 8 << 20  # ~50,000 tensors' names, dtypes and shapes


@dataclass(frozen=True)
class TensorInfo:
    """One declared tensor: dtype (safetensors name, e.g. "F32"), shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: its tensors by name and the size of the data they tile."""

    path: Path
    tensors: dict[str, TensorInfo]
    data_bytes: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def _header_bytes(path: Path, max_bytes: int, where: str) -> tuple[bytes, int]:
    """The raw header and the number of data bytes after it; only the first `8 + n` bytes read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if len(prefix) < 8 or not 0 < n <= size - 8:
                raise AdapterLoadError(f"{where} is not a safetensors file: its header length "
                                       f"{n} does not fit the file's {size:,} bytes")
            if n > max_bytes:
                raise AdapterLoadError(f"{where}: its safetensors header declares {n:,} bytes; "
                                       f"headers are at most {max_bytes:,}")
            raw = fh.read(n)
    except OSError as exc:
        raise AdapterLoadError(f"{where} cannot be read: {exc}") from None
    return raw, size - 8 - n


def _entry(where: str, key: str, entry: object) -> TensorInfo:
    MODULE_PATH.check(key, where, "tensor name")
    HEADER_ENTRY.check(entry, where, key)
    assert isinstance(entry, dict)
    dtype, shape = entry["dtype"], tuple(entry["shape"])
    if dtype not in DTYPE_BYTES:
        raise _fail(where, f"{key}.dtype", f"one of {sorted(DTYPE_BYTES)}", dtype)
    begin, end = entry["data_offsets"]
    info = TensorInfo(dtype, shape, begin, end)
    if end - begin != info.numel * DTYPE_BYTES[dtype]:
        raise AdapterLoadError(f"{where}: tensor {key!r} has offsets {[begin, end]} ({end - begin:,} "
                               f"bytes) but its shape {list(shape)} of {dtype} needs "
                               f"{info.numel * DTYPE_BYTES[dtype]:,}")
    return info


def _check_layout(where: str, tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """The byte ranges must tile [0, data_bytes) in order: no overlap, no gap, nothing after."""
    cursor = 0
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != cursor:
            what = "overlaps the tensor before it" if t.begin < cursor else "leaves a gap before it"
            raise AdapterLoadError(f"{where}: tensor {key!r} starts at byte {t.begin:,}: it {what} "
                                   f"(expected {cursor:,})")
        cursor = t.end
    if cursor != data_bytes:
        how = "truncated" if cursor > data_bytes else "followed by unexplained bytes"
        raise AdapterLoadError(f"{where}: the header declares {cursor:,} bytes of tensor data, the "
                               f"file holds {data_bytes:,} ({how})")


def read_header(path: str | Path, max_bytes: int = MAX_HEADER_BYTES, shown: object = None) -> Header:
    """Parse and check the header of safetensors file `path` (see the module doc); errors name
    the file as `shown` (default: `path`)."""
    path = Path(path)
    where = str(shown or path)
    raw, data_bytes = _header_bytes(path, max_bytes, where)
    parsed = parse_json(raw, f"{where} (header)")
    if not isinstance(parsed, dict):
        raise AdapterLoadError(f"{where}: the safetensors header is a JSON "
                               f"{type(parsed).__name__}, not an object")
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterLoadError(f"{where}: the header's __metadata__ must map strings to strings")
    tensors = {key: _entry(where, key, entry) for key, entry in parsed.items()}
    _check_layout(where, tensors, data_bytes)
    return Header(path, tensors, data_bytes)


def check_declared(header: Header, expected: Mapping[str, tuple[int, ...]], where: object,
                   float_only: bool = True) -> None:
    """Names and shapes of `header` against `expected` ({name: shape}); with `float_only`,
    a non-float dtype is refused too. The error names the first mismatch."""
    try:
        compare_shapes(expected, header.shapes)
    except AdapterLoadError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from None
    for key, info in header.tensors.items():
        if float_only and info.dtype not in FLOAT_DTYPES:
            raise AdapterLoadError(f"{where}: tensor {key!r} has dtype {info.dtype}; adapter "
                                   "tensors are floating point")


def check_budget(header: Header, max_numel: int, where: object, basis: str) -> None:
    """Refuse a file that declares more numbers than `max_numel` (a bound from `basis`), for
    when the exact shapes cannot be known before reading."""
    if header.numel > max_numel:
        raise AdapterLoadError(f"{where}: the tensor file declares {header.numel:,} numbers, more "
                               f"than {basis} allows ({max_numel:,})")
