"""Differentially private adapters (DP-SGD on the delta) — Abadi et al., 2016, "Deep Learning with
Differential Privacy"; for PET: Yu et al., 2022, "Differentially Private Fine-tuning of Language
Models" (arXiv:2110.06500).

    per step, over the B = batch_size x grad_accum examples of the step:
        g_i   = grad of example i's loss w.r.t. the trainable (delta) parameters
        g     = ( sum_i g_i * min(1, C / ||g_i||)  +  N(0, (sigma C)^2 I) ) / B
        then the backprop stepper's optimiser and schedule take g as the gradient
    sigma: the smallest noise multiplier for which the accountant (Opacus' RDP or PRV accountant)
    gives (epsilon, delta) after the run's steps at sampling rate q = B / N.

Per-example gradients come from torch.func (`vmap` over `grad` of a `functional_call`):
Opacus' `GradSampleModule` cannot wrap petkit's layers (a delta wrapper holds its parameters
and calls its frozen base; Opacus finds no activations for `LoraLinear`, in hook and in functorch
mode alike: measured with opacus 1.6.0). An objective that vmap cannot trace falls back to one
backward per example (the same numbers, tested). A step's rows go through in groups of similar
length, each cut to its longest row (exact; less padding computed). The accountant is Opacus' own.

`TrainConfig(dp=DPConfig(epsilon=8, delta=1e-5, max_grad_norm=1.0))`, or `--dp.epsilon 8` /
recipe `dp:`. The epsilon spent so far is logged every step (`dp_epsilon`) and written into
adapter.json (`privacy`). Refused: zeroth-order and evolution steppers (no gradients to clip),
IST (it would drop part of the clipped, noised gradient), a step larger than the data.
Batches are drawn shuffled with a fixed size (the loop's data order), and q = B / N is given to
the accountant, as in most DP fine-tuning work; the RDP analysis assumes Poisson sampling.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.core.io import BASE_ATTR, base_record

ACCOUNTANTS = ("rdp", "prv")
PER_EXAMPLE = ("vmap", "loop")  # loop: one backward per example (19x faster than vmap for the
# verbaliser objective on SmolLM2, measured: docs/privacy.md)
PIP = "opacus==1.6.0"
CHUNK_ROWS = 32  # rows of one per-example gradient call: similar lengths, padded to their longest


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Privacy budget of a run (`--dp.epsilon`, `--dp.delta`, `--dp.max_grad_norm`)."""

    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # C: each example's gradient is clipped to this L2 norm
    accountant: str = "rdp"
    per_example: str = "vmap"  # how per-example gradients are taken: vmap | loop

    def __post_init__(self) -> None:
        for name, value in (("epsilon", self.epsilon), ("max_grad_norm", self.max_grad_norm)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"--dp.{name} must be a number > 0, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise ConfigError(f"--dp.delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"--dp.accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.per_example not in PER_EXAMPLE:
            raise ConfigError(f"--dp.per_example must be one of {', '.join(PER_EXAMPLE)}, "
                              f"got {self.per_example!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown dp option(s) {unknown}; dp options: {sorted(known)}")
        return cls(**data)


def _accountant(name: str) -> Any:
    from petkit.models.packages import require_module

    require_module("opacus", PIP, "--dp (its privacy accountant)")
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def noise_multiplier(config: DPConfig, sample_rate: float, steps: int) -> float:
    """The smallest sigma giving (epsilon, delta) after `steps` steps at `sample_rate` (Opacus)."""
    from opacus.accountants.utils import get_noise_multiplier

    _accountant(config.accountant)  # the missing-package error first
    return float(get_noise_multiplier(target_epsilon=config.epsilon, target_delta=config.delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=config.accountant))


def spent_epsilon(config: DPConfig, sigma: float, sample_rate: float, steps: int) -> float:
    """Epsilon spent after `steps` steps of noise `sigma` at `sample_rate` (Opacus' accountant)."""
    if steps == 0:
        return 0.0
    accountant = _accountant(config.accountant)
    accountant.history = [(sigma, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=config.delta))


class _LossOf(nn.Module):
    """`functional_call` target: the loop's loss function on the model, parameters swapped in."""

    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(batch)


def _rows(batch: dict[str, Any]) -> int:
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])


def _trimmed(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` cut after its last attended column (right padding no row attends or scores).

    Exact: an encoder or decoder never attends to a masked key, so trailing padding changes no
    attended position; not cut where a 2-D `labels` scores a padded column (or no 2-D mask)."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return batch
    rows, length = mask.shape
    columns = torch.arange(1, length + 1, device=mask.device)
    keep = max(1, int(((mask != 0) * columns).amax()))
    labels = batch.get("labels")
    if keep == length or (isinstance(labels, torch.Tensor) and labels.shape == mask.shape
                          and bool((labels[:, keep:] != -100).any())):
        return batch
    return {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.shape[:2] == (rows, length) else v
            for k, v in batch.items()}


def by_length(batch: dict[str, Any], rows: int = CHUNK_ROWS) -> list[dict[str, Any]]:
    """The batch's rows sorted by length, in chunks of `rows`, each cut to its longest row.

    A DP step sums clipped per-example gradients, which no grouping of the rows changes; a
    chunk of similar lengths is padded to its own longest row, not the batch's (rotten-tomatoes:
    27 tokens on average, a batch of 256 is padded to ~60)."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return [batch]
    order = torch.argsort((mask != 0).sum(1), stable=True)
    count = mask.shape[0]
    chunks = []
    for start in range(0, count, rows):
        index = order[start:start + rows]
        chunks.append(_trimmed({k: v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == count
                                else v for k, v in batch.items()}))
    return chunks


def _square_mask(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padding mask as a (rows, 1, L, L) boolean attention mask (causal for a decoder).

    transformers builds its 4-D mask from a 2-D one with data-dependent branches vmap cannot
    trace; a 4-D mask is used as given. Same numbers (tested against one backward per example)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    length = mask.shape[1]
    keys = mask.bool()[:, None, None, :].expand(-1, 1, length, length)
    config = getattr(model, "config", None)
    if "CausalLM" in type(model).__name__ or getattr(config, "is_decoder", False):
        keys = keys & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return {**batch, "attention_mask": keys}


def per_example_grads(model: nn.Module, params: dict[str, nn.Parameter], loss_fn: Any,
                      batch: dict[str, Any], vectorised: bool = True
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each example's gradient, one (rows, *shape) tensor per parameter of `params` (in order),
    and each example's loss (rows,)."""
    tensors = [p for p in params.values()]
    if vectorised:
        from torch.func import functional_call, grad_and_value, vmap

        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        keys = ["model." + names[id(p)] for p in tensors]
        holder = _LossOf(model, loss_fn)
        keyed = _square_mask(model, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})

        def one(values: tuple[torch.Tensor, ...], example: dict[str, torch.Tensor]) -> torch.Tensor:
            single = {k: v.unsqueeze(0) for k, v in example.items()}
            return functional_call(holder, dict(zip(keys, values)), (single,))

        grads, losses = vmap(grad_and_value(one), in_dims=(None, 0), randomness="different")(
            tuple(t.detach() for t in tensors), keyed)
        return list(grads), losses.detach()
    rows, losses = [], []
    for i in range(_rows(batch)):
        single = _trimmed({k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        loss = loss_fn(single)
        rows.append(torch.autograd.grad(loss, tensors, allow_unused=True))
        losses.append(loss.detach())
    return [torch.stack([g if g is not None else torch.zeros_like(t) for g in col])
            for t, col in zip(tensors, zip(*rows))], torch.stack(losses)


def clipped_sum(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """sum_i g_i * min(1, C / ||g_i||), the norm taken over every parameter of example i."""
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in grads))
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor.to(g.dtype), g) for g in grads]


class DPStepper:
    """DP-SGD around a backprop stepper: its optimiser and schedule take the private gradient."""

    def __init__(self, inner: Any, model: nn.Module, params: dict[str, nn.Parameter],
                 config: DPConfig, sample_rate: float, total_steps: int, batch: int) -> None:
        self.inner, self.model, self.params, self.config = inner, model, params, config
        self.sample_rate, self.batch = sample_rate, batch
        self.sigma = noise_multiplier(config, sample_rate, total_steps)
        self.steps, self.vectorised = 0, config.per_example == "vmap"
        self._note()

    def step(self, micro_batches: Sequence[dict[str, Any]], loss_fn: Any) -> torch.Tensor:
        summed: list[torch.Tensor] | None = None
        losses = []
        for batch in (chunk for micro in micro_batches for chunk in by_length(micro)):
            grads, loss = self._grads(batch, loss_fn)
            part = clipped_sum(grads, self.config.max_grad_norm)
            summed = part if summed is None else [a + b for a, b in zip(summed, part)]
            losses.append(loss)
        assert summed is not None
        std = self.sigma * self.config.max_grad_norm
        for param, total in zip(self.params.values(), summed):
            noise = torch.normal(0.0, std, size=total.shape, device=total.device)
            param.grad = ((total + noise.to(total.dtype)) / self.batch).to(param.dtype)
        self.inner.optimizer.step()
        self.inner.scheduler.step()
        self.inner.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._note()
        return torch.cat(losses).double().mean()

    def _grads(self, batch: dict[str, Any], loss_fn: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.vectorised:
            try:
                return per_example_grads(self.model, self.params, loss_fn, batch, True)
            except (RuntimeError, ValueError, NotImplementedError):  # an op vmap cannot batch
                self.vectorised = False
        return per_example_grads(self.model, self.params, loss_fn, batch, False)

    def epsilon(self) -> float:
        return spent_epsilon(self.config, self.sigma, self.sample_rate, self.steps)

    def _note(self) -> None:
        """Record the budget spent so far where save_adapter writes it (adapter.json `privacy`)."""
        record = base_record(self.model)
        record["privacy"] = {"mechanism": "dp-sgd", "epsilon": self.epsilon(),
                             "target_epsilon": float(self.config.epsilon), "delta": float(self.config.delta),
                             "max_grad_norm": float(self.config.max_grad_norm),
                             "noise_multiplier": self.sigma, "sample_rate": self.sample_rate,
                             "steps": self.steps, "accountant": self.config.accountant}
        self.model.__dict__[BASE_ATTR] = record

    def log_fields(self) -> dict[str, float]:
        return {"dp_epsilon": round(self.epsilon(), 4)}

    def report(self) -> dict[str, Any]:
        return {"dp_epsilon": round(self.epsilon(), 4), "dp_noise_multiplier": round(self.sigma, 4),
                "dp_per_example": "torch.func vmap" if self.vectorised else "one backward per example"}

    def current_lr(self) -> float:
        return self.inner.current_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "dp_steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.steps = int(state["dp_steps"])
        self._note()


def with_dp(stepper: Any, model: nn.Module, params: dict[str, nn.Parameter], config: Any,
            total_steps: int, examples: int) -> Any:
    """`stepper` wrapped in DP-SGD when `config.dp` is set (refused where it cannot apply)."""
    dp = config.dp
    if dp is None:
        return stepper
    name = config.stepper.NAME
    if name != "backprop":
        raise ConfigError(f"--dp needs per-example gradients: use --optimizer adamw or sgd (the "
                          f"{name!r} stepper estimates updates from forward passes, with nothing to clip)")
    if config.ist is not None:
        raise ConfigError("--dp cannot run with IST (--train.ist): IST would drop part of each "
                          "clipped, noised gradient and the accountant would no longer hold")
    batch = config.batch_size * config.grad_accum
    if batch > examples:
        raise ConfigError(f"--dp: a step of --batch-size x --grad-accum = {batch} examples is more "
                          f"than the {examples} training examples")
    return DPStepper(stepper, model, params, dp, batch / examples, total_steps, batch)
