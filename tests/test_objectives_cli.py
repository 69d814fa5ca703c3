"""Objectives from the command line, end to end on a tiny random Llama with the embedded model's
tokenizer: the dpo/grpo recipes and the other preference objectives run, write pair accuracy or
the metric before/after, the per-step traces and the sample table; user mistakes (wrong data for
the objective, a gradient-free stepper for GRPO, a reward that raises) are one red line."""
from __future__ import annotations

import csv
import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from petkit.cli import main
from petkit.training.objectives_config import ObjectiveConfig

SMALL = ["--train-size", "8", "--test-size", "4", "--steps", "2", "--max-length", "48",
         "--max-new-tokens", "3", "--train.progress=false", "--overwrite"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer (the embedded recipes' data encodes)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from petkit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def log_rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "kto"])
def test_preference_recipe_reports_pair_accuracy_traces_and_samples(
        objective: str, tiny_llama: str, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / objective
    code, out, err = run(["train", "--recipe", "dpo", "--model", tiny_llama, "--objective",
                          objective, "--output", str(out_dir), "--batch-size", "2",
                          "--train.log_every=1", *SMALL], capsys)
    assert code == 0, err
    assert "test before: pair_accuracy=" in out and "test after:  pair_accuracy=" in out
    rows = [r for r in log_rows(out_dir) if "margin" in r]
    assert len(rows) == 2 and {"pair_accuracy", "chosen", "rejected"} <= set(rows[0])
    with open(out_dir / "samples.csv", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and table[0]["prompt"].startswith("Write a")
    assert (out_dir / "training.png").is_file() and (out_dir / "adapter").is_dir()
    assert png_height(out_dir / "training.png") == 700  # the loss panel and the traces panel


def test_switching_the_objective_takes_its_own_beta(tiny_llama: str, tmp_path: Path,
                                                    capsys) -> None:
    """`--recipe dpo --objective simpo` scores with SimPO's beta 2.0, not the recipe's 0.1:
    step 1's margin (same batch, same initial weights) is 20x that of `--beta 0.1`."""
    first = {}
    for beta in (None, "0.1"):
        out_dir = tmp_path / f"simpo-{beta}"
        flags = ["--beta", beta] if beta else []
        code, out, err = run(["train", "--recipe", "dpo", "--model", tiny_llama, "--objective",
                              "simpo", *flags, "--output", str(out_dir), "--batch-size", "2",
                              "--train.log_every=1", *SMALL], capsys)
        assert code == 0, err
        assert ("beta 2: simpo's default, not the recipe's 0.1" in out) == (beta is None)
        first[beta] = [r for r in log_rows(out_dir) if "margin" in r][0]["margin"]
    assert abs(first["0.1"]) > 1e-4
    assert first[None] == pytest.approx(20 * first["0.1"], rel=1e-3)


def documented_beta(objective: str) -> float:
    """The `--beta` default that docs/objectives.md's objectives table gives `objective`."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "objectives.md"
    row = next(line for line in docs.read_text().splitlines()
               if line.startswith(f"| `{objective}` |"))
    return float(re.search(r"`--beta` \(([0-9.]+)", row).group(1))


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_plain_dpo_and_ipo_take_their_documented_beta(objective: str, tiny_llama: str,
                                                      tmp_path: Path, capsys) -> None:
    """`--recipe dpo --objective dpo|ipo` trains with the objective's own default beta, the one
    docs/objectives.md documents (DPO's 0.5 chosen on the validation movies; IPO's 0.1), says so
    in its first lines when it is not the recipe's 0.1, and the loss reads it: DPO's logged margin
    is beta x (chosen - rejected) log-ratios at step 2; IPO's step-1 loss (policy = reference,
    h = 0) is (1 / (2 beta))^2. `--beta 0.1` replaces it."""
    default = ObjectiveConfig(objective).effective_beta
    assert default == documented_beta(objective)
    for beta in (None, 0.1):
        out_dir = tmp_path / f"{objective}-{beta}"
        flags = ["--beta", str(beta)] if beta else []
        code, out, err = run(["train", "--recipe", "dpo", "--model", tiny_llama, "--objective",
                              objective, *flags, "--output", str(out_dir), "--batch-size", "2",
                              "--train.log_every=1", *SMALL], capsys)
        assert code == 0, err
        note = f"beta {default:g}: {objective}'s default, not the recipe's 0.1 for rpo"
        assert (note in out) == (beta is None and default != 0.1)
        want = beta or default
        first, second = [r for r in log_rows(out_dir) if "margin" in r]
        if objective == "ipo":
            assert first["train_loss"] == pytest.approx((1 / (2 * want)) ** 2, rel=1e-4)
        else:
            assert abs(second["chosen"] - second["rejected"]) > 1e-4
            assert second["margin"] == pytest.approx(
                want * (second["chosen"] - second["rejected"]), rel=1e-4)


def test_orpo_weighs_its_odds_ratio_by_its_default_lambda_unless_the_flag_sets_one(
        tiny_llama: str, tmp_path: Path, capsys) -> None:
    """ORPO's step-1 loss is the chosen NLL - lambda log sigmoid(log odds ratio), linear in
    lambda on the same batch and weights: with no flag it is the default lambda's (2.0, chosen in
    docs/objectives.md), `--train.objective.orpo_lambda` replaces it."""
    assert ObjectiveConfig("orpo").orpo_lambda == 2.0
    first = {}
    for value in (None, "0", "0.25"):
        out_dir = tmp_path / f"orpo-{value}"
        flags = [f"--train.objective.orpo_lambda={value}"] if value else []
        code, out, err = run(["train", "--recipe", "dpo", "--model", tiny_llama, "--objective",
                              "orpo", *flags, "--output", str(out_dir), "--batch-size", "2",
                              "--train.log_every=1", *SMALL], capsys)
        assert code == 0, err
        first[value] = [r for r in log_rows(out_dir) if "margin" in r][0]["train_loss"]
    odds_term = first["0.25"] - first["0"]  # 0.25 x -log sigmoid(ratio) > 0
    assert odds_term > 1e-4
    default = ObjectiveConfig("orpo").orpo_lambda
    assert first[None] - first["0"] == pytest.approx(default / 0.25 * odds_term, rel=1e-3)


def test_the_dpo_recipe_adds_rpos_nll_and_objective_dpo_is_plain_dpo(
        tiny_llama: str, tmp_path: Path, capsys) -> None:
    """Step 1 (LoRA B = 0: policy = reference, margin 0): plain DPO's loss is log 2; the recipe's
    default adds the chosen answers' NLL per token (a random model's: several nats)."""
    first = {}
    for flags in ([], ["--objective", "dpo"]):
        out_dir = tmp_path / ("-".join(flags) or "recipe")
        code, out, err = run(["train", "--recipe", "dpo", "--model", tiny_llama, *flags,
                              "--output", str(out_dir), "--batch-size", "2",
                              "--train.log_every=1", *SMALL], capsys)
        assert code == 0, err
        first[tuple(flags)] = [r for r in log_rows(out_dir) if "margin" in r][0]
    assert first[("--objective", "dpo")]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first[()]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert first[()]["train_loss"] > math.log(2) + 3.0


def png_height(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[1]


def test_the_plot_draws_each_trace_the_log_has(tmp_path: Path) -> None:
    from petkit.training.monitor import plot_history, traced

    history = [{"step": s, "train_loss": 1.0 / s, "reward_mean": 0.1 * s, "kl": 0.01}
               for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 0.5}]
    assert traced(history) == {"reward_mean": [(1, 0.1), (2, 0.2), (3, 0.30000000000000004)],
                               "kl": [(1, 0.01), (2, 0.01), (3, 0.01)]}
    assert png_height(plot_history(history, tmp_path / "a.png", "loss")) == 700
    plain = [{"step": s, "train_loss": 1.0} for s in (1, 2)]
    assert traced(plain) == {} and png_height(plot_history(plain, tmp_path / "b.png", "loss")) == 400


@pytest.fixture
def reward_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "cli_rewards.py").write_text(textwrap.dedent("""
        def short(prompts, completions, rows):
            return [1.0 / (1 + len(c)) for c in completions]
        def nan(prompts, completions, rows):
            return [float("nan")] + [0.0] * (len(completions) - 1)
        def one(prompts, completions, rows):
            return [0.0]
        def picky(prompts, completions, rows):
            for row in rows:
                if row["prompt"] == "What is 2+2?":
                    raise KeyError("no rule for this prompt")
            return [0.0] * len(completions)
    """))
    monkeypatch.chdir(tmp_path)
    yield "cli_rewards"
    sys.modules.pop("cli_rewards", None)


def test_grpo_recipe_with_weighted_rewards(tiny_llama: str, tmp_path: Path, reward_file: str,
                                           capsys) -> None:
    out_dir = tmp_path / "grpo"
    code, out, err = run(["train", "--recipe", "grpo", "--model", tiny_llama, "--output",
                          str(out_dir), "--group-size", "2", "--batch-size", "2",
                          "--reward", "petkit.data.rewards:exact_number",
                          "--reward", f"{reward_file}:short=0.5", "--train.log_every=1", *SMALL],
                         capsys)
    assert code == 0, err
    assert f"{reward_file}:short=0.5: importing {reward_file} from" in out
    assert "test before: exact_number=" in out and "test after:  exact_number=" in out
    rows = [r for r in log_rows(out_dir) if "reward_mean" in r]
    assert len(rows) == 2 and rows[0]["reward_mean"] > 0  # the length reward is never 0
    assert {"reward_std", "kl"} <= set(rows[0])
    assert png_height(out_dir / "training.png") == 700
    saved = (out_dir / "recipe.yaml").read_text()
    assert "cli_rewards:short=0.5" in saved and "name: grpo" in saved
    assert (out_dir / "samples.md").read_text().startswith("| prompt | reference | before |")


def test_sft_on_the_same_reference_data_is_the_baseline(tiny_llama: str, tmp_path: Path,
                                                       capsys) -> None:
    code, out, err = run(["train", "--recipe", "grpo", "--model", tiny_llama, "--objective",
                          "sft", "--output", str(tmp_path / "sft"), *SMALL], capsys)
    assert code == 0, err
    assert "sft on reference data" in out and "test after:  exact_number=" in out


@pytest.mark.parametrize("reward, needle", [
    ("picky", "picky raised KeyError: 'no rule for this prompt' on data row"),
    ("nan", "nan returned nan for data row"),
    ("one", "one returned 1 values for 8 completions"),
])
def test_a_bad_reward_names_the_row_of_the_users_file(reward: str, needle: str, tiny_llama: str,
                                                      tmp_path: Path, reward_file: str,
                                                      capsys) -> None:
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}+2?", "reference": str(a + 2)})
                            + "\n" for a in (2, 3, 4, 5, 6)))
    code, out, err = run(["train", "--model", tiny_llama, "--data", str(data), "--objective",
                          "grpo", "--reward", f"{reward_file}:{reward}", "--output",
                          str(tmp_path / "run"), "--group-size", "2", "--batch-size", "4",
                          "--test-size", "1", "--steps", "1", "--max-new-tokens", "2",
                          "--train.progress=false", "--overwrite"], capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, needle", [
    (["--recipe", "grpo", "--objective", "dpo"], "--objective dpo needs preference data"),
    (["--recipe", "dpo", "--objective", "grpo"], "--objective grpo needs reference data"),
    (["--recipe", "grpo", "--optimizer", "mezo"], "--objective grpo needs a gradient stepper"),
    (["--recipe", "dpo", "--objective", "dpoo"], "did you mean 'dpo'"),
    (["--recipe", "grpo", "--reward", "nowhere_here:f"], "no module 'nowhere_here'"),
    (["--recipe", "meet", "--objective", "grpo"],
     "--train.objective.control_tokens (MEET's control tokens) needs a preference objective"),
    (["--recipe", "meet", "--train.objective.control_tokens=-1"],
     "--train.objective.control_tokens must be an int >= 0, got -1"),
    (["--recipe", "meet", "--train.max_steps=1"], "give --steps >= 2 (got 1)"),
])
def test_objective_mistakes_are_one_red_line(args: list[str], needle: str, tiny_llama: str,
                                             tmp_path: Path, capsys) -> None:
    code, out, err = run(["train", "--model", tiny_llama, "--output", str(tmp_path / "x"),
                          *args, *SMALL], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_users_preference_file_and_sft_on_its_chosen_side(tiny_llama: str, tmp_path: Path,
                                                          capsys) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": f" {w}",
                                        "rejected": f" not {w}"}) + "\n"
                            for w in ("yes", "no", "maybe", "sure", "fine", "ok")))
    for objective in ("ipo", "sft"):
        out_dir = tmp_path / objective
        code, out, err = run(["train", "--model", tiny_llama, "--data", str(data),
                              "--objective", objective, "--output", str(out_dir), "--steps", "1",
                              "--batch-size", "2", "--max-new-tokens", "2",
                              "--train.progress=false"], capsys)
        assert code == 0, err
        assert f"{objective} on preference data" in out and "test after:  pair_accuracy=" in out
        assert (out_dir / "samples.md").is_file()


def test_meet_recipe_learns_control_tokens_then_the_lora_with_them_fixed(
        tiny_llama: str, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "meet"
    code, out, err = run(["train", "--recipe", "meet", "--model", tiny_llama, "--output",
                          str(out_dir), "--batch-size", "2", "--train.log_every=1", *SMALL,
                          "--steps", "4"], capsys)
    assert code == 0, err
    assert "MEET step 1: 8 control tokens (prompt tuning), 2 steps, lr 0.03" in out
    assert "MEET step 2: lora with the control tokens fixed, 2 steps" in out
    assert "test after:  pair_accuracy=" in out
    control = json.loads((out_dir / "adapter" / "control" / "adapter.json").read_text())
    lora = json.loads((out_dir / "adapter" / "meet" / "adapter.json").read_text())
    assert control["method"] == "prompt" and lora["method"] == "lora"
    for folder in (out_dir / "step1", out_dir):  # each step's own DPO trace
        rows = [r for r in log_rows(folder) if "margin" in r]
        assert len(rows) == 2 and {"pair_accuracy", "chosen", "rejected"} <= set(rows[0])


def after_line(out: str) -> str:
    return next(x for x in out.splitlines() if x.startswith("test after:")).split()[-1]


def test_eval_scores_objective_adapters_as_training_did(tiny_llama: str, tmp_path: Path,
                                                        capsys) -> None:
    for recipe, objective in (("dpo", "rpo"), ("meet", "dpo")):  # meet: control tokens + LoRA
        out_dir = tmp_path / recipe
        code, out, err = run(["train", "--recipe", recipe, "--model", tiny_llama, "--output",
                              str(out_dir), "--batch-size", "2", *SMALL], capsys)
        assert code == 0, err
        code, evaluated, err = run(["eval", "--adapter", str(out_dir / "adapter")], capsys)
        assert code == 0, err
        assert evaluated.splitlines()[-1] == f"test on 4 examples ({objective}): {after_line(out)}"


def test_eval_takes_the_data_flags_of_train(tiny_llama: str, tmp_path: Path, capsys) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": f"answer {i}."},
        {"from": "human", "value": "and then?"}, {"from": "gpt", "value": f"then {i}."}]}) + "\n"
        for i in range(6)))
    out_dir = tmp_path / "chat"
    code, out, err = run(["train", "--model", tiny_llama, "--data", str(data), "--steps", "1",
                          "--batch-size", "2", "--test-size", "2", "--chat-template", "chatml",
                          "--output", str(out_dir), "--train.progress=false"], capsys)
    assert code == 0, err
    losses = {}
    for extra in ([], ["--format", "sharegpt", "--chat-template", "zephyr"], ["--train-on", "last"]):
        code, out, err = run(["eval", "--adapter", str(out_dir / "adapter"), "--data", str(data),
                              *extra], capsys)
        assert code == 0, err
        assert f"format: sharegpt (chat; columns: conversations) in {data}" in out
        losses[tuple(extra)] = out.splitlines()[-1]
    assert len(set(losses.values())) == 3  # another template / loss mask scores differently
    code, out, err = run(["eval", "--adapter", str(out_dir / "adapter"), "--data", str(data),
                          "--format", "preference"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
