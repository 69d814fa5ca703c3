"""Preference objectives on pairs (prompt x, chosen y_w, rejected y_l), for any method and stepper.

With log-probabilities summed over an answer's tokens, pc = log pi(y_w|x), pr = log pi(y_l|x),
rc / rr the same under the reference (the model inside `pk.disabled`: every adapter off, no
second copy of the weights, one extra forward pass under no_grad), |y| the answer's tokens and
h = (pc - rc) - (pr - rr):

    dpo    -log sigmoid(beta h)                                    Rafailov et al., 2023
    rpo    dpo + alpha * NLL(y_w) per token                         Pang et al., 2024
    ipo    (h - 1 / (2 beta))^2                                     Azar et al., 2024
    orpo   NLL(y_w) per token - lambda log sigmoid(log odds(y_w) - log odds(y_l)),
           odds(y) = p / (1 - p), p = exp(mean token log pi(y|x))   Hong et al., 2024 (no ref)
    simpo  -log sigmoid(beta pc / |y_w| - beta pr / |y_l| - gamma)  Meng et al., 2024 (no ref)
    kto    (1 - sigmoid(beta (pc - rc - z))) + (1 - sigmoid(beta (z - (pr - rr)))),
           z = max(0, batch mean of the log-ratios), detached       Ethayarajh et al., 2024

KTO's reference point z estimates KL(pi || ref) from the batch's own answers (the paper uses
mismatched prompt/answer pairs of the batch: one more forward pass). Each objective gives a
per-pair margin (its implicit reward difference); pair accuracy in evaluation is objective-free:
the chosen answer's mean token log-probability above the rejected one's.

A pair batch (`pair_collate`) holds the chosen rows first, then the rejected rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petkit.core.errors import ConfigError
from petkit.core.model import disabled
from petkit.data import collate
from petkit.training.objectives import Batch, ObjectiveOutput
from petkit.training.objectives_config import REFERENCE_FREE, ObjectiveConfig

IGNORE = -100
REJECTED = "rejected_"


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T-1) log p(label_t | < t) (0 where the shifted label is -100) and the (N, T-1) mask."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    return picked.squeeze(-1) * mask, mask


def sequence_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) sum of log p(label_t | < t) over positions whose label is not -100 (shifted)."""
    return token_logps(logits, labels)[0].sum(dim=-1)


@dataclass
class PairLogps:
    """Summed answer log-probabilities of B pairs: policy, reference (None: reference-free), and
    the answers' token counts."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor | None
    rr: torch.Tensor | None
    nc: torch.Tensor
    nr: torch.Tensor

    def h(self) -> torch.Tensor:
        """The DPO margin (pc - rc) - (pr - rr)."""
        assert self.rc is not None and self.rr is not None
        return (self.pc - self.rc) - (self.pr - self.rr)

    def chosen_nll(self) -> torch.Tensor:
        """Mean negative log-likelihood per chosen token over the batch (token-weighted)."""
        return -self.pc.sum() / self.nc.sum().clamp(min=1)


Loss = Callable[[PairLogps, ObjectiveConfig], tuple[torch.Tensor, torch.Tensor]]


def dpo(s: PairLogps, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta h), mean over pairs; margin beta h."""
    margin = cfg.effective_beta * s.h()
    return -F.logsigmoid(margin).mean(), margin


def rpo(s: PairLogps, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO + alpha * chosen NLL per token."""
    loss, margin = dpo(s, cfg)
    return loss + cfg.rpo_alpha * s.chosen_nll(), margin


def ipo(s: PairLogps, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(h - 1 / (2 beta))^2, mean over pairs; margin h."""
    h = s.h()
    return ((h - 1 / (2 * cfg.effective_beta)) ** 2).mean(), h


def _log_odds(logp_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with p = exp(mean token log-probability), computed stably."""
    mean = logp_sum / tokens.clamp(min=1)
    return mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))


def orpo(s: PairLogps, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen NLL per token - lambda * log sigmoid(log odds ratio); margin the log odds ratio."""
    ratio = _log_odds(s.pc, s.nc) - _log_odds(s.pr, s.nr)
    return s.chosen_nll() - cfg.orpo_lambda * F.logsigmoid(ratio).mean(), ratio


def simpo(s: PairLogps, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta (length-normalised pc - pr) - gamma); margin before gamma."""
    beta = cfg.effective_beta
    margin = beta * s.pc / s.nc.clamp(min=1) - beta * s.pr / s.nr.clamp(min=1)
    return -F.logsigmoid(margin - cfg.simpo_gamma).mean(), margin


def kto(s: PairLogps, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Desirable (chosen) and undesirable (rejected) terms around the detached KL estimate z."""
    assert s.rc is not None and s.rr is not None
    chosen, rejected = s.pc - s.rc, s.pr - s.rr
    z = torch.cat([chosen, rejected]).mean().detach().clamp(min=0)
    beta = cfg.effective_beta
    loss = (1 - torch.sigmoid(beta * (chosen - z))) + (1 - torch.sigmoid(beta * (z - rejected)))
    return loss.mean(), beta * (chosen - rejected)


LOSSES: dict[str, Loss] = {"dpo": dpo, "rpo": rpo, "ipo": ipo, "orpo": orpo, "simpo": simpo,
                           "kto": kto}


class PreferenceObjective:
    """The `Objective` of a preference run: `model` + pair batch -> loss, pair predictions.

    `predictions` are 1 where the chosen answer's mean token log-probability is above the
    rejected one's (`targets` all 1), so evaluation's accuracy is the pair accuracy. While the
    model trains, each call adds a row to `trace` (with gradients on) and to the sums that
    `log_fields` averages into the run's log.
    """

    def __init__(self, config: ObjectiveConfig) -> None:
        """`config.name` one of the preference objectives."""
        if config.name not in LOSSES:
            raise ConfigError(f"{config.name!r} is not a preference objective "
                              f"({', '.join(LOSSES)})")
        self.config, self.loss = config, LOSSES[config.name]
        self.trace: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._calls = 0

    def logps(self, model: nn.Module, batch: Batch) -> PairLogps:
        """Policy (and, unless reference-free, reference) answer log-probabilities."""
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        if len(ids) % 2:
            raise ConfigError("a preference batch holds chosen rows then rejected rows "
                              "(pair_collate); got an odd number of rows")
        policy = _answer_logps(model, ids, mask, labels)
        ref = None
        if self.config.name not in REFERENCE_FREE:
            with torch.no_grad(), disabled(model):
                ref = _answer_logps(model, ids, mask, labels)
        tokens = (labels[:, 1:] != IGNORE).sum(dim=-1)
        b = len(ids) // 2
        return PairLogps(policy[:b], policy[b:], None if ref is None else ref[:b],
                         None if ref is None else ref[b:], tokens[:b], tokens[b:])

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """The objective's loss on a pair batch; pair predictions for evaluation."""
        s = self.logps(model, batch)
        loss, margin = self.loss(s, self.config)
        better = (s.pc / s.nc.clamp(min=1) > s.pr / s.nr.clamp(min=1)).long()
        if model.training:
            self._record(loss, margin, s)
        return ObjectiveOutput(loss, better, torch.ones_like(better))

    def _record(self, loss: torch.Tensor, margin: torch.Tensor, s: PairLogps) -> None:
        row = trace_row(loss, margin, s)
        if torch.is_grad_enabled():
            self.trace.append(row)
        self._calls += 1
        for key in ("margin", "pair_accuracy", "chosen", "rejected"):
            self._sums[key] = self._sums.get(key, 0.0) + row[key]

    def log_fields(self) -> dict[str, float]:
        """Means since the last call of the margin, pair accuracy (margin > 0) and the chosen /
        rejected log-ratios (policy log-probabilities when reference-free), for the run's log."""
        out = {k: v / self._calls for k, v in self._sums.items()} if self._calls else {}
        self._sums, self._calls = {}, 0
        return out


def trace_row(loss: torch.Tensor, margin: torch.Tensor, s: PairLogps) -> dict[str, float]:
    """What one step did, averaged over its pairs: the loss, the margin and the share of pairs
    where it is positive, the chosen and rejected log-ratios log pi - log ref (summed over answer
    tokens; reference-free: log pi), and the chosen answers' mean log-probability per token under
    the policy and the reference (falling far below the reference's means the chosen text itself
    is being unlearned)."""
    rc = s.rc if s.rc is not None else torch.zeros_like(s.pc)
    rr = s.rr if s.rr is not None else torch.zeros_like(s.pr)
    tokens = s.nc.sum().clamp(min=1)
    return {"loss": float(loss.detach()), "margin": float(margin.detach().mean()),
            "pair_accuracy": float((margin > 0).float().mean()),
            "accuracy": float((margin > 0).float().mean()),
            "chosen": float((s.pc - rc).detach().mean()),
            "rejected": float((s.pr - rr).detach().mean()),
            "chosen_token_logp": float(s.pc.detach().sum() / tokens),
            "ref_chosen_token_logp": float(rc.sum() / tokens)}


def _answer_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                  labels: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sequence_logp(out.logits, labels)


def encode_pairs(pairs: Sequence[dict[str, str]], tokenizer: Any,
                 max_length: int = 96) -> list[dict[str, list[int]]]:
    """Each {"prompt", "chosen", "rejected"} -> chosen and rejected token rows with -100 on the
    prompt (`REJECTED`-prefixed keys for the rejected side); answers end with EOS. A pair with a
    missing side, or whose chosen and rejected answers are equal, is a `ConfigError` naming it."""
    out = []
    for i, pair in enumerate(pairs):
        missing = [k for k in ("prompt", "chosen", "rejected") if not pair.get(k)]
        if missing:
            raise ConfigError(f"preference pair {i} lacks {missing}")
        if pair["chosen"] == pair["rejected"]:
            raise ConfigError(f"preference pair {i}: chosen == rejected (nothing to prefer)")
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
        row: dict[str, list[int]] = {}
        for side, prefix in (("chosen", ""), ("rejected", REJECTED)):
            answer = tokenizer(pair[side], add_special_tokens=False)["input_ids"]
            answer = (answer + [tokenizer.eos_token_id])[: max(1, max_length - len(prompt))]
            row[prefix + "input_ids"] = (prompt + answer)[:max_length]
            row[prefix + "labels"] = ([IGNORE] * len(prompt) + answer)[:max_length]
        out.append(row)
    return out


def chosen_only(pairs: Sequence[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The chosen side of encoded pairs as ordinary instruction examples (supervised baseline)."""
    return [{"input_ids": p["input_ids"], "attention_mask": [1] * len(p["input_ids"]),
             "labels": p["labels"]} for p in pairs]


def pair_collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one width (labels -100 on padding)."""
    rows = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch]
    rows += [{"input_ids": b[REJECTED + "input_ids"], "labels": b[REJECTED + "labels"]}
             for b in batch]
    return collate(rows, pad_id)
