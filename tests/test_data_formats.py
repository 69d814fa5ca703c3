"""Data formats: each layout recognised from its columns and read into its canonical row;
`--format`, ambiguous and unknown layouts, malformed rows named by line (error or skip), CSV
cells holding JSON, parquet, saved Hugging Face datasets and hub ids offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from petkit.app.recipe import DataSpec
from petkit.cli import main
from petkit.core.errors import ConfigError
from petkit.data import FORMATS, load_task
from petkit.data.formats import accepted

U, A = "user", "assistant"


def msgs(*turns: str, roles: tuple[str, ...] = (U, A)) -> list[dict]:
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# (format, rows of a file in it, canonical row of its first row)
LAYOUTS = [
    ("text-label", [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(6)],
     {"text": "t0", "label": 0}),
    ("prompt-completion", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)],
     {"prompt": "q0", "completion": "a0"}),
    ("alpaca", [{"instruction": f"Do {i}.", "input": "x" if i % 2 else "", "output": f"o{i}"}
                for i in range(6)], {"prompt": "Do 0.", "completion": "o0"}),
    ("messages", [{"messages": [{"role": "system", "content": "Be kind."},
                                *msgs(f"hi {i}", "hello", "bye", "ciao")]} for i in range(6)],
     {"messages": [{"role": "system", "content": "Be kind."}, *msgs("hi 0", "hello", "bye", "ciao")]}),
    ("sharegpt", [{"conversations": [{"from": "human", "value": f"hi {i}"},
                                     {"from": "gpt", "value": "hello"}]} for i in range(6)],
     {"messages": msgs("hi 0", "hello")}),
    ("preference", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(6)],
     {"prompt": "p0", "chosen": "good", "rejected": "bad"}),
    ("reference", [{"question": f"{i} + 1?", "answer": i + 1} for i in range(6)],
     {"prompt": "0 + 1?", "reference": "1"}),
]


@pytest.mark.parametrize("name,rows,first", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_each_layout_is_recognised_and_read_canonically(tmp_path, name, rows, first) -> None:
    task = load_task(write(tmp_path / "d.jsonl", rows), test_fraction=0.5)
    assert task.format == name and task.kind == FORMATS[name].kind
    assert task.format_note.startswith(f"format: {name} ({task.kind}; columns: ")
    assert first in task.train + task.test and len(task.train) + len(task.test) == 6


def test_alpaca_joins_instruction_and_input(tmp_path) -> None:
    rows = [{"instruction": "Translate.", "input": "cat", "output": "chat"},
            {"instruction": "Say hi.", "output": "hi"}, {"instruction": "Go.", "output": "ok"}]
    task = load_task(write(tmp_path / "a.jsonl", rows), test_fraction=0.5)
    assert {"prompt": "Translate.\n\ncat", "completion": "chat"} in task.train + task.test


def test_preference_message_lists_split_prompt_and_answers(tmp_path) -> None:
    rows = [{"chosen": msgs(f"q{i}", "yes"), "rejected": msgs(f"q{i}", "no")} for i in range(4)]
    rows.append({"prompt": "q9", "chosen": msgs("q9", "yes"), "rejected": [
        {"role": "assistant", "content": "no"}]})
    task = load_task(write(tmp_path / "p.jsonl", rows), test_fraction=0.4)
    assert {"prompt": msgs("q0"), "chosen": [msgs("", "yes")[1]],
            "rejected": [msgs("", "no")[1]]} in task.train + task.test
    assert {"prompt": msgs("q9"), "chosen": [msgs("", "yes")[1]],
            "rejected": [msgs("", "no")[1]]} in task.train + task.test


def test_the_columns_used_are_stated(tmp_path) -> None:
    task = load_task(write(tmp_path / "r.jsonl", LAYOUTS[-1][1]), test_fraction=0.5)
    assert task.format_note == (f"format: reference (reference; columns: question as prompt, "
                                f"answer as reference) in {tmp_path / 'r.jsonl'}")


def test_format_overrides_and_ambiguity(tmp_path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2, "prompt": f"q{i}", "completion": "a"} for i in range(6)]
    path = write(tmp_path / "both.jsonl", rows)
    with pytest.raises(ConfigError, match=r"ambiguous layout, it fits text-label .* "
                                          r"prompt-completion .*choose one with --format NAME"):
        load_task(path)
    assert load_task(path, format="prompt-completion", test_fraction=0.5).kind == "instruction"
    assert load_task(path, format="text-label", test_fraction=0.5).kind == "classification"
    with pytest.raises(ConfigError, match=r"not in --format messages layout: it needs columns "
                                          r"'messages' \(its columns: text, label, prompt"):
        load_task(path, format="messages")
    with pytest.raises(ConfigError, match=r"--format 'sharegtp' .*did you mean 'sharegpt'"):
        load_task(path, format="sharegtp")


def test_an_unknown_layout_lists_the_accepted_ones(tmp_path) -> None:
    path = write(tmp_path / "odd.jsonl", [{"body": "x", "target": 1}] * 3)
    with pytest.raises(ConfigError) as err:
        load_task(path)
    message = str(err.value)
    assert "its columns: body, target" in message and accepted() in message
    assert all(name in message for name in FORMATS)


BAD_CHATS = [  # (row, reason the error must give)
    ({"messages": [{"content": "hi"}, {"role": A, "content": "yo"}]}, "message 1 has no 'role'"),
    ({"messages": msgs("hi", "")}, "message 2 (assistant): empty 'content'"),
    ({"messages": [{"role": U, "content": ["hi"]}, {"role": A, "content": "yo"}]},
     "message 1 (user): 'content' is list, not text"),
    ({"messages": msgs("hi")}, "no assistant turn"),
    ({"messages": [*msgs("hi", "yo"), {"role": "system", "content": "x"}]},
     "a system message after the first turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "message 1 has 'role' = 'robot', not one of"),
    ({"messages": "hello"}, "'messages' is str, not a list of messages"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
]


@pytest.mark.parametrize("bad,reason", BAD_CHATS, ids=[b[1][:30] for b in BAD_CHATS])
def test_a_malformed_row_is_named_by_line(tmp_path, bad, reason) -> None:
    good = [{"messages": msgs(f"hi {i}", "hello")} if "messages" in bad else
            {"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    path = write(tmp_path / "c.jsonl", [*good[:2], bad, good[2]])
    with pytest.raises(ConfigError, match=re.escape(f"c.jsonl line 3: {reason}")):
        load_task(path)
    task = load_task(path, bad_rows="skip", test_fraction=0.34)
    assert len(task.train) + len(task.test) == 3
    assert any(n.startswith("skipped 1 malformed row(s) of 4 in ") and f"line 3: {reason}" in n
               for n in task.notes)


def test_many_malformed_rows_are_counted(tmp_path) -> None:
    rows = [{"messages": msgs("hi", "")}] * 7 + [{"messages": msgs("hi", "yo")}] * 3
    path = write(tmp_path / "m.jsonl", rows)
    with pytest.raises(ConfigError, match=r"m\.jsonl: 7 of 10 rows are malformed: line 1: .*; "
                                          r"and 2 more; fix them, or --bad-rows skip trains on "
                                          r"the other 3"):
        load_task(path)


def test_csv_cells_holding_json_messages_and_parquet(tmp_path) -> None:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": msgs(f"hi {i}", "hello")} for i in range(4)]
    with (tmp_path / "c.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerows([[json.dumps(r["messages"])] for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("c.csv", "c.parquet"):
        task = load_task(str(tmp_path / name), test_fraction=0.25)
        assert task.format == "messages" and sorted(
            e["messages"][0]["content"] for e in task.train + task.test) == [
            f"hi {i}" for i in range(4)]


def test_saved_datasets_and_their_test_split(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": f"q{i}"},
                                                           {"from": "gpt", "value": "a"}]}
                                        for i in range(5)])
    test = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "t"},
                                                          {"from": "gpt", "value": "a"}]}])
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "dd"))
    task = load_task(str(tmp_path / "dd"))
    assert (task.format, len(task.train), len(task.test)) == ("sharegpt", 5, 1)
    assert any("the dataset's test split" in n for n in task.notes)
    with pytest.raises(ConfigError, match=r"has no split 'dev' \(its splits: train, test\); "
                                          r"choose one with --data-split"):
        load_task(str(tmp_path / "dd"), split="dev")
    train.save_to_disk(str(tmp_path / "one"))
    assert len(load_task(str(tmp_path / "one"), test_fraction=0.2).test) == 1


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_a_hub_id_offline_and_uncached_is_one_clear_error(monkeypatch, offline) -> None:
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    from petkit.models import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match=r"dataset 'org/nowhere-x' is not in the local Hugging "
                                          r"Face cache and the hub cannot be reached .*give a "
                                          r"local file .*save_to_disk, or an embedded task"):
        load_task("org/nowhere-x")


def test_data_spec_checks_the_new_fields() -> None:
    for field, value in (("format", "chatml"), ("train_on", "user"), ("bad_rows", "drop")):
        with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} \\(data.{field}\\) "
                                              f"must be one of"):
            DataSpec(**{field: value})


def test_cli_malformed_chat_is_one_line(tmp_path, capsys) -> None:
    path = write(tmp_path / "chat.jsonl", [{"messages": msgs("hi", "yo")}] * 3
                 + [{"messages": msgs("hi", "")}])
    code = main(["train", "--data", path, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "chat.jsonl line 4: message 2 (assistant): empty 'content'" in err


@pytest.mark.slow
def test_cli_trains_on_a_chat_file_and_states_format_and_cuts(tmp_path, capsys) -> None:
    long = " ".join(["word"] * 80)
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          *msgs(f"question {i}?", f"answer {i}.", "and more?", long)]}
            for i in range(10)]
    path = write(tmp_path / "chat.jsonl", rows)
    code = main(["train", "--data", path, "--steps", "1", "--batch-size", "2", "--max-length",
                 "64", "--test-size", "2", "--output", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1] == f"format: messages (chat; columns: messages) in {path}"
    assert "train: 8 of 8 conversations longer than --max-length 64 were cut (8 at a turn " \
           "boundary, 0 inside their first answer)" in out


def test_the_docs_examples_are_recognised(tmp_path) -> None:
    """docs/data.md: each format's heading, then its example file, which must be read as it."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    found = re.findall(r"^### ([\w-]+).*?\n```(jsonl|csv)\n(.*?)^```", page, re.S | re.M)
    assert sorted(name for name, _, _ in found) == sorted(FORMATS)
    for name, suffix, body in found:
        assert len(body.strip().splitlines()) == 3, name
        path = tmp_path / f"{name}.{suffix}"
        path.write_text(body, encoding="utf-8")
        rows = len(body.strip().splitlines()) - (suffix == "csv")
        task = load_task(str(path), test_fraction=0.4 if rows > 2 else 0.5)
        assert task.format == name and len(task.train) + len(task.test) == rows


def test_a_text_answer_starting_with_a_bracket_stays_text(tmp_path) -> None:
    rows = [{"prompt": f"Song {i}:", "chosen": "[Verse 1] la la", "rejected": "no"} for i in range(3)]
    task = load_task(write(tmp_path / "s.jsonl", rows), test_fraction=0.34)
    assert all(r["chosen"] == "[Verse 1] la la" for r in task.train + task.test)
