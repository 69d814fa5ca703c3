"""Preference objectives: each loss against its closed form on hand-picked log-probabilities, the
reference served by `pk.disabled` (no second copy), training through the one loop with backprop
and with a zeroth-order stepper, the per-step log fields, and config errors in CLI words."""
from __future__ import annotations

import json
import math

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.models import tiny_model
from petkit.training.objectives_config import ObjectiveConfig
from petkit.training.objectives_preference import (LOSSES, PairLogps, PreferenceObjective,
                                                   pair_collate, sequence_logp)

# Two pairs: summed answer log-probs under policy / reference, answer lengths.
PC, PR, RC, RR = [-2.0, -6.0], [-3.0, -4.0], [-2.5, -5.0], [-2.0, -4.5]
NC, NR = [2, 4], [3, 2]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logps(ref: bool = True) -> PairLogps:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairLogps(t(PC), t(PR), t(RC) if ref else None, t(RR) if ref else None,
                     torch.tensor(NC), torch.tensor(NR))


def h(i: int) -> float:
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def chosen_nll() -> float:
    return -sum(PC) / sum(NC)


def log_odds(logp_sum: float, n: int) -> float:
    p = math.exp(logp_sum / n)
    return math.log(p / (1 - p))


def kto_reference() -> float:
    beta = 0.1
    ratios = [PC[i] - RC[i] for i in range(2)] + [PR[i] - RR[i] for i in range(2)]
    z = max(0.0, mean(ratios))
    return mean([(1 - sig(beta * (PC[i] - RC[i] - z))) + (1 - sig(beta * (z - (PR[i] - RR[i]))))
                 for i in range(2)])


CLOSED_FORMS = {  # (config, reference loss)
    "dpo": (ObjectiveConfig("dpo", beta=0.5),
            lambda: mean([-math.log(sig(0.5 * h(i))) for i in range(2)])),
    "rpo": (ObjectiveConfig("rpo", beta=0.5, rpo_alpha=0.7),
            lambda: mean([-math.log(sig(0.5 * h(i))) for i in range(2)]) + 0.7 * chosen_nll()),
    "ipo": (ObjectiveConfig("ipo", beta=0.25),
            lambda: mean([(h(i) - 1 / (2 * 0.25)) ** 2 for i in range(2)])),
    "orpo": (ObjectiveConfig("orpo", orpo_lambda=0.3),
             lambda: chosen_nll() - 0.3 * mean([math.log(sig(
                 log_odds(PC[i], NC[i]) - log_odds(PR[i], NR[i]))) for i in range(2)])),
    "simpo": (ObjectiveConfig("simpo", beta=2.0, simpo_gamma=0.5),
              lambda: mean([-math.log(sig(2.0 * PC[i] / NC[i] - 2.0 * PR[i] / NR[i] - 0.5))
                            for i in range(2)])),
    "kto": (ObjectiveConfig("kto"), kto_reference),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_loss_equals_its_closed_form(name: str) -> None:
    config, reference = CLOSED_FORMS[name]
    free = name in ("orpo", "simpo")
    loss, margin = LOSSES[name](logps(ref=not free), config)
    assert float(loss) == pytest.approx(reference(), rel=1e-9)
    assert margin.shape == (2,)


def test_every_preference_objective_has_a_closed_form_test() -> None:
    assert set(CLOSED_FORMS) == set(LOSSES)


def pairs(n: int = 8) -> list[dict[str, list[int]]]:
    return [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
             "rejected_input_ids": [5, 6, 9, 10], "rejected_labels": [-100, -100, 9, 10]}] * n


def lora_model() -> torch.nn.Module:
    model = tiny_model("llama")[0]
    return pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]), seed=0)


def test_objective_reads_policy_and_the_disabled_delta_as_reference() -> None:
    model = lora_model()
    for p in pk.trainable_parameters(model).values():
        torch.nn.init.normal_(p, std=0.3)
    batch = pair_collate(pairs(2), pad_id=0)
    out = PreferenceObjective(ObjectiveConfig("dpo", beta=0.5))(model, batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy = sequence_logp(model(**inputs).logits, batch["labels"])
    with torch.no_grad(), pk.disabled(model):
        ref = sequence_logp(model(**inputs).logits, batch["labels"])
    margin = (policy[:2] - ref[:2]) - (policy[2:] - ref[2:])
    want = -torch.nn.functional.logsigmoid(0.5 * margin).mean()
    assert torch.allclose(out.loss, want, atol=1e-6)
    assert not torch.allclose(policy, ref)  # the reference really is another function


def test_no_second_copy_of_the_weights_is_held() -> None:
    model = lora_model()
    before = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: list[set[int]] = []
    objective = PreferenceObjective(ObjectiveConfig("dpo"))
    hook = model.register_forward_hook(
        lambda m, a, o: seen.append({p.untyped_storage().data_ptr() for p in m.parameters()}))
    try:
        objective(model, pair_collate(pairs(2), pad_id=0))
    finally:
        hook.remove()
    assert len(seen) == 2 and all(s == before for s in seen)  # policy pass, reference pass


@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo", "simpo", "kto", "rpo"])
def test_training_from_the_config_raises_pair_accuracy_margin(name: str, tmp_path) -> None:
    model = lora_model()
    cfg = pk.TrainConfig(lr=5e-2, max_steps=8, batch_size=4, progress=False, log_every=4,
                         objective={"name": name}, output_dir=str(tmp_path))
    result = pk.train(model, pairs(), cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "margin" in r]
    assert len(logged) == 2 and {"pair_accuracy", "chosen", "rejected"} <= set(logged[0])
    assert logged[-1]["margin"] > logged[0]["margin"]
    assert result.steps == 8


def test_zeroth_order_stepper_trains_a_preference_objective() -> None:
    model = lora_model()
    batch = pair_collate(pairs(4), pad_id=0)
    objective = PreferenceObjective(ObjectiveConfig("dpo", beta=0.5))
    with torch.no_grad():
        before = float(objective(model.eval(), batch).loss)
    cfg = pk.TrainConfig(lr=1e-1, max_steps=30, batch_size=4, progress=False,
                         optimizer="mezo", objective="dpo")
    pk.train(model, pairs(), cfg)
    with torch.no_grad():
        after = float(objective(model.eval(), batch).loss)
    assert after < before


def test_pair_accuracy_in_evaluation_compares_mean_token_logps() -> None:
    model = lora_model()
    batch = pair_collate(pairs(2), pad_id=0)
    out = PreferenceObjective(ObjectiveConfig("simpo"))(model.eval(), batch)
    logp = sequence_logp(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    want = (logp[:2] / 2 > logp[2:] / 2).long()
    assert torch.equal(out.predictions, want) and torch.equal(out.targets, torch.ones(2).long())


def test_bad_objective_settings_speak_in_flags() -> None:
    with pytest.raises(ConfigError, match=r"--objective must be one of .*did you mean 'dpo'"):
        pk.TrainConfig(objective="dpoo")
    with pytest.raises(ConfigError, match="--beta"):
        ObjectiveConfig("dpo", beta=0)
    with pytest.raises(ConfigError, match="--group-size"):
        ObjectiveConfig("grpo", group_size=1)
    with pytest.raises(ConfigError, match="train.objective has no field"):
        pk.TrainConfig(objective={"name": "dpo", "betta": 1.0})


def test_objective_round_trips_through_json_and_dotted_overrides() -> None:
    from petkit.app.recipe import Recipe, apply_overrides

    cfg = pk.TrainConfig(objective={"name": "simpo", "beta": 2.5})
    assert pk.TrainConfig.from_json(cfg.to_json()) == cfg
    recipe = apply_overrides(Recipe(), {"train.objective.name": "kto",
                                        "train.objective.beta": "0.2"})
    assert recipe.train.objective == ObjectiveConfig("kto", beta=0.2)


class Bigram(torch.nn.Module):
    """Next-token logits from the current token only: blind to everything earlier."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor, **_: object) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table(input_ids))


def test_swapped_pairs_score_exactly_half_for_a_model_blind_to_the_request() -> None:
    """The embedded sentiment pairs come in swapped twins (one movie's two reviews, chosen and
    rejected trading places with the requested sentiment): a model whose answer likelihoods do
    not depend on the request wins exactly one pair of each twin, 50.0% (docs/objectives.md)."""
    from petkit.training.objectives_eval import pair_accuracy

    def row(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
        mask = [-100] * len(prompt)
        return {"input_ids": prompt + chosen, "labels": mask + chosen,
                "rejected_input_ids": prompt + rejected, "rejected_labels": mask + rejected}

    negative, positive = [3, 4, 9], [5, 4, 9]  # requests that differ before the last token
    twins = [row(negative, [7, 8, 2], [11, 12, 2]), row(positive, [11, 12, 2], [7, 8, 2]),
             row(negative, [6, 13, 2], [10, 1, 2]), row(positive, [10, 1, 2], [6, 13, 2])]
    assert pair_accuracy(Bigram(), twins, pad_id=0) == 0.5
    model = Bigram()
    for i in (0, 2):  # each twin: one side wins, the other loses
        wins = [pair_accuracy(model, [pair], 0) for pair in twins[i:i + 2]]
        assert sorted(wins) == [0.0, 1.0]


class CharTokenizer:
    """One token per character (its code point mod 50), EOS 1."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [2 + ord(c) % 48 for c in text]}


def test_answer_log_probs_score_exactly_the_answer_and_its_eos() -> None:
    """encode_pairs masks the prompt and ends each answer with EOS; sequence_logp sums the log-
    probability of each answer token given everything before it, and nothing else (by hand)."""
    from petkit.training.objectives_preference import encode_pairs

    row = encode_pairs([{"prompt": "ab", "chosen": "cd", "rejected": "efg"}], CharTokenizer())[0]
    tok = CharTokenizer()("abcdefg")["input_ids"]
    assert row["input_ids"] == tok[:4] + [1] and row["labels"] == [-100, -100, *tok[2:4], 1]
    assert row["rejected_labels"] == [-100, -100, *tok[4:7], 1]
    model = tiny_model("llama")[0].eval()
    batch = pair_collate([row], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    summed = sequence_logp(logits, batch["labels"])  # the chosen row is padded: 5 of 6 tokens
    for side, ids in enumerate((row["input_ids"], row["rejected_input_ids"])):
        logp = torch.log_softmax(logits[side].float(), dim=-1)
        by_hand = sum(float(logp[t - 1, ids[t]]) for t in range(2, len(ids)))  # answer + EOS
        assert float(summed[side]) == pytest.approx(by_hand, abs=1e-5)


def test_orpo_margin_wins_a_pair_exactly_where_pair_accuracy_does() -> None:
    """ORPO's margin, the log odds ratio of the answers' mean token probabilities, is positive
    exactly where the chosen answer's mean token log-probability is above the rejected one's (log
    odds is increasing in p): its own margin is the CLI's pair-accuracy criterion, where DPO's is
    a summed log-ratio against the reference (docs/objectives.md, "ORPO's pair accuracy")."""
    g = torch.Generator().manual_seed(0)
    nc, nr = torch.randint(1, 40, (256,), generator=g), torch.randint(1, 40, (256,), generator=g)
    per_c, per_r = -6 * torch.rand(256, generator=g), -6 * torch.rand(256, generator=g)
    s = PairLogps(per_c * nc, per_r * nr, None, None, nc, nr)
    _, margin = LOSSES["orpo"](s, ObjectiveConfig("orpo"))
    assert torch.equal(margin > 0, per_c > per_r)
    odds = lambda p: math.log(p / (1 - p))  # noqa: E731
    i = 3
    want = odds(math.exp(float(per_c[i]))) - odds(math.exp(float(per_r[i])))
    assert float(margin[i]) == pytest.approx(want, rel=1e-5)
