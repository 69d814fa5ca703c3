"""Mutation fuzz of every data reader through the public entries (`load_task`,
`load_test_file`): whatever the bytes, the result is a task or a `PetkitError` that names the
file (and the line/row/item where the reader knows it), within a per-file time bound; files over
the size caps are refused before parsing, with bounded memory.

Formats are a table of (suffix, writer) cases: a new reader adds one row to `FORMATS`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import petkit as pk
from petkit.data import load_task, load_test_file
from petkit.data import readers
from petkit.data.files import Columns
from petkit.data.readers import ReadLimits

Rows = list[dict[str, Any]]
PER_FILE_S = 5.0  # a hang bound, far above the milliseconds a small file takes


def _csv(rows: Rows) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _jsonl(rows: Rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _json_array(rows: Rows) -> bytes:
    return json.dumps(rows, indent=1).encode()


def _json_columns(rows: Rows) -> bytes:
    return json.dumps({k: [r.get(k) for r in rows] for k in rows[0]}).encode()


def _parquet(rows: Rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


@dataclass(frozen=True)
class Format:
    suffix: str
    write: Callable[[Rows], bytes]


FORMATS = {
    "csv": Format(".csv", _csv),
    "jsonl": Format(".jsonl", _jsonl),
    "json_array": Format(".json", _json_array),
    "json_columns": Format(".json", _json_columns),
    "parquet": Format(".parquet", _parquet),
}

SEEDS: dict[str, Rows] = {
    "classification": [{"text": f"review number {i} was {'good' if i % 2 else 'bad'}",
                        "label": "pos" if i % 2 else "neg"} for i in range(8)],
    "int_labels": [{"text": f"item {i}", "label": i % 3} for i in range(9)],
    "instruction": [{"prompt": f"What is {i} + {i}?", "completion": str(2 * i)} for i in range(8)],
}
ODD_VALUES = [None, "", " ", "\u0000", [], {}, {"a": [1]}, 1e308, -1, 10**30, True, "x" * 5000,
              "99999999999999999999", "--5", "\u00b2", "1.5", float("nan"), "é\u202e", 7]
TOKENS = [b'"', b",", b"\n", b"\r", b"\r\n", b"{", b"[", b"}", b"]", b"\x00", b"\xff\xfe",
          b"\\", b"1" * 5000, b"[" * 3000, b"{" * 3000, b"-", b";", b"\t", b"|", b"\xef\xbb\xbf",
          b"null", b"NaN", b"1e999", b'"label": 99999999999', b'"text": ', b"PAR1", b"\x80"]


def mutate_rows(rows: Rows, rng: random.Random) -> Rows:
    rows = [dict(r) for r in rows]
    for _ in range(rng.randint(0, 3)):
        row = rng.choice(rows)
        key = rng.choice([*row, "extra"])
        if rng.random() < 0.15:
            row.pop(key, None)
        else:
            row[key] = rng.choice(ODD_VALUES)
    if rng.random() < 0.1:
        rows = rows[: rng.randint(1, 2)]
    return rows


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            buf += rng.choice(TOKENS)
            continue
        at = rng.randrange(len(buf))
        op = rng.randrange(6)
        if op == 0:
            buf[at] = rng.randrange(256)
        elif op == 1:
            buf[at:at] = rng.choice(TOKENS)
        elif op == 2:
            del buf[at:at + rng.randint(1, 64)]
        elif op == 3:
            end = min(len(buf), at + rng.randint(1, 256))
            buf[at:at] = buf[at:end]
        elif op == 4:
            del buf[at:]
        else:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(buf)


def fuzz_file(folder: Path, i: int, rng: random.Random) -> Path:
    name = rng.choice(list(FORMATS))
    rows = SEEDS[rng.choice(list(SEEDS))]
    if rng.random() < 0.5:
        rows = mutate_rows(rows, rng)
    try:
        data = FORMATS[name].write(rows)
    except Exception:  # a writer refusing a mutated row (e.g. pyarrow on mixed types)
        data = FORMATS[name].write(SEEDS["classification"])
    if rng.random() < 0.8:
        data = mutate_bytes(data, rng)
    path = folder / f"f{i}-{name}{FORMATS[name].suffix}"
    path.write_bytes(data)
    return path


class Hang(Exception):
    pass


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


LOCATED = ("line ", "item ", "row ", "byte ")


def check_one(path: Path, entry: str) -> str:
    """Load `path` through `entry`; 'ok' or the PetkitError's message (asserted here)."""
    start = time.perf_counter()
    try:
        with time_bound(PER_FILE_S):
            if entry == "load_task":
                load_task(str(path))
            else:
                load_test_file(path, Columns())
        return "ok"
    except pk.PetkitError as err:
        message = str(err)
    except Hang as err:
        pytest.fail(f"{path}: {err}")
    except Exception as err:  # anything else is a bug: keep the file to reproduce it
        pytest.fail(f"{path} via {entry}: {type(err).__name__}: {err}")
    assert time.perf_counter() - start < PER_FILE_S
    assert str(path) in message, message
    if "not valid" in message and path.suffix != ".parquet":  # a text parse error says where
        assert any(word in message for word in LOCATED), message
    assert "\n" not in message.strip(), message
    return message


def run_fuzz(folder: Path, count: int, seed: int) -> dict[str, int]:
    rng, outcomes = random.Random(seed), {"ok": 0, "refused": 0}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(count):
        path = fuzz_file(folder, i, rng)
        result = check_one(path, rng.choice(["load_task", "load_test_file"]))
        outcomes["ok" if result == "ok" else "refused"] += 1
        path.unlink()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, f"peak RSS grew {grown_mb:.0f} MB over the fuzz"
    return outcomes


def test_fuzz_every_reader_fast_set(tmp_path: Path) -> None:
    outcomes = run_fuzz(tmp_path, 400, seed=0)
    assert outcomes["ok"] > 20 and outcomes["refused"] > 200, outcomes  # both paths exercised


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_every_reader_5000_files(tmp_path: Path) -> None:
    start = time.perf_counter()
    outcomes = run_fuzz(tmp_path, 5000, seed=1)
    print(f"5000 mutated files in {time.perf_counter() - start:.1f} s: {outcomes}")
    assert sum(outcomes.values()) == 5000


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_reads_its_unmutated_seed(tmp_path: Path, name: str) -> None:
    for kind, rows in SEEDS.items():
        path = tmp_path / f"{kind}{FORMATS[name].suffix}"
        path.write_bytes(FORMATS[name].write(rows))
        task = load_task(str(path))
        assert len(task.train) + len(task.test) == len(rows)


# --- size caps: refused before parsing, in bounded time and memory ---------------------------


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sparse(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


@pytest.mark.parametrize("suffix,head", [(".jsonl", b'{"text": "'), (".csv", b"text,label\nx")])
def test_a_500mb_line_is_refused_by_size(tmp_path: Path, suffix: str, head: bytes) -> None:
    path = sparse(tmp_path / f"one-line{suffix}", head, 500 << 20)
    before, start = _peak_mb(), time.perf_counter()
    with pytest.raises(pk.ConfigError, match=r"line \d is longer than 64.0 MiB: refused before parsing"):
        load_task(str(path))
    assert time.perf_counter() - start < 2.0
    assert _peak_mb() - before < 200  # at most one capped line read (64 MiB) and its copy


def test_a_2gb_json_document_is_refused_from_its_size(tmp_path: Path) -> None:
    path = sparse(tmp_path / "big.json", b"[", 2 << 30)
    start = time.perf_counter()
    with pytest.raises(pk.ConfigError, match="over the 1.0 GiB petkit reads"):
        load_task(str(path))
    assert time.perf_counter() - start < 0.5


def test_a_file_over_the_cap_is_refused_from_its_size(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(readers, "LIMITS", ReadLimits(max_file_bytes=1 << 20))
    path = sparse(tmp_path / "big.csv", b"text,label\n", 2 << 20)
    with pytest.raises(pk.ConfigError, match="over the 1.0 MiB"):
        load_task(str(path))


def test_a_parquet_row_over_the_cap_is_refused_from_the_footer(tmp_path: Path, monkeypatch) -> None:
    """The caps are configurable; a parquet file's row sizes are read from its footer."""
    rows = [{"text": "x" * (1 << 20), "label": "a"}, {"text": "y" * (1 << 20), "label": "b"}]
    path = tmp_path / "wide.parquet"
    path.write_bytes(_parquet(rows))
    monkeypatch.setattr(readers, "LIMITS", ReadLimits(max_row_bytes=64 << 10))
    with pytest.raises(pk.ConfigError, match=r"wide.parquet: row 1 \(row group 0: 2 rows"):
        load_task(str(path))
    monkeypatch.setattr(readers, "LIMITS", ReadLimits())
    assert load_task(str(path), test_fraction=0.5).train


def test_a_label_that_would_make_billions_of_classes_names_its_row(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 99999999999}\n')
    start = time.perf_counter()
    with pytest.raises(pk.ConfigError, match="labels.jsonl line 2: 'label' is '99999999999'"):
        load_task(str(path))
    assert time.perf_counter() - start < 1.0


def test_the_slow_fuzz_leaves_no_file_behind(tmp_path: Path) -> None:
    run_fuzz(tmp_path, 20, seed=2)
    assert os.listdir(tmp_path) == []
