"""benchmarks/hybrid*.py: every documented command line parses, and the preference evaluation's
movie split and hard prompts are what docs/hybrid.md says (no model is loaded)."""
from __future__ import annotations

import math
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import hybrid  # noqa: E402
import hybrid_prefer  # noqa: E402


def documented_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "hybrid.md").read_text() + (ROOT / "README.md").read_text()
    lines = re.findall(r"python benchmarks/hybrid\.py ([^\n`#]*)", text)
    return [shlex.split(line) for line in lines]


def test_every_documented_command_line_parses() -> None:
    commands = documented_commands()
    assert {c[0] for c in commands} >= {"transfer", "port", "prefer"}
    parser = hybrid.build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        if args.cmd == "prefer":
            hybrid_prefer.check(parser, args)


def test_unknown_preference_arm_is_refused() -> None:
    parser = hybrid.build_parser()
    args = parser.parse_args(["prefer", "--arms", "dpo,ppo"])
    with pytest.raises(SystemExit):
        hybrid_prefer.check(parser, args)


MOVIES = {  # name -> {0: negative reviews, 1: positive reviews}
    "tie": {0: ["bad"], 1: ["good"]},
    "liked": {0: ["bad"], 1: ["good", "great"]},
    "disliked": {0: ["bad", "awful", "dull"], 1: ["fine"]},
    "also_liked": {0: ["meh"], 1: ["good", "fun"]},
}


def test_movie_split_is_disjoint_and_keeps_the_documented_order() -> None:
    names = [f"m{i}" for i in range(30)]
    held, train, rest = hybrid_prefer.split_movies(names, 1, 5, 10)
    assert (len(held), len(train), len(rest)) == (5, 10, 15)
    assert not (set(held) & set(train) or set(held) & set(rest) or set(train) & set(rest))
    # the formula every documented row used: a seeded permutation, held out first
    order = [names[i] for i in torch.randperm(30, generator=torch.Generator().manual_seed(1))]
    assert (held, train) == (order[:5], order[5:][:10])
    assert hybrid_prefer.split_movies(names, 2, 5, 10)[0] != held  # the seed picks the movies


def test_pair_accuracy_is_scored_on_the_clis_test_pairs() -> None:
    """The benchmark's pair accuracy (docs/hybrid.md, the library's DPO + RPO figure) is on the
    pairs the CLI scores: the `sentiment-pairs` task's test set of the same seed."""
    from petkit.data.objective_tasks import sentiment_pairs

    movies = hybrid_prefer.movie_reviews()
    held, _, _ = hybrid_prefer.split_movies(list(movies), 1, 20, 64)
    pairs = hybrid_prefer.held_out_pairs(movies, held)
    assert len(pairs) == 40 and pairs == sentiment_pairs(1).test


def test_hard_prompts_skip_ties_and_mark_the_request_against_the_majority() -> None:
    hard = hybrid_prefer.hard_prompts(MOVIES, list(MOVIES), 2)
    titles = [p.split("movie ")[1].split(".")[0] for p, _, _ in hard]
    assert titles == ["liked"] * 2 + ["disliked"] * 2
    assert [(s, a) for _, s, a in hard] == [(0, True), (1, False), (0, False), (1, True)]
    assert hard[0][0] == "Write a negative review of the movie liked.\nReview:"


def test_scores_share_and_mean_probability_over_a_subset() -> None:
    probs = [0.9, 0.2, 0.6, 0.4]
    assert hybrid_prefer.scores(probs) == (0.5, pytest.approx(0.525))
    assert hybrid_prefer.scores(probs, [True, False, True, False]) == (1.0, pytest.approx(0.75))
    assert all(math.isnan(x) for x in hybrid_prefer.scores(probs, [False] * 4))


def test_preference_pairs_take_chosen_from_the_requested_sentiment() -> None:
    pairs = hybrid_prefer.preference_pairs(MOVIES, ["disliked"], 2)
    assert [p["chosen"] for p in pairs] == [" bad", " awful", " fine", " fine"]
    assert [p["rejected"] for p in pairs] == [" fine", " fine", " bad", " awful"]


def test_hard_prompts_in_the_untrained_wording_keep_movie_and_sentiment() -> None:
    trained = hybrid_prefer.hard_prompts(MOVIES, list(MOVIES), 1)
    para = hybrid_prefer.hard_prompts(MOVIES, list(MOVIES), 1, hybrid_prefer.PARAPHRASE)
    assert [(s, a) for _, s, a in para] == [(s, a) for _, s, a in trained]
    assert para[0][0] == "What did you think of liked? Answer with a negative opinion.\nAnswer:"
    assert para[0][0] != trained[0][0]


def test_summary_groups_saved_generations_by_wording_and_length() -> None:
    rows = [{"set": "hard", "new_tokens": 24, "against": True, "prob": 0.9, "text": "bad film"},
            {"set": "hard", "new_tokens": 24, "against": False, "prob": 0.2, "text": "bad film"},
            {"set": "para", "new_tokens": 48, "against": True, "prob": 0.7, "text": "a b c"},
            {"against": False, "prob": 0.6, "text": "old format"}]
    out = hybrid_prefer.summary_rows(rows)
    assert set(out) == {("hard", 24), ("para", 48)}
    hard = out[("hard", 24)]
    assert (hard["n"], hard["rate"], hard["against"], hard["with"]) == (3, 2 / 3, 1.0, 0.5)
    assert hard["distinct"] == pytest.approx(2 / 3) and hard["words"] == pytest.approx(2.0)
    assert out[("para", 48)]["words"] == 3.0 and out[("para", 48)]["empty"] == 0.0


def test_every_arm_is_attached_with_the_init_seed_or_the_run_seed() -> None:
    parser = hybrid.build_parser()
    assert hybrid_prefer.init_seed(parser.parse_args(["prefer"]), 2) == 2
    assert hybrid_prefer.init_seed(parser.parse_args(["prefer", "--init-seed", "5"]), 2) == 5


def test_compact_trace_is_one_rounded_list_per_quantity() -> None:
    trace = [{"loss": 0.693147, "chosen": 0.0}, {"loss": 0.5, "chosen": -1.23456}]
    assert hybrid_prefer.compact(trace) == {"loss": [0.6931, 0.5], "chosen": [0.0, -1.2346]}
    assert hybrid_prefer.compact([]) == {}
