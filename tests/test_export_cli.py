"""`petkit merge / export / predict` end to end through the CLI, on tiny random bases saved as
local folders (MiniLM's tokenizer, 2-layer BERT and Llama): head, verbaliser and instruction runs
trained by `petkit train`, then merged, exported and asked for predictions; a lone adapter copied
out of its run folder; refusals that must come before any model loads."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import petkit.app.pipeline as pipeline
from petkit.app.adapter_base import recipe_for_adapter
from petkit.cli import main
from petkit.core.vllm_format import folder_problems
from petkit.models.embedded import embedded_model_dir
from test_first_hour import write_csv

HAPPY = ["love this", "great day", "so happy", "wonderful news"]
SAD = ["hate this", "awful day", "so sad", "terrible news"]
SHORT = ["--steps", "2", "--batch-size", "4", "--max-length", "24", "--train.progress=false"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def tweets(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"tweet": f"{(HAPPY if i % 2 else SAD)[i % 4]} {i}", "mood": "happy" if i % 2 else "sad"}
            for i in range(start, start + n)]


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases (local folders) and three trained runs: head, verbaliser, instruction."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("export-cli")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir("minilm-l6"))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": len(tok), "pad_token_id": 0}
    torch.manual_seed(0)
    for name, model in (("bert", BertModel(BertConfig(**small))),
                        ("llama", LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **small)))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    train = write_csv(root / "train.csv", tweets(16))
    test = write_csv(root / "test.csv", tweets(8, 100))
    qa = write_csv(root / "qa.csv", [{"question": f"what is {i}", "answer": f"it is {i}"}
                                     for i in range(12)])
    data = ["--data", train, "--test-file", test, "--text-column", "tweet", "--label-column", "mood"]
    runs = {"head": ["--model", root / "bert", *data],
            "verbaliser": ["--model", root / "llama", *data],
            "instruction": ["--model", root / "llama", "--data", qa, "--prompt-column", "question",
                            "--completion-column", "answer"]}
    for name, args in runs.items():
        assert main([str(a) for a in ["train", *args, *SHORT, "--output", root / name]]) == 0
    return {"root": root, "test": test, "qa": qa, **{k: root / k / "adapter" for k in runs}}


def with_adapter(adapter: Path) -> pipeline.Prepared:
    prep = pipeline.load_with_adapter(recipe_for_adapter(adapter), adapter, with_data=False)
    prep.model.eval()
    return prep


IDS = torch.tensor([[101, 2293, 2023, 102]])  # [CLS] love this [SEP]


def test_adapter_json_names_its_base_and_task(work: dict[str, Path]) -> None:
    meta = json.loads((work["verbaliser"] / "adapter.json").read_text())
    assert meta["base_model"] == str(work["root"] / "llama")
    assert meta["task"]["type"] == "verbaliser" and meta["task"]["labels"] == ["happy", "sad"]
    assert meta["task"]["label_words"] == [" happy", " sad"] and meta["task"]["input_column"] == "tweet"
    head = json.loads((work["head"] / "adapter.json").read_text())["task"]
    assert head["type"] == "head" and "label_words" not in head


def test_merge_head_carries_labels_and_only_the_bases_files(work: dict[str, Path], capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    out = work["root"] / "merged-head"
    code, text, err = cli(["merge", "--adapter", work["head"], "--output", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert plain.config.id2label == {0: "happy", 1: "sad"}
    assert plain.config.label2id == {"happy": 0, "sad": 1}
    with torch.no_grad():
        expected = with_adapter(work["head"]).model(input_ids=IDS).logits
        torch.testing.assert_close(plain(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "task type: head" in card and "`happy`, `sad`" in card and str(work["root"] / "bert") in card


def test_merge_refuses_a_full_folder_before_loading_and_overwrite_replaces_it(
        work: dict[str, Path], capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    out = work["root"] / "occupied"
    out.mkdir()
    (out / "chat_template.jinja").write_text("{{ old model }}")

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "load_base", no_load)
        code, _, err = cli(["merge", "--adapter", work["verbaliser"], "--output", out], capsys)
        assert code == 2 and "already holds files (chat_template.jinja)" in err and "--overwrite" in err
        code, _, err = cli(["export", "--adapter", work["verbaliser"], "--output", out], capsys)
        assert code == 2 and "already holds files" in err
    assert (out / "chat_template.jinja").read_text() == "{{ old model }}"
    code, _, err = cli(["merge", "--adapter", work["verbaliser"], "--output", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "chat_template.jinja").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".occupied")]  # no temp left


def test_merge_verbaliser_card_gives_prompt_format_and_label_words(work, capsys) -> None:
    from transformers import AutoModelForCausalLM

    out = work["root"] / "merged-verbaliser"
    assert cli(["merge", "--adapter", work["verbaliser"], "--output", out], capsys)[0] == 0
    with torch.no_grad():
        expected = with_adapter(work["verbaliser"]).model(input_ids=IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "task type: verbaliser" in card and '`"{text}"`' in card
    assert '`happy` -> `" happy"`' in card and '`sad` -> `" sad"`' in card


def test_export_peft_names_the_base_and_loads_in_peft(work: dict[str, Path], capsys) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = work["root"] / "peft"
    code, text, err = cli(["export", "--adapter", work["verbaliser"], "--format", "peft",
                           "--output", out], capsys)
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work["root"] / "llama")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, out).eval()(input_ids=IDS).logits
        ours = with_adapter(work["verbaliser"]).model(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_export_vllm_passes_its_rules_and_prints_the_serve_command(work, capsys) -> None:
    out = work["root"] / "vllm"
    code, text, err = cli(["export", "--adapter", work["verbaliser"], "--format", "vllm",
                           "--output", out], capsys)
    assert code == 0, err
    assert folder_problems(out) == []
    assert "--enable-lora --max-lora-rank 8 --lora-modules adapter=" in text
    assert "vllm serve" in (out / "README.md").read_text()


def test_export_vllm_refuses_a_head_naming_why_and_merge(work, capsys, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "load_base", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = cli(["export", "--adapter", work["head"], "--format", "vllm", "--output",
                        work["root"] / "nope"], capsys)
    assert code == 2 and "vLLM cannot serve" in err and "modules_to_save" in err
    assert "petkit merge --adapter" in err and not (work["root"] / "nope").exists()


@pytest.mark.parametrize("run", ["head", "verbaliser"])
def test_predict_classification_agrees_with_eval(work: dict[str, Path], run: str, capsys) -> None:
    preds = work["root"] / f"preds-{run}.csv"
    code, text, err = cli(["predict", "--adapter", work[run], "--data", work["test"], "--output",
                           preds], capsys)
    assert code == 0, err
    assert f"8 predictions ({run}: " in text
    rows = read_csv(preds)
    assert list(rows[0]) == ["tweet", "mood", "prediction", "score_happy", "score_sad"]
    assert [r["tweet"] for r in rows] == [r["tweet"] for r in read_csv(work["test"])]
    for row in rows:
        assert abs(float(row["score_happy"]) + float(row["score_sad"]) - 1) < 1e-4
        assert row["prediction"] == max(("happy", "sad"), key=lambda k: float(row[f"score_{k}"]))
    accuracy = sum(r["prediction"] == r["mood"] for r in rows) / len(rows)
    code, text, _ = cli(["eval", "--adapter", work[run], "--data", work["test"]], capsys)
    assert code == 0 and f"accuracy={accuracy:.4f}" in text


def test_predict_instruction_generates_completions(work: dict[str, Path], capsys) -> None:
    preds = work["root"] / "preds-qa.jsonl"
    code, text, err = cli(["predict", "--adapter", work["instruction"], "--data", work["qa"],
                           "--output", preds, "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"question", "answer", "completion"}
    prep = with_adapter(work["instruction"])
    ids = prep.tokenizer("Question: what is 0\nAnswer:", add_special_tokens=False,
                         return_tensors="pt").input_ids
    out = prep.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=prep.pad_id)
    assert rows[0]["completion"] == prep.tokenizer.decode(out[0, ids.shape[1]:],
                                                          skip_special_tokens=True).strip()


def test_predict_refusals_come_before_the_model(work: dict[str, Path], capsys, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "load_base", lambda *a, **k: pytest.fail("loaded a model"))
    bad = write_csv(work["root"] / "bad.csv", [{"body": "hello", "id": "1"}])
    code, _, err = cli(["predict", "--adapter", work["head"], "--data", bad, "--output",
                        work["root"] / "x.csv"], capsys)
    assert code == 2 and "has no column 'tweet', the one this run read (its columns: body, id); " \
        "rename it or pass --text-column" in err
    taken = work["root"] / "taken.csv"
    taken.write_text("keep")
    code, _, err = cli(["predict", "--adapter", work["head"], "--data", work["test"], "--output",
                        taken], capsys)
    assert code == 2 and "exists" in err and taken.read_text() == "keep"
    code, _, err = cli(["predict", "--adapter", work["head"], "--data", bad, "--text-column", "text",
                        "--output", work["root"] / "x.csv"], capsys)
    assert code == 2 and "has no column 'text' (its columns: body, id)" in err


def test_predict_reads_another_column_when_told(work: dict[str, Path], capsys) -> None:
    renamed = write_csv(work["root"] / "renamed.csv", [{"body": r["tweet"]} for r in tweets(8, 100)])
    preds = work["root"] / "renamed-preds.csv"
    code, _, err = cli(["predict", "--adapter", work["head"], "--data", renamed, "--text-column",
                        "body", "--output", preds], capsys)
    assert code == 0, err
    assert [r["prediction"] for r in read_csv(preds)] == \
        [r["prediction"] for r in read_csv(work["root"] / "preds-head.csv")]


def test_a_lone_adapter_finds_its_base_and_task(work: dict[str, Path], capsys) -> None:
    lone = work["root"] / "elsewhere" / "head-adapter"
    shutil.copytree(work["head"], lone)
    preds = work["root"] / "lone.csv"
    code, text, err = cli(["predict", "--adapter", lone, "--data", work["test"], "--output", preds],
                          capsys)
    assert code == 0, err
    assert read_csv(preds) == read_csv(work["root"] / "preds-head.csv")
    code, text, err = cli(["eval", "--adapter", lone], capsys)  # the run's own test file
    assert code == 0 and "test on 8 examples (head)" in text, err
    # An older adapter (no base record): merge asks for --model, then infers the head itself.
    meta = json.loads((lone / "adapter.json").read_text())
    del meta["base_model"], meta["task"]
    (lone / "adapter.json").write_text(json.dumps(meta))
    code, _, err = cli(["merge", "--adapter", lone, "--output", work["root"] / "old"], capsys)
    assert code == 2 and "pass --model NAME" in err
    code, _, err = cli(["merge", "--adapter", lone, "--output", work["root"] / "old", "--model",
                        work["root"] / "bert"], capsys)
    assert code == 0, err
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(work["root"] / "old").num_labels == 2


@pytest.mark.slow
def test_the_model_cards_snippet_runs_in_a_clean_interpreter(work: dict[str, Path], capsys) -> None:
    out = work["root"] / "merged-card"
    assert cli(["merge", "--adapter", work["head"], "--output", out], capsys)[0] == 0
    code = (out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = re.search(r"\{.*\}", done.stdout).group(0)
    assert set(eval(printed)) == {"happy", "sad"}  # noqa: S307 - a dict the snippet printed


def test_an_older_run_folder_reads_label_words_from_its_task(work: dict[str, Path], capsys) -> None:
    """An adapter from before adapter.json named its task, inside its run folder: the card and
    the predictions take the template and label words from the run's task."""
    old = work["root"] / "older-run"
    shutil.copytree(work["root"] / "verbaliser", old)
    meta = json.loads((old / "adapter" / "adapter.json").read_text())
    del meta["base_model"], meta["task"]
    (old / "adapter" / "adapter.json").write_text(json.dumps(meta))
    assert cli(["merge", "--adapter", old / "adapter", "--output", old / "merged"], capsys)[0] == 0
    assert '`happy` -> `" happy"`' in (old / "merged" / "README.md").read_text()
    preds = old / "preds.csv"
    code, _, err = cli(["predict", "--adapter", old / "adapter", "--data", work["test"], "--output",
                        preds], capsys)
    assert code == 0, err
    assert read_csv(preds) == read_csv(work["root"] / "preds-verbaliser.csv")
