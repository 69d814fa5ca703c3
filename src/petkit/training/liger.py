"""Liger Kernel's Triton kernels inside petkit's run (`--runtime.kernels=liger`).

Each piece is chosen on its own (`--runtime.liger=flce,rmsnorm,rope,swiglu`), because next to
torch.compile not every one wins (docs/training-gpu.md):

- `flce`: fused linear cross-entropy. The head bypass (`lm_loss.HeadBypass`) already hands the
  loss the hidden states; this piece computes `CE(hidden W_head^T, labels)` with Liger's kernel,
  which never holds a chunk's logits for the backward, instead of petkit's chunked loss. Needs a
  causal LM whose head bypass is on and whose head is a plain `nn.Linear`.
- `rmsnorm`: every `*RMSNorm` module with `weight` and `variance_epsilon` runs Liger's RMSNorm.
- `rope`: the modeling module's `apply_rotary_pos_emb` is Liger's rotary embedding.
- `swiglu`: every MLP with `gate_proj`, `up_proj`, `down_proj` and a SiLU runs
  `down(silu(gate(x)) * up(x))` with Liger's fused SiLU-and-multiply (petkit's delta wrappers on
  the three projections are called as before).

Only the model families whose RMSNorm and rotary embedding Liger's Llama kernels match are
accepted (`FAMILIES`). Everything is patched on this model's instances (and the one module
function for RoPE) for the duration of the run and put back afterwards. `liger_kernel` is
imported only here, when a run asks for it; the functions come through a `Provider`, so tests
check the wiring against torch references on the CPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError, MissingPackageError

PIECES = ("flce", "rmsnorm", "rope", "swiglu")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # RMSNorm offset 0, Llama casting, Llama RoPE
PIP = "pip install 'petkit[kernels]' (liger-kernel; it needs triton and a CUDA GPU)"


@dataclass(frozen=True)
class Provider:
    """The kernels' functions (Liger's, or references in tests)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    flce: Callable[..., torch.Tensor]  # (hidden, weight, target, bias, ignore_index) -> sum


def liger_provider() -> Provider:
    """Liger Kernel's functions; `MissingPackageError` naming the install when it (or triton)
    cannot be imported."""
    try:
        from liger_kernel.transformers import functional as lk
    except ImportError as err:
        raise MissingPackageError(f"--runtime.kernels=liger needs liger-kernel ({err}). "
                                  f"Fix: {PIP}") from err

    def flce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
             bias: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
        return lk.liger_fused_linear_cross_entropy(hidden, weight, target, bias,
                                                   ignore_index=ignore_index, reduction="sum")

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return lk.liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)

    return Provider(rms_norm=rms_norm, rope=lk.liger_rope, swiglu=lk.liger_swiglu, flce=flce)


def model_type(model: nn.Module) -> str:
    """A transformers model's `config.model_type`, else the model's class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def family(model: nn.Module) -> str | None:
    """The model's `config.model_type` when Liger's Llama kernels fit it, else None."""
    kind = model_type(model)
    return kind if kind in FAMILIES else None


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and hasattr(m, "variance_epsilon")]


def _swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    def silu(module: nn.Module) -> bool:
        act = getattr(module, "act_fn", None)
        return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"

    return [m for m in model.modules() if silu(m) and all(
        isinstance(getattr(m, name, None), nn.Module)
        for name in ("gate_proj", "up_proj", "down_proj"))]


def _rope_module(model: nn.Module) -> Any | None:
    module = sys.modules.get(type(model).__module__)
    return module if callable(getattr(module, "apply_rotary_pos_emb", None)) else None


def _norm_forward(norm: nn.Module, provider: Provider) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: provider.rms_norm(x, norm.weight, norm.variance_epsilon)


def _mlp_forward(mlp: nn.Module, provider: Provider) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: mlp.down_proj(provider.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def applicable(model: nn.Module, piece: str, bypass: Any | None) -> str | None:
    """Why `piece` cannot apply to `model` (None: it can)."""
    if piece == "flce":
        head = None if bypass is None else bypass.head
        return None if type(head) is nn.Linear else \
            "needs the chunked-loss head bypass over a plain nn.Linear head (--runtime.loss_chunk)"
    found = {"rmsnorm": _norms, "swiglu": _swiglu_mlps}.get(piece)
    if found is not None:
        return None if found(model) else f"the model has no {piece} module Liger can run"
    return None if _rope_module(model) is not None else "no apply_rotary_pos_emb to replace"


@contextlib.contextmanager
def liger_pieces(model: nn.Module, pieces: tuple[str, ...], provider: Provider,
                 bypass: Any | None) -> Iterator[list[str]]:
    """Inside the context, `pieces` (checked with `applicable` first) run Liger's kernels on
    `model`; yields the pieces installed. Everything is restored afterwards."""
    for piece in pieces:
        reason = applicable(model, piece, bypass)
        if reason is not None:
            raise ConfigError(f"--runtime.liger={piece}: {reason}")
    with contextlib.ExitStack() as stack:
        if "rmsnorm" in pieces:
            stack.enter_context(_forwards({m: _norm_forward(m, provider) for m in _norms(model)}))
        if "swiglu" in pieces:
            stack.enter_context(_forwards({m: _mlp_forward(m, provider)
                                           for m in _swiglu_mlps(model)}))
        if "rope" in pieces:
            stack.enter_context(_attribute(_rope_module(model), "apply_rotary_pos_emb",
                                           provider.rope))
        if "flce" in pieces:
            stack.enter_context(_attribute(bypass, "fused", provider.flce))
        yield list(pieces)


@contextlib.contextmanager
def _forwards(new: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Instance forwards set for the context; each module's own (or none) put back."""
    own = {m: vars(m).get("forward") for m in new}
    for module, forward in new.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in own.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextlib.contextmanager
def _attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name = value` for the context, the old value put back."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)
