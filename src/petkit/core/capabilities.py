"""Optional capabilities of a method, declared as Protocols and checked with isinstance.

Every wrapper satisfies the delta contract (`delta.DeltaModule`); some offer more. Each extra is
a runtime-checkable Protocol below, and core / training reach it only through `isinstance` —
never through a method's name or a `hasattr` probe:

    Weighted        a float `mix` scaling its delta when stacked (`pk.activate(..., weights=)`)
    LowRank         `lowrank() -> (A, B, scale)`: its delta is `scale * B @ A`
    RowBatchable    `row_terms() -> RowTerms`: its output is `gain * base(x) + shift + scale * B A x`,
                    so rows of many adapters share one forward (core.batched_lowrank)
    RankSettable    `set_rank(r)`: evaluate at another rank without retraining (DyLoRA)
    ExpertRouted    `expert_counts()`: tokens routed to each expert (LoRA mixtures)
    StepHooked      `on_train_step(step, total)` after each optimiser step (COLA's links)
    ReportsMetrics  `train_metrics()`: extra numbers for each training log row
    Foldable        `fold()`: replace a training-time reparameterisation by what it computes
    MergesOwnDeltas `merge_deltas()`: what merging adds, by base parameter name
    TransformsOutput `transforms_output`: True when it changes its base's output non-additively
    InputScaled     `on_input`: True when it scales its base's input rather than its output
    DataInitialized `init_needs`, `init_from(stats)`: starts from statistics of a few batches
                    (`pk.initialize`, core/initialize.py); a per-adapter option (LoRA's `init`),
                    so not a method's declared capability
    FactorLoadable  `load_factors(a, b, bias)`: takes any low-rank delta (LoRA; merges build on it)
    HoldsForwardState `live`: where an input extension's content sits in the running forward

A config may satisfy RankRange (`rank_range`, `at_rank`), FoldableConfig (`folded`) and
FactorTarget (`for_factors`: the method merges of several adapters become), and Ranked (one
rank `r`, read structurally, not claimed). A config
class whose method PEFT also has declares its `peft_layout` (a `PeftLayout` below: how its
adapter reads as a PEFT folder; core/peft_interop.py). A registered method
declares what its wrappers and config satisfy in its config's `capabilities` ClassVar; the
contract table (tests/test_contract.py) checks every claim, and `capable(P)` lists the methods
claiming P for error messages.

    pk.set_rank(model, 4, name="default")    # RankSettable wrappers (DyLoRA): rank from now on
    pk.expert_load(model, name="default")    # ExpertRouted wrappers (LoRA mixtures)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from .delta import DeltaModule, iter_deltas
from .errors import AdapterStateError, ConfigError
from .registry import METHODS, MethodConfig
from .state import adapters, check_known


Factors = tuple[torch.Tensor, torch.Tensor, float]


@runtime_checkable
class Weighted(Protocol):
    mix: float


@runtime_checkable
class LowRank(Protocol):
    def lowrank(self) -> Factors:
        """(A (r, in), B (out, r), scale): the delta is `scale * B @ A` in (out, in) layout."""
        ...


class FusedTerms(NamedTuple):
    """What a fused low-rank forward needs: y = base(x) + scale * dropout(x) A^T B^T (+ shift)."""

    a: torch.Tensor  # (r, in), trained
    b: torch.Tensor  # (out, r), trained
    scale: float  # stacking weight included
    shift: torch.Tensor | None  # a bias delta added to the output, or None
    dropout: float = 0.0  # dropout probability on the delta's input right now (0: none)


@runtime_checkable
class FusableLowRank(Protocol):
    def fused_terms(self) -> FusedTerms | None:
        """The terms when this forward is exactly base(x) + scale B A dropout(x) (+ shift) right
        now, else None (a frozen offset...): training.fused_delta then runs it."""
        ...


class RowTerms(NamedTuple):
    """One wrapper as `gain * base(x) + shift + scale * B A x` (eval mode, weight 1, alone on its base).

    a (r, in), b (out, r); gain and shift are (out,) vectors, None for 1 and 0."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    gain: torch.Tensor | None = None
    shift: torch.Tensor | None = None


@runtime_checkable
class RowBatchable(Protocol):
    def row_terms(self) -> RowTerms:
        """This wrapper's output as an affine map of its base's plus a low-rank term (see RowTerms)."""
        ...


@runtime_checkable
class RankSettable(Protocol):
    def set_rank(self, rank: int) -> None: ...


@runtime_checkable
class ExpertRouted(Protocol):
    def expert_counts(self, reset: bool = False) -> torch.Tensor: ...


@runtime_checkable
class StepHooked(Protocol):
    def on_train_step(self, step: int, total_steps: int) -> None: ...


@runtime_checkable
class ReportsMetrics(Protocol):
    def train_metrics(self) -> dict[str, float]: ...


@runtime_checkable
class Foldable(Protocol):
    def fold(self) -> None: ...


@runtime_checkable
class MergesOwnDeltas(Protocol):
    def merge_deltas(self) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class TransformsOutput(Protocol):
    transforms_output: bool


@runtime_checkable
class InputScaled(Protocol):
    on_input: bool


class InitStats(NamedTuple):
    """What `pk.initialize` collected for one wrapper on a few batches (None where not asked):
    inputs: xtx = sum of x x^T (in, in), xsum = sum of x (in,), count = tokens (padding left out);
    weight_grad: grad = mean dL/dW of the innermost base weight, in that weight's layout."""
    xtx: torch.Tensor | None = None
    xsum: torch.Tensor | None = None
    count: int = 0
    grad: torch.Tensor | None = None


@runtime_checkable
class DataInitialized(Protocol):
    """A wrapper whose starting values come from data (EVA, CorDA, LoRA-GA): `init_needs` is what
    `pk.initialize` must collect ("inputs" or "weight_grad"; None once initialised)."""
    init_needs: str | None

    def init_from(self, stats: InitStats) -> None: ...


@runtime_checkable
class HoldsForwardState(Protocol):
    """An input extension (prompt, prefix) whose `live` says where its content sits in the
    running forward (None outside one); recomputation saves and restores it."""

    live: Any


@runtime_checkable
class Ranked(Protocol):
    """A config with one rank `r` (LoRA family): merges compress to the inputs' largest."""

    r: int


@runtime_checkable
class FactorTarget(Protocol):
    """A config class whose adapter holds any given low-rank delta B @ A exactly (LoRA): core
    builds merges and ports into it. `for_factors` makes a config of `rank` at `targets`, scale
    1, with a bias delta when `bias`; its wrappers take the factors with `load_factors`."""

    @classmethod
    def for_factors(cls, rank: int, targets: list[str], modules_to_save: list[str],
                    bias: bool) -> MethodConfig: ...


@runtime_checkable
class FactorLoadable(Protocol):
    """A wrapper of a `FactorTarget` method: `load_factors(a, b, bias)` writes A (r', in),
    B (out, r') zero-padded to its rank r >= r', and the bias delta (None: leave it as is)."""

    def load_factors(self, a: torch.Tensor | None, b: torch.Tensor | None,
                     bias: torch.Tensor | None) -> None: ...

    def trained_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The trained A and B parameters themselves (`lowrank()` may return a product with a
        frozen starting offset folded in: LoRA+ needs the parameter B)."""
        ...


@runtime_checkable
class RankRange(Protocol):
    def rank_range(self) -> tuple[int, int]:
        """(lowest, highest) rank `at_rank` accepts."""
        ...

    def at_rank(self, rank: int) -> MethodConfig: ...


@runtime_checkable
class FoldableConfig(Protocol):
    def folded(self) -> MethodConfig: ...


@dataclass(frozen=True)
class PeftLayout:
    """How a method's adapter reads as a Hugging Face PEFT folder (`pk.export_peft` / `import_peft`);
    a config class declares it as its `peft_layout` ClassVar (None: PEFT has no such method).

    keys: this method's parameter name -> PEFT's tensor name after the module path
    to_peft(config) -> PEFT's config fields beyond peft_type / target_modules / modules_to_save
    from_peft(PEFT config) -> this method's config fields beyond targets / modules_to_save
        (raises ConfigError for what petkit cannot load exactly)
    matches(PEFT config): whether this method reads a folder of `peft_type` (LoRA vs DoRA)
    fan_in_fan_out: PEFT's config has the flag (set for GPT-2 Conv1D layers)
    skip(key, PEFT config): a PEFT tensor petkit rebuilds instead of reading (VeRA's projections)
    to_value(base module, local name, tensor) / from_value(...): where PEFT stores something else
        than petkit's delta (LN tuning: the whole new weight), the tensor as PEFT / petkit holds it;
        `base module` is the innermost module the tensor belongs to
    to_state(petkit delta tensors) -> the tensors to export, where PEFT holds them combined (a
        LoRA init's frozen offset folded into one rank-2r LoRA, as PEFT's own conversion does)
    params_to_peft(model, adapter name, tensors) -> (the rest, tensors under PEFT's full keys)
        for what PEFT does not keep per module (MoE experts' `target_parameters`, a prompt's
        `prompt_embeddings`); params_from_peft(model, PEFT config, PEFT tensors) -> (the rest,
        petkit tensors) reads them back
    target_names(module paths) -> PEFT's `target_modules` (Lily: the module names, which PEFT
        groups its shared layers by)
    fields_to_peft(model, adapter name) -> PEFT config fields read off the attached adapter
        ((IA)3's feedforward_modules); fields_from_peft(PEFT config, module paths) -> this method's
        config fields that depend on which modules PEFT adapted (they override `targets`)
    """

    peft_type: str
    keys: dict[str, str]
    to_peft: Callable[[Any], dict[str, Any]]
    from_peft: Callable[[dict[str, Any]], dict[str, Any]]
    matches: Callable[[dict[str, Any]], bool] = field(default=lambda peft_config: True)
    fan_in_fan_out: bool = False
    skip: Callable[[str, dict[str, Any]], bool] = field(default=lambda key, peft_config: False)
    to_value: Callable[[Any, str, Any], Any] = field(default=lambda base, local, tensor: tensor)
    from_value: Callable[[Any, str, Any], Any] = field(default=lambda base, local, tensor: tensor)
    to_state: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda state: state)
    params_to_peft: Callable[[Any, str, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] = field(
        default=lambda model, name, state: (state, {}))
    params_from_peft: Callable[[Any, dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] = field(
        default=lambda model, peft_config, tensors: (tensors, {}))
    target_names: Callable[[list[str]], list[str]] = field(default=lambda paths: paths)
    fields_to_peft: Callable[[Any, str], dict[str, Any]] = field(default=lambda model, name: {})
    fields_from_peft: Callable[[dict[str, Any], list[str]], dict[str, Any]] = field(
        default=lambda peft_config, paths: {})


WRAPPER_CAPABILITIES: tuple[type, ...] = (Weighted, LowRank, RowBatchable, RankSettable, ExpertRouted,
                                          StepHooked, ReportsMetrics, Foldable, MergesOwnDeltas,
                                          TransformsOutput, InputScaled, FactorLoadable)
CONFIG_CAPABILITIES: tuple[type, ...] = (RankRange, FoldableConfig, FactorTarget)


def capable(protocol: type) -> list[str]:
    """The registered methods that declare `protocol`, sorted (for error messages)."""
    return sorted(name for name, info in METHODS.items() if protocol in info.config_cls.capabilities)


def capable_text(protocol: type) -> str:
    return ", ".join(capable(protocol)) or "none registered"


def lowrank_factors(wrapper: DeltaModule) -> Factors | None:
    """The wrapper's (A, B, scale) if its delta is low-rank (see `LowRank`), else None."""
    return wrapper.lowrank() if isinstance(wrapper, LowRank) else None


def set_rank(model: nn.Module, rank: int, name: str = "default") -> nn.Module:
    """Evaluate, merge and save adapter `name` at `rank` from now on, without retraining.

    For methods that train a range of ranks at once (DyLoRA). The rank is stored in the
    adapter's config, so `save_adapter` writes it and `load_adapter` restores it.
    """
    check_known(model, [name])
    record = adapters(model)[name]
    if not isinstance(record.config, RankRange):
        raise ConfigError(f"adapter {name!r} ({record.config.method}) has one fixed rank; set_rank needs a "
                          f"method trained over a range of ranks ({capable_text(RankRange)})")
    wrappers = [w for _, w in iter_deltas(model) if w.adapter_name == name and isinstance(w, RankSettable)]
    if any(w.merged for w in wrappers):
        raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before changing its rank")
    record.config = record.config.at_rank(rank)  # validates the range before anything changes
    for w in wrappers:
        w.set_rank(rank)
    return model


def expert_load(model: nn.Module, name: str = "default", reset: bool = False) -> dict[str, list[float]]:
    """Share of routed tokens each expert took, per layer (path -> one fraction per expert).

    Counts accumulate over every forward since the adapter was attached (or the last reset);
    a perfectly balanced layer with E experts shows 1/E each. Tokens an expert dropped because
    it was over capacity are not counted for it.
    """
    check_known(model, [name])
    out: dict[str, list[float]] = {}
    for path, w in iter_deltas(model):
        if w.adapter_name == name and isinstance(w, ExpertRouted):
            counts: torch.Tensor = w.expert_counts(reset=reset)
            total = float(counts.sum())
            out[path] = [float(c) / total if total else 0.0 for c in counts]
    if not out:
        raise ConfigError(f"adapter {name!r} ({adapters(model)[name].config.method}) has no experts; "
                          f"methods with experts: {capable_text(ExpertRouted)}")
    return out
