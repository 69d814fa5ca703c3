"""Evolution-strategy stepper: CMA-ES (Hansen & Ostermeier, 2001; the maintained `cma` package)
over a fixed low-dimensional random subspace of the delta — derivative-free tuning of a small
module as in BBT (Sun et al., 2022) and low-rank DFO (Jin et al., 2024). Any method's delta.

    theta(x) = theta0 + P^T x,   P in R^{d x D} seeded once, entries N(0, 1/d),   x in R^d
    step:  x_1..x_lambda = es.ask();  f_i = L(theta(x_i)) on the step's batch;  es.tell(x, f)
           theta <- theta(es.mean)

so `es_sigma` is the initial per-element scale of a candidate's offset. With the model bound
(`bind_model`, done by the loop), the population is evaluated in one vmapped forward through
`torch.func.functional_call`; the first batched result is checked against one-by-one evaluation
and batching is dropped if they disagree or vmap cannot run the model. Members see the same
dropout masks. Resuming replays the stored fitness values into a fresh, identically seeded CMA-ES,
which reproduces its state exactly without pickling it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from petkit.core.errors import CheckpointError, ConfigError, MissingPackageError
from petkit.models.packages import extra_install
from petkit.training.steppers.base import (Batch, LossFn, StepperConfig, is_int, is_num,
                                           register_stepper)
from petkit.training.steppers.noise import RngSnapshot, mean_loss, require_parameters

if TYPE_CHECKING:  # annotations only: the run's config resolves its stepper from the registry
    from petkit.training.config import TrainConfig


def _cma() -> Any:
    try:
        import cma
    except ImportError as err:
        raise MissingPackageError("the CMA-ES stepper needs the `cma` package: "
                                  f"{extra_install('zo')}") from err
    return cma


@dataclass(frozen=True)
class CmaConfig(StepperConfig):
    """CMA-ES's own settings (`TrainConfig.stepper` for optimizer cma): subspace dimension
    `dim`, population size `popsize` (None: cma's 4 + 3 ln d), initial step size `sigma`."""

    NAME: ClassVar[str] = "cma"
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("cma",)
    LEGACY_PREFIX: ClassVar[str] = "es_"
    GRADIENT_FREE: ClassVar[bool] = True

    dim: int = 64
    popsize: int | None = None
    sigma: float = 0.01

    def __post_init__(self) -> None:
        """dim >= 2 (at most the delta's size, checked when the stepper is built), popsize None
        or >= 2, sigma > 0."""
        self.require(is_int(self.dim) and self.dim >= 2, "dim", "an int >= 2", self.dim)
        self.require(self.popsize is None or (is_int(self.popsize) and self.popsize >= 2),
                     "popsize", "None or an int >= 2", self.popsize)
        self.require(is_num(self.sigma) and self.sigma > 0, "sigma", "a number > 0", self.sigma)


class _LossOf(nn.Module):
    """`model` as a submodule, so `functional_call` can swap its parameters around `loss_fn`."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        return torch.stack([self.loss_fn(batch) for batch in micro_batches]).mean()


class CmaStepper:
    """CMA-ES over a `dim`-dimensional subspace of `params`; see the module docstring."""

    def __init__(self, params: dict[str, nn.Parameter], *, dim: int, sigma: float,
                 popsize: int | None = None, seed: int = 0) -> None:
        """Fix theta0 (the current values) and the seeded basis; start CMA-ES at x = 0."""
        self.names = list(params)
        self.params = require_parameters(params, "CMA-ES stepper")
        total = sum(p.numel() for p in self.params)
        if not isinstance(dim, int) or not 2 <= dim <= total:
            raise ConfigError(f"TrainConfig.stepper.dim (train.es_dim) must be an int in "
                              f"[2, {total}] (the number of "
                              f"trainable parameters), got {dim!r}")
        if not sigma > 0:
            raise ConfigError(f"TrainConfig.stepper.sigma (train.es_sigma) must be a number > 0, "
                              f"got {sigma!r}")
        self.dim, self.sigma, self.popsize, self.seed = dim, float(sigma), popsize, seed
        device = self.params[0].device
        with torch.no_grad():
            self.theta0 = torch.cat([p.detach().reshape(-1).float().to(device)
                                     for p in self.params])
        gen = torch.Generator().manual_seed(seed)
        self.basis = (torch.randn((dim, total), generator=gen) / math.sqrt(dim)).to(device)
        self.fitness: list[list[float]] = []
        self.model: nn.Module | None = None
        self.batched: bool | None = None  # None: not tried yet
        self.group: Any = None  # distributed.RankGroup: candidates split across ranks
        self.es = self._replayed([])

    def bind_group(self, group: Any) -> None:
        """Under torchrun: evaluate this rank's share of each population, all-gather fitness."""
        self.group = group

    def bind_model(self, model: nn.Module) -> None:
        """The model whose `named_parameters` the params come from: enables batched evaluation."""
        self.model = model

    def _replayed(self, fitness: list[list[float]]) -> Any:
        """A fresh CMA-ES with this run's seed, told `fitness` step by step (exact resume)."""
        rng = np.random.default_rng(self.seed)
        opts: dict[str, Any] = {"seed": np.nan, "verbose": -9, "verb_log": 0, "verb_disp": 0,
                                "randn": lambda lam, n: rng.standard_normal((lam, n))}
        if self.popsize is not None:
            opts["popsize"] = self.popsize
        es = _cma().CMAEvolutionStrategy(np.zeros(self.dim), self.sigma, opts)
        for row in fitness:
            es.tell(es.ask(), row)
        return es

    def _thetas(self, points: np.ndarray) -> torch.Tensor:
        """(k, D) candidates theta0 + P^T x for `points` (k, d)."""
        x = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=self.theta0.device)
        return self.theta0 + x @ self.basis

    @torch.no_grad()
    def _assign(self, theta: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.copy_(theta[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _one_by_one(self, thetas: torch.Tensor, micro_batches: Sequence[Batch],
                    loss_fn: LossFn) -> list[float]:
        rng, losses = RngSnapshot(), []
        for theta in thetas:
            rng.restore()
            self._assign(theta)
            losses.append(mean_loss(micro_batches, loss_fn))
        return losses

    def _vmapped(self, thetas: torch.Tensor, micro_batches: Sequence[Batch],
                 loss_fn: LossFn) -> list[float]:
        assert self.model is not None
        members, offset = {}, 0
        for name, p in zip(self.names, self.params):
            chunk = thetas[:, offset:offset + p.numel()]
            members[f"model.{name}"] = chunk.reshape(len(thetas), *p.shape).to(p.dtype)
            offset += p.numel()
        call = _LossOf(self.model, loss_fn)

        def one(member: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(call, member, (micro_batches,), strict=False)

        with torch.no_grad():
            return torch.func.vmap(one, randomness="same")(members).float().tolist()

    def _evaluate(self, thetas: torch.Tensor, micro_batches: Sequence[Batch],
                  loss_fn: LossFn) -> list[float]:
        """Loss of every candidate; batched when possible (checked once against one-by-one)."""
        if self.model is None or self.batched is False:
            return self._one_by_one(thetas, micro_batches, loss_fn)
        try:
            batched = self._vmapped(thetas, micro_batches, loss_fn)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            warnings.warn(f"CMA-ES: population not batched, vmap failed ({err})", stacklevel=3)
            self.batched = False
            return self._one_by_one(thetas, micro_batches, loss_fn)
        if self.batched is None:
            single = self._one_by_one(thetas, micro_batches, loss_fn)
            spread = max(single) - min(single)
            error = max(abs(a - b) for a, b in zip(batched, single))
            self.batched = spread > 0 and error <= 0.05 * spread
            return single
        return batched

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> float:
        """One CMA-ES generation; the parameters end at the new mean. Returns mean fitness."""
        points = self.es.ask()
        thetas = self._thetas(np.stack(points))
        if self.group is None:
            losses = self._evaluate(thetas, micro_batches, loss_fn)
        else:
            lo, hi = self.group.share(len(points))
            mine = self._evaluate(thetas[lo:hi], micro_batches, loss_fn) if hi > lo else []
            losses = self.group.gather(mine, len(points))
        safe = [x if math.isfinite(x) else float("inf") for x in losses]
        self.es.tell(points, safe)
        self.fitness.append(safe)
        self._assign(self._thetas(self.es.mean[None])[0])
        finite = [x for x in safe if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else float("nan")

    def current_lr(self) -> float:
        """CMA-ES's step size sigma (logged where gradient steppers log the learning rate)."""
        return float(self.es.sigma)

    def state_dict(self) -> dict[str, Any]:
        """theta0 and every generation's fitness values (enough to rebuild CMA-ES exactly)."""
        rows = self.fitness or [[]]
        batched = {None: -1, False: 0, True: 1}[self.batched]
        return {"theta0": self.theta0.cpu(), "fitness": torch.tensor(rows, dtype=torch.float64),
                "steps": len(self.fitness), "batched": batched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore theta0, the batched-or-one-by-one choice (re-deciding it after a resume would
        evaluate that step differently) and replay the fitness history into a fresh CMA-ES."""
        if tuple(state["theta0"].shape) != tuple(self.theta0.shape):
            raise CheckpointError(f"CMA-ES state holds {state['theta0'].numel()} delta values, this "
                                  f"run has {self.theta0.numel()}")
        self.theta0 = state["theta0"].to(self.theta0.device)
        self.fitness = state["fitness"][:int(state["steps"])].tolist()
        self.batched = {-1: None, 0: False, 1: True}[int(state.get("batched", -1))]
        self.es = self._replayed(self.fitness)


@register_stepper("cma", config=CmaConfig)
def _make_cma(params: dict[str, nn.Parameter], config: TrainConfig,
              total_steps: int) -> CmaStepper:
    own = config.stepper
    assert isinstance(own, CmaConfig)
    return CmaStepper(params, dim=own.dim, sigma=own.sigma, popsize=own.popsize, seed=config.seed)
