"""`petkit` CLI end to end on the embedded SmolLM2-135M with a very short run, plus usage errors.

One short training run (module fixture) feeds the eval, merge and inspect tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import petkit as pk
from petkit.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHORT = ["--steps", "3", "--train-size", "32", "--test-size", "16", "--max-length", "48",
         "--batch-size", "4"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of `petkit train` with a 3-step run."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SHORT, "--output", str(out), "--train.progress=false"]) == 0
    return out


@pytest.mark.slow
def test_train_writes_adapter_logs_and_recipe(trained: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    adapter = trained / "adapter"
    assert (adapter / "adapter.safetensors").is_file() and (adapter / "adapter.json").is_file()
    assert json.loads((adapter / "adapter.json").read_text())["method"] == "lora"
    for name in ("metrics.jsonl", "train.log", "training.png", "recipe.yaml"):
        assert (trained / name).is_file(), name
    assert "task_type: verbaliser" in (trained / "recipe.yaml").read_text()


@pytest.mark.slow
def test_eval_inspect_on_the_trained_adapter(trained: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["eval", "--adapter", str(trained / "adapter")], capsys)
    assert code == 0 and "accuracy=" in out and "16 examples" in out
    code, out, _ = run_cli(["inspect", "--adapter", str(trained / "adapter")], capsys)
    assert code == 0 and "q_proj" in out and "trainable" in out


@pytest.mark.slow
def test_merge_writes_a_plain_transformers_model(trained: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    merged = tmp_path / "merged"
    code, out, _ = run_cli(["merge", "--adapter", str(trained / "adapter"), "--output",
                            str(merged)], capsys)
    assert code == 0 and (merged / "config.json").is_file()
    # Loaded in a clean interpreter, the merged model equals base + adapter through petkit.
    script = ("import sys, torch, transformers as t; m = t.AutoModelForCausalLM.from_pretrained("
              "sys.argv[1]); ids = torch.tensor([[1, 2, 3, 4]]); "
              "torch.save(m(input_ids=ids).logits, sys.argv[2])")
    logits_file = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(merged), str(logits_file)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    from petkit.models import load_model

    model, _ = load_model("smollm2-135m")
    pk.load_adapter(model, str(trained / "adapter"))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    # fp32 rounding of W + BA vs W x + B A x through 30 layers: ~4e-4 on logits of ~30.
    torch.testing.assert_close(torch.load(logits_file, weights_only=True), expected,
                               atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_inspect_with_a_method_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["inspect", "--method", "lora", "--method.r=2",
                            "--method.targets=[q_proj]"], capsys)
    assert code == 0 and "q_proj" in out and "v_proj" not in out


def test_methods_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for name, family, _ in pk.list_methods():
        assert name in out and family in out


@pytest.mark.parametrize("args,needle", [
    (["train", "--bogus"], "--bogus"),
    (["train", "--train.learning_rate=1"], "learning_rate"),
    (["train", "--lr", "-3"], "lr"),
    (["train", "--steps", "0"], "--steps must be"),  # the flag, not TrainConfig.max_steps
    (["train", "--method", "nope"], "nope"),
    (["train", "--task-type", "regression"], "--task-type must be"),
    (["train", "--recipe", "missing.yaml"], "missing.yaml"),
    (["train", "--method.r"], "needs a value"),
    (["eval"], "--adapter"),
    (["eval", "--adapter", "/nonexistent"], "not an adapter folder"),
    (["frobnicate"], "frobnicate"),
    ([], "command"),
])
def test_user_mistakes_are_one_red_line_and_exit_2(args: list[str], needle: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_entry_point_in_a_subprocess() -> None:
    done = subprocess.run([sys.executable, "-m", "petkit.cli", "train", "--steps", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--steps" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("argv,lr", [
    (["train"], 1e-3),                                             # the default recipe's LoRA rate
    (["train", "--method", "prefix"], 1e-2),                       # switched: the method's suggested rate
    (["train", "--method", "prompt", "--lr", "5e-3"], 5e-3),       # a given rate wins
    (["train", "--method", "prompt", "--train.lr=2e-3"], 2e-3),
    (["train", "--method", "dora"], 1e-3),                         # no suggestion: the recipe's
    (["train", "--recipe", "minilm-bbc", "--method", "ia3"], 1e-2),
])
def test_switching_method_takes_its_suggested_learning_rate(argv: list[str], lr: float) -> None:
    from petkit.cli import _recipe, _split_dotted, build_parser

    args, extra = build_parser().parse_known_args(argv)
    assert _recipe(args, _split_dotted(extra)).train.lr == pytest.approx(lr)


def test_embedded_lists_the_defaults_first_and_marks_them(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from petkit.app.recipe import DataSpec, ModelSpec

    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(["embedded"], capsys)
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert code == 0 and len(rows) > 4
    assert set(rows[:2]) == {f"{DataSpec().name} (default)", f"{ModelSpec().name} (default)"}
    assert not any("(default)" in r for r in rows[2:])
