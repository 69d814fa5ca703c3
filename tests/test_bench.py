"""Benchmark harness: a grid end to end on tiny models, resume after a kill, failing cells,
baselines side by side, and the test split provably unread until the final evaluation.

The toy task is separable by construction (class "neg" uses words a0..a19, "pos" b0..b19), the
models are petkit's tiny random ones saved as Hugging Face folders with a word-level tokenizer.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import petkit as pk
import petkit.benchmark as bench
from petkit.core.errors import ConfigError
from petkit.data import RecordedSplit, SealedSplitError
from petkit.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]
VOCAB = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "neg", "pos", *WORDS]


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]",
                            bos_token="[BOS]", eos_token="[EOS]").save_pretrained(folder)


def _data(path: Path, n: int = 200) -> Path:
    rng, seen, rows = random.Random(0), set(), []
    while len(rows) < n:
        label = len(rows) % 2
        text = " ".join(rng.choice(WORDS[20 * label:20 * label + 20]) for _ in range(6))
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": ["neg", "pos"][label]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama (verbaliser task) and a tiny BERT (new head) folder, and the data file."""
    root = tmp_path_factory.mktemp("toy")
    llama, _ = tiny_model("llama", task="causal-lm")
    llama.save_pretrained(root / "llama")
    bert, _ = tiny_model("bert", task="base")
    bert.save_pretrained(root / "bert")
    for name in ("llama", "bert"):
        _tokenizer(root / name)
    return {"llama": str(root / "llama"), "bert": str(root / "bert"),
            "data": str(_data(root / "toy.jsonl"))}


def grid(toy: dict[str, str], model: str = "llama", **changes: Any) -> dict[str, Any]:
    spec = {"tasks": [{"name": "toy", "model": toy[model], "data": toy["data"],
                       "max_length": 16, "test_size": 30}],
            "methods": ["lora", "prompt"], "seeds": [0, 1], "sizes": [48],
            "validation": {"fraction": 0.25},
            "train": {"lr": 2e-2, "max_steps": 6, "batch_size": 8, "eval_every": 3},
            "threads": 1}  # a shared CPU: two OpenMP threads spin against other processes
    return {**spec, **changes}


def lora_qv_params(r: int = 8) -> int:
    """Tiny Llama: 2 layers, q_proj 32->32, v_proj 32->16 (2 kv heads of 8)."""
    return 2 * ((32 + 32) * r + (32 + 16) * r)


# --- the test-set guard -------------------------------------------------------------------


def test_recorded_split_refuses_reads_until_opened() -> None:
    split = RecordedSplit([{"text": "x"}, {"text": "y"}, {"text": "z"}])
    assert len(split) == 3 and split.reads == []  # size is not content
    for read in (lambda: split[0], lambda: split[1:], lambda: list(split),
                 lambda: {"text": "x"} in split):
        with pytest.raises(SealedSplitError):
            read()
    assert len(split.reads) == 4 and all(e.startswith("refused") for e in split.reads)
    view = split.view([2, 0])
    assert view.log == [] and not view.opened
    assert list(view.open("final evaluation")) == [{"text": "z"}, {"text": "x"}]
    assert view.log == ["open: final evaluation", "read: all (iterate)"]


# --- spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change,needle", [
    ({"seeds": [0, 0]}, "seeds"), ({"sizes": [1]}, "sizes"), ({"methods": ["nope"]}, "nope"),
    ({"train": {"lr": -1}}, "lr"), ({"validation": {"fraction": 1.5}}, "fraction"),
    ({"colour": 1}, "colour"), ({"methods": [{"name": "lora", "r": 0}]}, "r"),
])
def test_spec_errors_name_the_field(toy: dict[str, str], change: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        bench.spec_from_dict(grid(toy, **change))


def test_spec_arms_and_cells(toy: dict[str, str]) -> None:
    spec = bench.spec_from_dict(grid(toy, methods="all", sizes=[32, "full"],
                                     baselines={"full": {"lr": 1e-3}, "peft": True}))
    names = [a.name for a in spec.arms]
    runnable = [m for m in pk.METHODS if m != "trainable-tokens"]  # it needs token ids to run
    assert names[:len(runnable)] == runnable
    assert "full" in names and "peft:lora" in names and "peft:prompt" in names
    assert not any(n.startswith("peft:") and n[5:] not in bench.spec.PEFT_TWINS for n in names)
    cells = spec.cells()
    assert len(cells) == len(names) * 2 * 2 and len({c.key for c in cells}) == len(cells)
    full = next(c for c in cells if c.arm.name == "full")
    assert spec.train_config(full).lr == 1e-3 and spec.train_config(cells[0]).lr == 2e-2


def test_shipped_grid_files_load() -> None:
    files = sorted((ROOT / "docs" / "bench").glob("*.yaml"))
    assert files, "the documented grid file is missing"
    for path in files:
        spec = bench.load_spec(path)
        assert len(spec.seeds) >= 3 and len(spec.sizes) >= 3 and spec.cells()


# --- end to end ---------------------------------------------------------------------------


def _spy_train(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Wrap the cell's `train`: while it runs, the task's test split exists, is sealed and has
    not been read (nor has any read been tried)."""
    import petkit.benchmark.cell as cell_module

    real = cell_module.train

    def spy(model: Any, data: Any, config: Any, eval_data: Any = None, **kw: Any) -> Any:
        splits = [o for o in gc.get_objects() if isinstance(o, RecordedSplit)]
        sealed = [s for s in splits if not s.opened]
        assert sealed and all(s.log == [] for s in sealed)
        calls.append(f"seed={config.seed}")
        return real(model, data, config, eval_data=eval_data, **kw)

    monkeypatch.setattr(cell_module, "train", spy)


def test_grid_end_to_end(toy: dict[str, str], tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _spy_train(monkeypatch, calls)
    report = pk.bench(grid(toy), tmp_path / "run", progress=False, echo=lambda s: None)
    assert len(calls) == 4 and len(report.records) == 4 and not report.failed
    by_arm = {r["arm"]: r for r in report.records if r["seed"] == 0}
    assert by_arm["lora"]["trainable_params"] == lora_qv_params()
    assert by_arm["prompt"]["trainable_params"] == 20 * 32  # 20 virtual tokens x hidden 32
    for r in report.records:
        assert (r["n_train"], r["n_val"], r["n_test"]) == (36, 12, 30)
        assert 0.0 <= r["test_metric"] <= 1.0 and r["best_val_metric"] is not None
        assert r["trainable_pct"] == pytest.approx(100 * r["trainable_params"] / r["base_params"])
        assert r["adapter_bytes"] > 4 * r["trainable_params"] and r["s_per_step"] > 0
        assert 0 < r["cpu_s_per_step"]
        assert r["steps"] == 6 and r["peak_mem_mb"] == r["peak_mem_mb"]  # a number, not NaN
        log = json.loads((Path(report.folder) / "cells" / _folder(r) / "test_access.json")
                         .read_text())
        assert log == ["mark: training and selection done", "open: final evaluation",
                       "read: all (iterate)"]
    rows = list(csv.DictReader(report.csv.open()))
    assert len(rows) == 4 and {r["arm"] for r in rows} == {"lora", "prompt"}
    table = report.markdown.read_text()
    assert "| lora |" in table and "| prompt |" in table and "(2)" in table and "±" in table
    assert sorted(p.name for p in report.plots) == sorted(
        f"toy-{k}.png" for k in ("metric-vs-params", "metric-vs-size", "stability", "cost"))
    assert all(p.stat().st_size > 1000 for p in report.plots)
    status = json.loads((report.folder / "status.json").read_text())
    assert (status["done"], status["left"]) == (4, 0)


def _folder(record: dict[str, Any]) -> str:
    return record["key"].replace("/", "__").replace(":", "-").replace("=", "")


def test_failing_cell_does_not_stop_grid(toy: dict[str, str], tmp_path: Path) -> None:
    spec = grid(toy, seeds=[0], methods=["lora", {"name": "adapter", "targets": ["no_such"]},
                                         "prompt"])
    report = bench.run(spec, tmp_path / "run", progress=False, echo=lambda s: None)
    status = {r["arm"]: r["status"] for r in report.records}
    assert status == {"lora": "ok", "adapter": "failed", "prompt": "ok"}
    failed = report.failed[0]
    assert failed["error"].startswith("TargetError") and "no_such" in failed["error"]
    assert (report.folder / "cells" / _folder(failed) / "error.txt").is_file()
    assert "## Failed cells" in report.markdown.read_text()
    again = bench.run(spec, tmp_path / "run", progress=False, echo=lambda s: None)
    assert again.records == report.records  # nothing re-run: failed cells stay recorded


@pytest.mark.slow
def test_resume_after_kill_skips_finished_cells(toy: dict[str, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec_file = tmp_path / "grid.yaml"
    spec_file.write_text(yaml.safe_dump(grid(toy, train={"lr": 2e-2, "max_steps": 40,
                                                         "batch_size": 8, "eval_every": 20})))
    out = tmp_path / "run"
    cells = out / "cells.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "petkit.cli", "bench", str(spec_file),
                             "--output", str(out), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if cells.is_file() and cells.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in cells.read_text().splitlines()]
    assert 1 <= len(before) < 4, "the kill should land mid-grid"
    calls: list[str] = []
    _spy_train(monkeypatch, calls)
    report = bench.run(spec_file, out, progress=False, echo=lambda s: None)
    assert len(calls) == 4 - len(before) and len(report.records) == 4 and not report.failed
    after = {r["key"]: r for r in report.records}
    assert all(after[r["key"]] == r for r in before)  # finished cells kept, not re-run
    assert len(cells.read_text().splitlines()) == 4


def test_full_and_peft_baselines_side_by_side(toy: dict[str, str], tmp_path: Path) -> None:
    spec = grid(toy, model="bert", seeds=[0], methods=["lora", "prompt"],
                baselines={"full": {"lr": 1e-3}, "peft": True})
    report = bench.run(spec, tmp_path / "run", progress=False, echo=lambda s: None)
    rows = {r["arm"]: r for r in report.records}
    assert set(rows) == {"lora", "prompt", "full", "peft:lora", "peft:prompt"}
    assert not report.failed, [r["error"] for r in report.failed]
    head = 32 * 2 + 2  # the new classifier (hidden 32 -> 2 labels) trains in every arm
    # BERT query/value 32->32, r=8, 2 layers: same placement and size in petkit and peft.
    assert rows["lora"]["trainable_params"] == rows["peft:lora"]["trainable_params"] \
        == 2 * 2 * (32 + 32) * 8 + head
    assert rows["prompt"]["trainable_params"] == rows["peft:prompt"]["trainable_params"] \
        == 20 * 32 + head
    full = rows["full"]
    assert full["trainable_params"] == full["base_params"] and full["trainable_pct"] == 100.0
    assert full["adapter_bytes"] > 4 * full["base_params"]
    assert all(r["n_train"] == 36 for r in rows.values())  # the same data in every arm


def test_shipped_quick_grid_is_found_by_name_and_loads(tmp_path, capsys):
    """`petkit bench --recipe quick` (or `petkit bench quick`) names a shipped grid; a typo gets
    the close name; a grid must be given."""
    import argparse

    from petkit.benchmark import cli as bench_cli
    from petkit.benchmark.spec import load_spec
    from petkit.cli import main

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    for argv in (["--recipe", "quick"], ["quick"]):
        path = bench_cli.grid_path(parser.parse_args(argv))
        assert path.name == "quick.yaml" and path.is_file()
    spec = load_spec(path)
    assert len(spec.seeds) == 1 and len(spec.sizes) == 1 and {a.name for a in spec.arms} >= {"lora"}
    assert main(["bench", "--recipe", "quik"]) == 2
    assert "did you mean 'quick'?" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert "needs a grid" in capsys.readouterr().err
    assert main(["bench", str(path), "--recipe", "quick"]) == 2


def test_section_overrides_reach_every_cell(toy: dict[str, str], tmp_path: Path, capsys) -> None:
    """`petkit bench GRID --train.max_steps=2 --runtime.device=cpu`: every cell runs with them
    (and its fingerprint says so); a field the grid sets per cell is refused."""
    from petkit.benchmark.spec import load_spec, with_overrides
    from petkit.cli import main

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid(toy, methods=["lora"], seeds=[0])), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["bench", str(path), "--output", str(out), "--no-progress",
                 "--train.max_steps=2", "--runtime.device=cpu", "--train.eval_every=1"]) == 0
    records = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [2] and records[0]["status"] == "ok"
    spec = load_spec(path)
    cell = spec.cells()[0]
    assert spec.fingerprint(cell) != with_overrides(spec, {"train.max_steps": "2"}).fingerprint(cell)
    capsys.readouterr()
    assert main(["bench", str(path), "--output", str(out), "--train.seed=3"]) == 2
    assert "per cell" in capsys.readouterr().err



def test_shards_on_one_folder_keep_each_others_cells_in_the_csv(
        toy: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `--shard` processes on one output: the CSV a shard rewrites after each of its cells
    holds the cells the other shard finished meanwhile (not only those seen at its start)."""
    import petkit.benchmark.runner as runner

    spec, out = bench.spec_from_dict(grid(toy)), tmp_path / "run"
    others = spec.cells()[1::2]  # shard 2/2's cells
    store, shown = runner.ResultStore(out), []

    def record(cell: Any) -> dict[str, Any]:
        return {**runner._identity(cell, spec.fingerprint(cell)), "status": "ok",
                "metric": "accuracy", "test_metric": 0.5, "trainable_pct": 1.0, "cell_s": 1.0}

    def fake_run_one(cell: Any, *_: Any) -> dict[str, Any]:
        store.append(record(others[len(shown)]))  # the other shard finishes a cell meanwhile
        return record(cell)

    real_write = runner.ResultStore.write_csv

    def spy_write(self: Any, records: list[dict[str, Any]]) -> Path:
        shown.append({r["key"] for r in records})
        return real_write(self, records)

    monkeypatch.setattr(runner, "_run_one", fake_run_one)
    monkeypatch.setattr(runner.ResultStore, "write_csv", spy_write)
    runner.run_grid(spec, out, progress=False, shard=(1, 2), echo=lambda s: None)
    mine = spec.cells()[0::2]
    assert [len(keys) for keys in shown] == [2 * (i + 1) for i in range(len(mine))]
    assert others[0].key in shown[0]  # in the CSV right after our first cell
    with open(out / "cells.csv", encoding="utf-8") as handle:
        assert {row["key"] for row in csv.DictReader(handle)} == {c.key for c in spec.cells()}
