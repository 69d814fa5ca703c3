"""`ObjectiveConfig`: which loss a run optimises (`TrainConfig.objective`, flags `--objective`,
`--beta`, `--reward`, `--group-size`, `--kl`, `--metric`, ...), validated on construction.

    sft                          the model's own next-token loss (the default; no config needed)
    dpo rpo ipo orpo simpo kto   preference pairs (training/objectives_preference.py)
    grpo                         prompts + reward functions (training/grpo.py)

MEET (`control_tokens` > 0, the `meet` recipe): a preference objective trained in two steps,
control tokens by prompt tuning first, then the recipe's method with them fixed
(`app/objective_run.py`).

`beta` None takes the objective's default (`DEFAULT_BETA`): DPO's 0.5 was chosen on the embedded
pairs' validation movies, where the usual 0.1 let plain DPO collapse (docs/objectives.md). GRPO
needs a gradient: a zeroth-order or evolution stepper compares loss values of one batch, and
GRPO's loss is built from completions sampled afresh on every call (`check_stepper`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from petkit.core.config_io import dataclass_from_dict
from petkit.core.errors import ConfigError

PREFERENCE = ("dpo", "rpo", "ipo", "orpo", "simpo", "kto")
OBJECTIVES = ("sft", *PREFERENCE, "grpo")
REFERENCE_FREE = ("orpo", "simpo")  # no reference pass at all
DEFAULT_BETA = {"dpo": 0.5, "rpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}
GRADIENT_STEPPERS = ("backprop",)


FLAGGED = ("beta", "group_size", "kl", "max_new_tokens", "temperature", "metric", "reward")


def _fail(name: str, allowed: str, value: object) -> None:
    flag = f"--{name.replace('_', '-')} (train.objective.{name})" if name in FLAGGED \
        else f"--train.objective.{name}"
    raise ConfigError(f"{flag} must be {allowed}, got {value!r}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value - value == 0


@dataclass(frozen=True)
class ObjectiveConfig:
    """The objective and its knobs; fields an objective does not read are ignored by it."""

    name: str = "sft"
    beta: float | None = None  # dpo/rpo/ipo/kto: reference-KL strength; simpo: reward scale
    rpo_alpha: float = 1.0  # rpo: weight of the chosen answers' NLL per token
    orpo_lambda: float = 2.0  # orpo: weight of the odds-ratio term (docs/objectives.md: 2.0 chosen)
    simpo_gamma: float = 1.0  # simpo: target reward margin
    rewards: list[str] = field(default_factory=list)  # grpo: "module:function[=weight]"
    group_size: int = 4  # grpo: completions sampled per prompt
    kl: float = 0.04  # grpo: weight of the k3 KL estimate against the reference
    max_new_tokens: int = 16  # grpo and generation evaluation
    temperature: float = 1.0  # grpo sampling
    metric: str = "exact"  # generation evaluation: exact | contains | module:function
    control_tokens: int = 0  # MEET: > 0 first learns this many control tokens (prompt tuning)
    control_lr: float = 3e-2  # MEET: the control tokens' learning rate (step 1)

    def __post_init__(self) -> None:
        """Validate each field (errors speak in CLI flags)."""
        if self.name not in OBJECTIVES:
            import difflib

            close = difflib.get_close_matches(str(self.name), OBJECTIVES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got "
                              f"{self.name!r}{hint}")
        if self.beta is not None and not (_number(self.beta) and self.beta > 0):
            _fail("beta", "None or a number > 0", self.beta)
        for name in ("rpo_alpha", "orpo_lambda", "simpo_gamma", "kl"):
            value = getattr(self, name)
            if not (_number(value) and value >= 0):
                _fail(name, "a number >= 0", value)
        for name in ("temperature", "control_lr"):
            if not (_number(getattr(self, name)) and getattr(self, name) > 0):
                _fail(name, "a number > 0", getattr(self, name))
        for name, low in (("group_size", 2), ("max_new_tokens", 1), ("control_tokens", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                _fail(name, f"an int >= {low}", value)
        rewards = [self.rewards] if isinstance(self.rewards, str) else self.rewards
        if not isinstance(rewards, list) or not all(isinstance(r, str) and r for r in rewards):
            _fail("reward", "a list of module:function[=weight] specs", self.rewards)
        object.__setattr__(self, "rewards", list(rewards))
        if not isinstance(self.metric, str) or not self.metric:
            _fail("metric", "exact, contains or module:function", self.metric)
        if self.control_tokens and not self.is_preference:
            raise ConfigError(f"--train.objective.control_tokens (MEET's control tokens) needs a "
                              f"preference objective ({', '.join(PREFERENCE)}), not "
                              f"--objective {self.name}")

    @property
    def effective_beta(self) -> float:
        """`beta`, or the objective's usual value when unset."""
        return float(self.beta if self.beta is not None else DEFAULT_BETA.get(self.name, 0.1))

    @property
    def is_preference(self) -> bool:
        """Whether the objective trains on preference pairs."""
        return self.name in PREFERENCE

    def check_stepper(self, stepper: str) -> None:
        """`ConfigError` when the objective cannot run under stepper `stepper`."""
        if self.name == "grpo" and stepper not in GRADIENT_STEPPERS:
            raise ConfigError(
                f"--objective grpo needs a gradient stepper (--optimizer adamw or sgd), not "
                f"{stepper!r}: zeroth-order and CMA-ES steps compare loss values of one batch, "
                "and GRPO's loss comes from completions sampled afresh on every call, so the "
                "values would score different samples")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: ObjectiveConfig | dict[str, Any] | str | None
                   ) -> ObjectiveConfig | None:
        """None, a config, an objective name, or a mapping of fields (YAML)."""
        if value is None or isinstance(value, ObjectiveConfig):
            return value
        if isinstance(value, str):
            return cls(name=value)
        return dataclass_from_dict(cls, value, "train.objective")
