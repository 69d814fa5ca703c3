"""GRPO: group advantages and the token loss against closed forms, the k3 KL against the disabled
delta, reward functions loaded from module:function (path printed first, weights, clear errors
naming the row), a run through the one loop that raises the reward on a tiny model, and the
refusal of gradient-free steppers."""
from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.data.rewards import contains, exact_match, exact_number
from petkit.models import tiny_model
from petkit.training.grpo import (GRPOObjective, generate_ids, group_advantages,
                                  grpo_token_loss, prompt_collate)
from petkit.training.grpo_rewards import RewardError, Scorer, load_scorers, total_reward
from petkit.training.objectives_config import ObjectiveConfig


class DigitTokenizer:
    """Token t decodes to ' t' (0 is pad, 2 is eos): enough for rewards over token ids."""

    pad_token_id, eos_token_id = 0, 2

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return ["".join(f" {t}" for t in row if t not in (0, 2)) for row in rows]


def test_group_advantages_are_standardised_within_each_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    want = (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-4)
    assert torch.allclose(adv[:4], want) and torch.equal(adv[4:], torch.zeros(4))


def test_token_loss_and_k3_kl_match_the_closed_form() -> None:
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.1, -0.3]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -0.4, -0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, beta = torch.tensor([0.8, -1.2]), 0.1
    loss, kl = grpo_token_loss(logp, ref, adv, mask, beta)
    k3 = lambda p, r: math.exp(r - p) - (r - p) - 1  # noqa: E731
    logp_v = logp.detach()
    rows = []
    for i, n in ((0, 2), (1, 3)):
        rows.append(sum(-float(adv[i]) + beta * k3(float(logp_v[i, t]), float(ref[i, t]))
                        for t in range(n)) / n)
    assert float(loss.detach()) == pytest.approx(sum(rows) / 2, rel=1e-6)
    want_kl = (sum(k3(float(logp_v[0, t]), float(ref[0, t])) for t in range(2)) / 2
               + sum(k3(float(logp_v[1, t]), float(ref[1, t])) for t in range(3)) / 3) / 2
    assert float(kl) == pytest.approx(want_kl, rel=1e-6)
    loss.backward()  # policy-gradient part: d/dlogp = -A / |o| (plus the KL's own gradient)
    grad_pg = -adv[0] / 2 + beta * (1 - math.exp(float(ref[0, 0] - logp_v[0, 0]))) / 2
    assert float(logp.grad[0, 0]) == pytest.approx(float(grad_pg) / 2, rel=1e-5)


def test_embedded_rewards() -> None:
    rows = [{"reference": "42"}, {"reference": "7"}, {"reference": "7"}]
    assert exact_number([""] * 3, [" 42.", "It is 7, not 8", "3 + 4 = 7"], rows) == [1.0, 0.0, 1.0]
    assert exact_match([""] * 3, [" 42 \nmore", "7 ", "77"], rows) == [1.0, 1.0, 0.0]
    assert contains([""] * 3, ["x42", "8", "77"], rows) == [1.0, 0.0, 1.0]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def sevens(prompts, completions, rows):
            return [c.split().count("7") / 4 for c in completions]
        def one(prompts, completions, rows):
            return [1.0] * len(completions)
        def boom(prompts, completions, rows):
            if any(r.get("bad") for r in rows):
                raise ValueError("cannot score")
            return [0.0] * len(completions)
        def nan(prompts, completions, rows):
            return [float("nan")] + [0.0] * (len(completions) - 1)
        def short(prompts, completions, rows):
            return [0.0]
    """))
    monkeypatch.chdir(tmp_path)
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_rewards_are_weighted_and_their_file_printed_before_import(reward_module) -> None:
    lines: list[str] = []
    scorers = load_scorers([f"{reward_module}:sevens=0.5", f"{reward_module}:one"], lines.append)
    assert lines[0].startswith(f"{reward_module}:sevens=0.5: importing my_rewards from") \
        and lines[0].endswith("my_rewards.py")
    assert [s.weight for s in scorers] == [0.5, 1.0]
    total = total_reward(scorers, ["p", "p"], [" 7 7", " 1"], [{}, {}], [0, 1])
    assert torch.allclose(total, torch.tensor([0.5 * 0.5 + 1, 1.0]))


def test_path_is_printed_before_the_module_runs(tmp_path, monkeypatch) -> None:
    (tmp_path / "loud.py").write_text("import sys\nsys.stdout.write('IMPORTED\\n')\n"
                                      "def f(p, c, r):\n    return [0.0] * len(c)\n")
    monkeypatch.chdir(tmp_path)
    events: list[str] = []
    monkeypatch.setattr(sys, "stdout", type("W", (), {"write": lambda s, t: events.append(t),
                                                       "flush": lambda s: None})())
    load_scorers(["loud:f"], lambda line: events.append("ECHO " + line))
    sys.modules.pop("loud", None)
    assert events[0].startswith("ECHO loud:f: importing loud from") and "IMPORTED\n" in events


@pytest.mark.parametrize("function, message", [
    ("boom", r"boom raised ValueError: cannot score on data row 11"),
    ("nan", r"nan returned nan for data row 10"),
    ("short", r"short returned 1 values for 2 completions \(data rows \[10, 11\]\)"),
])
def test_a_failing_reward_names_the_row(reward_module, function: str, message: str) -> None:
    scorer = load_scorers([f"{reward_module}:{function}"], lambda line: None)[0]
    with pytest.raises(RewardError, match=message):
        scorer.score(["a", "b"], ["x", "y"], [{}, {"bad": True}], [10, 11])


def test_bad_reward_specs_are_clear_errors(reward_module) -> None:
    with pytest.raises(ConfigError, match="module:function"):
        load_scorers(["no_colon"])
    with pytest.raises(ConfigError, match="no module 'nowhere_at_all'"):
        load_scorers(["nowhere_at_all:f"])
    with pytest.raises(ConfigError, match=r"has no function 'sevenz' \(functions: .*sevens"):
        load_scorers([f"{reward_module}:sevenz"], lambda line: None)
    with pytest.raises(ConfigError, match="at least one --reward"):
        load_scorers([])


def test_gradient_free_steppers_refuse_grpo_with_a_reason() -> None:
    with pytest.raises(ConfigError, match="--objective grpo needs a gradient stepper.*sampled"):
        pk.TrainConfig(optimizer="mezo", objective="grpo")
    with pytest.raises(ConfigError, match="GRPOObjective"):
        pk.train(pk.attach(tiny_model("llama")[0], pk.LoraConfig(r=2)),
                 [{"input_ids": [3, 4], "labels": 0}], pk.TrainConfig(objective="grpo",
                                                                      progress=False))


def test_generation_is_left_padded_and_cut_after_eos() -> None:
    model = tiny_model("llama")[0]
    out = generate_ids(model, [[5, 6, 7], [9]], pad_id=0, eos_id=2, max_new_tokens=4)
    alone = generate_ids(model, [[9]], pad_id=0, eos_id=2, max_new_tokens=4)
    assert out[1] == alone[0]  # the shorter prompt's padding changed nothing
    assert all(len(r) <= 4 and (2 not in r or r[-1] == 2) for r in out)


def test_grpo_raises_the_reward_on_a_tiny_model(reward_module, tmp_path) -> None:
    torch.manual_seed(0)
    # LoRA on the output head too: a random tiny body can hardly make one token likelier
    model = pk.attach(tiny_model("llama")[0],
                      pk.LoraConfig(r=4, targets=["lm_head", "q_proj", "v_proj"]), seed=0)
    rows = [{"prompt": f"p{i}"} for i in range(4)]
    data = [{"input_ids": [5 + i, 6 + i], "labels": i} for i in range(4)]
    spec = ObjectiveConfig("grpo", rewards=[f"{reward_module}:sevens"], group_size=8,
                           max_new_tokens=4, kl=0.0)
    scorers = load_scorers(spec.rewards, lambda line: None)
    objective = GRPOObjective(spec, DigitTokenizer(), rows, scorers)
    cfg = pk.TrainConfig(lr=5e-2, max_steps=24, batch_size=4, progress=False, objective=spec,
                         log_every=3, output_dir=str(tmp_path / "run"))
    result = pk.train(model, data, cfg, objective=objective,
                      collate_fn=lambda b: prompt_collate(b, 0))
    logged = [r for r in result.history if "reward_mean" in r]
    assert {"reward_std", "kl", "completion_tokens"} <= set(logged[0])
    assert logged[0]["reward_mean"] < 0.1 and logged[-1]["reward_mean"] > 0.3  # of 1.0
    assert logged[-1]["kl"] > 0  # the policy moved away from the disabled-delta reference
    assert (tmp_path / "run" / "training.png").is_file()
