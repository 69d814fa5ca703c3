"""A newcomer's first hour: their own CSV / JSONL files through the CLI and the library.

Fast tests: every mistake in a user's file is one line naming file, line, column or value, raised
before any model loads; sizes and carve-outs as the user expects; encoded examples as tensors;
an unreachable hub. Slow tests: the CLI and `import petkit` without the optional extras, and the
whole hour on SmolLM2-135M (train with separate files and custom columns, eval on the whole test
file, merge and reload with plain transformers, export to PEFT and load it with peft).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import petkit as pk
import petkit.app.pipeline as pipeline
import petkit.models as models
import petkit.models.hub as hub
from petkit.app.recipe import Recipe
from petkit.cli import _eval_data, _recipe, _split_dotted, build_parser, main
from petkit.core.errors import ConfigError, PetkitError
from petkit.data import load_task
from petkit.data.files import Columns, load_test_file
from petkit.models import resolve_model, tiny_model

HAPPY = ["love this", "great day", "so happy", "wonderful news", "best thing ever", "nice work"]
SAD = ["hate this", "awful day", "so sad", "terrible news", "worst thing ever", "poor work"]
COLS = ["--text-column", "tweet", "--label-column", "mood"]


def tweets(n: int, start: int = 0) -> list[dict[str, str]]:
    """n rows alternating happy / sad, each text unique."""
    return [{"tweet": f"{(HAPPY if i % 2 else SAD)[i % 6]} #{i}", "mood": "happy" if i % 2 else "sad"}
            for i in range(start, start + n)]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# (file name, content, extra CLI args, the one line the user must read)
BAD_FILES = [
    ("empty.csv", "", COLS, r"empty\.csv is empty"),
    ("header.csv", "tweet,mood\n", COLS, r"header\.csv has a header \(tweet, mood\) but no rows"),
    ("broken.jsonl", '{"tweet": "a", "mood": "sad"}\n{"tweet": "b", "mood": happy}\n', COLS,
     r"broken\.jsonl line 2: not valid JSON \(Expecting value at column 24\)"),
    ("one.csv", "tweet,mood\nhello,happy\n", COLS,
     r"one\.csv: every row has 'mood' = 'happy'; classification needs at least two"),
    ("oneclass.csv", "tweet,mood\n" + "".join(f"t{i},sad\n" for i in range(9)), COLS,
     r"every row has 'mood' = 'sad'"),
    ("columns.csv", "tweet,mood\nhi,happy\nho,sad\n", [],
     r"columns\.csv has no column 'text' or 'label' \(its columns: tweet, mood\); name yours "
     r"with --text-column/--label-column"),
    ("ragged.csv", "tweet,mood\nhi,happy\nho,sad,extra\n", COLS,
     r"ragged\.csv line 3: 3 fields, but the header has 2 \(tweet, mood\)"),
    ("blank.csv", "tweet,mood\nhi,happy\n,sad\n", COLS, r"blank\.csv line 3: empty 'tweet'"),
    ("nolabel.jsonl", '{"tweet": "a", "mood": "sad"}\n{"tweet": "b"}\n', COLS,
     r"nolabel\.jsonl line 2: no 'mood' \(it has: tweet\)"),
    ("notes.txt", "hello", COLS, r"unknown task '.*notes\.txt': not an embedded task"),
    ("same.jsonl", '{"prompt": "q", "completion": "a"}\n' * 5, [],
     r"same\.jsonl: holding out a test set left no training rows"),
    ("qa.jsonl", '{"prompt": "q", "completion": "a"}\n', [],
     r"qa\.jsonl has 1 row\(s\): too few to hold out a test set; add rows or give a test file"),
]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to load a model: data errors must come first."""
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(pipeline, "load_model", boom, raising=False)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name,content,extra,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_one_line_before_the_model_loads(
        name: str, content: str, extra: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], no_model: None) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    code, _, err = cli(["train", "--data", str(path), *extra, "--output", str(tmp_path / "run")],
                       capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_file_mistakes_across_files_name_the_row(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 no_model: None) -> None:
    train = write_csv(tmp_path / "train.csv", tweets(10))
    test = write_csv(tmp_path / "test.csv", [*tweets(2, 10), {"tweet": "meh", "mood": "bored"}])
    code, _, err = cli(["train", "--data", str(train), "--test-file", str(test), *COLS], capsys)
    assert code == 2 and "test.csv line 4: 'mood' is 'bored', which no row of" in err
    assert "train.csv has (happy, sad)" in err
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    code, _, err = cli(["train", "--data", str(train), "--test-file", str(qa), *COLS], capsys)
    assert code == 2 and ("qa.jsonl is instruction data (prompt, completion) but the training "
                          "data is classification (tweet, mood)") in err
    code, _, err = cli(["train", "--data", str(tmp_path / "missing.csv"), *COLS], capsys)
    assert code == 2 and "data file not found: " in err and "missing.csv" in err


def test_eval_labels_must_be_the_trained_ones(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "later.jsonl", [*tweets(3), {"tweet": "x", "mood": "angry"}])
    with pytest.raises(ConfigError, match=r"later\.jsonl line 4: 'mood' is 'angry', not one of "
                                          r"the labels the model was trained on \(happy, sad\)"):
        load_test_file(path, Columns("tweet", "mood"), ["happy", "sad"])
    task = load_test_file(write_jsonl(tmp_path / "ok.jsonl", tweets(5)), Columns("tweet", "mood"),
                          ["happy", "sad"])
    assert len(task.test) == 5 and {e["label"] for e in task.test} == {0, 1}


def test_a_user_file_trains_on_all_rows_and_states_any_carve_out(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", tweets(50))
    test = write_csv(tmp_path / "test.csv", tweets(8, 50))
    task = load_task(str(train), text_column="tweet", label_column="mood", test_file=str(test))
    assert (len(task.train), len(task.test)) == (50, 8) and task.label_names == ("happy", "sad")
    assert task.notes == (f"train: {train}, all 50 rows", f"test: {test}, all 8 rows")
    alone = load_task(str(train), text_column="tweet", label_column="mood")
    assert (len(alone.train), len(alone.test)) == (40, 10)
    assert alone.notes[1].startswith(f"test: 10 rows held out of {train} (20%, stratified")
    validation = write_jsonl(tmp_path / "val.jsonl", tweets(6, 60))
    with_val = load_task(str(train), text_column="tweet", label_column="mood",
                         validation_file=str(validation), test_file=str(test))
    assert len(with_val.validation) == 6 and len(with_val.train) == 50


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "pipe"])
def test_a_spreadsheet_export_reads_whatever_its_delimiter(tmp_path: Path, delimiter: str) -> None:
    """A header split by ';', tab or '|' (and not by commas) sets the file's delimiter; a byte
    order mark and CRLF line ends (Excel's) change nothing; commas inside fields stay text."""
    rows = [{"tweet": f"{row['tweet']}, really", "mood": row["mood"]} for row in tweets(12)]
    path = tmp_path / "export.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.DictWriter(handle, fieldnames=["tweet", "mood"], delimiter=delimiter,
                                lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    task = load_task(str(path), text_column="tweet", label_column="mood")
    texts = sorted(ex["text"] for ex in [*task.train, *task.test])
    assert texts == sorted(row["tweet"] for row in rows)
    assert task.label_names == ("happy", "sad")


def test_cli_sizes_apply_to_the_embedded_task_only(tmp_path: Path) -> None:
    def recipe(argv: list[str]) -> Recipe:
        args, extra = build_parser().parse_known_args(argv)
        return _recipe(args, _split_dotted(extra))

    data = str(tmp_path / "train.csv")
    assert recipe(["train"]).data.train_size == 480  # the default recipe's embedded task
    mine = recipe(["train", "--data", data, "--test-file", "t.csv", *COLS])
    assert (mine.data.train_size, mine.data.test_size) == (None, None)
    assert (mine.data.test_file, mine.data.text_column, mine.data.label_column) == \
        ("t.csv", "tweet", "mood")
    assert recipe(["train", "--train-file", data, "--train-size", "100"]).data.train_size == 100
    flags = recipe(["train", "--epochs", "2", "--grad-accum", "4", "--warmup", "3", "--rank", "4",
                    "--alpha", "8", "--schedule", "cosine", "--bf16", "--eval-every", "5"])
    assert (flags.train.epochs, flags.train.grad_accum, flags.train.warmup_steps) == (2, 4, 3)
    assert flags.train.max_steps is None  # --epochs alone is not cut by the recipe's 60 steps
    assert recipe(["train", "--epochs", "2", "--steps", "7"]).train.max_steps == 7
    assert (flags.method["r"], flags.method["alpha"], flags.train.schedule) == (4, 8, "cosine")
    assert (flags.train.precision, flags.train.eval_every) == ("bf16", 5)
    args, _ = build_parser().parse_known_args(["eval", "--adapter", "a", "--data", data])
    assert _eval_data(args, {}) == {"data.test_file": data, "data.test_size": "none"}


def test_help_shows_common_options_and_dotted_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--train-file", "--validation-file", "--test-file", "--text-column",
                 "--label-column", "--prompt-column", "--completion-column", "--epochs",
                 "--grad-accum", "--warmup", "--schedule", "--eval-every", "--rank", "--alpha",
                 "--bf16", "--precision"):
        assert flag in out, flag
    assert "--SECTION.FIELD=VALUE" in out


def test_methods_are_sorted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    rows = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines()
            if line.count("│") >= 3]
    names = [r for r in rows if r and r != "method"]
    assert names == sorted(names) and len(names) >= 10


@pytest.mark.parametrize("as_tensor", [False, True])
def test_train_takes_encoded_examples_as_lists_or_tensors(as_tensor: bool) -> None:
    model, _ = tiny_model("llama")
    pk.attach(model, pk.LoraConfig(r=2))
    wrap = torch.tensor if as_tensor else list
    data = [{"input_ids": wrap([5, 6, 7, 8][: 2 + i % 3]), "attention_mask": wrap([1] * (2 + i % 3)),
             "labels": wrap([5, 6, 7, 8][: 2 + i % 3])} for i in range(6)]
    result = pk.train(model, data, pk.TrainConfig(max_steps=2, batch_size=3, progress=False))
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))


def test_an_unreachable_hub_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(PetkitError, match=r"cannot reach the Hugging Face hub .* 'org/nowhere-x', "
                                          r"and it is not in the local cache"):
        resolve_model("org/nowhere-x")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert resolve_model("org/nowhere-x") == "org/nowhere-x"  # transformers downloads it
    assert resolve_model("minilm-l6") != "minilm-l6"  # embedded: a local folder, never the hub


BLOCKED = ("flwr", "ray", "cma", "peft", "dp_accounting", "bitsandbytes", "torchao", "pytest")


@pytest.mark.slow
def test_the_cli_starts_without_optional_packages() -> None:
    """`import petkit`, every subcommand's --help, and `petkit fed` naming its pip install."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules.update(dict.fromkeys({BLOCKED!r}))  # None: as if not installed
        import petkit
        from petkit.cli import build_parser, main
        commands = build_parser()._subparsers._group_actions[0].choices
        for command in commands:
            try:
                main([command, "--help"])
            except SystemExit as done:
                assert done.code == 0, command
        sys.exit(main(["fed"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'flwr[simulation]" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`petkit train` on a user CSV with a separate test file and custom column names."""
    folder = tmp_path_factory.mktemp("first-hour")
    train = write_csv(folder / "train.csv", tweets(24))
    test = write_csv(folder / "test.csv", tweets(8, 100))
    out = folder / "run"
    argv = ["train", "--data", str(train), "--test-file", str(test), *COLS, "--steps", "2",
            "--batch-size", "4", "--max-length", "24", "--output", str(out),
            "--train.progress=false"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, printed.getvalue()


# Each step of the hour loads SmolLM2-135M: minutes on a busy 2-core machine.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hour_train_on_own_files(first_run: tuple[Path, str]) -> None:
    out, text = first_run
    folder = out.parent
    assert f"train: {folder / 'train.csv'}, all 24 rows" in text
    assert f"test: {folder / 'test.csv'}, all 8 rows" in text
    assert text.count("before") == 1 and f"loss curve: {out / 'training.png'}" in text
    assert "best_None" not in (out / "train.log").read_text()
    saved = (out / "recipe.yaml").read_text()
    assert "- happy\n  - sad" in saved and "label_column: mood" in saved


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hour_eval_scores_whole_files(first_run: tuple[Path, str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """CSV or JSONL, every row, labels mapped as training mapped them."""
    out, _ = first_run
    later = write_jsonl(out.parent / "later.jsonl", tweets(5, 200))
    for path, n in ((out.parent / "test.csv", 8), (later, 5)):
        code, text, err = cli(["eval", "--adapter", str(out / "adapter"), "--data", str(path)],
                              capsys)
        assert code == 0 and f"test on {n} examples (verbaliser): " in text, err


def _with_adapter(out: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model, _ = models.load_model("smollm2-135m")
    pk.load_adapter(model, str(out / "adapter"))
    with torch.no_grad():
        return model, ids, model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hour_merge_reloads_with_plain_transformers(first_run: tuple[Path, str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = first_run
    merged = out.parent / "merged"
    assert cli(["merge", "--adapter", str(out / "adapter"), "--output", str(merged)], capsys)[0] == 0
    _, ids, expected = _with_adapter(out)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    torch.testing.assert_close(plain, expected, atol=2e-3, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hour_export_to_peft_loads_with_peft(first_run: tuple[Path, str]) -> None:
    peft = pytest.importorskip("peft")
    out, _ = first_run
    model, ids, expected = _with_adapter(out)
    pk.export_peft(model, out.parent / "peft")
    base, _ = models.load_model("smollm2-135m")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, out.parent / "peft").eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-5)


def test_a_run_saves_its_files_as_absolute_paths(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """So `petkit eval --adapter runs/x/adapter` finds the test file from any folder."""
    from petkit.app.recipe import DataSpec

    monkeypatch.chdir(tmp_path)
    spec = DataSpec(name="train.csv", test_file="test.csv")
    assert pipeline._absolute_files(spec) == {"name": str(tmp_path / "train.csv"),
                                              "test_file": str(tmp_path / "test.csv")}
    assert pipeline._absolute_files(DataSpec(name="bbc-news")) == {}
