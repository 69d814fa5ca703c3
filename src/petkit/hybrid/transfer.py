"""Module transfer from a small model to a larger one of the same family, without gradients (PET-GC).

`transfer_adapter(adapter, small, large)` attaches the small model's adapter (same method and
config) to the large model and fills it by two rules, then optionally refines it with a
gradient-free stepper (`refine`: MeZO or CMA-ES through `pk.train`, never backpropagation):

1. **Depth.** Large layer ``j`` (of ``L_l``) takes the delta of small layer
   ``i = round(j * (L_s - 1) / (L_l - 1))`` (nearest relative depth); modules outside the layer
   stack (a task head) keep their path. ``L_s == L_l`` is the identity map.
2. **Width.** A delta ``dW_s`` that reads the residual stream reads it through a map ``Q``
   (large -> small); one that writes it writes through ``P`` (small -> large):
   ``dW_l = P^T dW_s Q^T`` — for LoRA ``A_l = A_s Q^T``, ``B_l = P^T B_s``; a trainable full copy
   (task head) maps its input side only. A dimension that is not the residual stream
   (attention-head space, FFN width, classes) is copied when the sizes agree and zero-padded /
   truncated when they do not. The maps are least-squares fits, chosen by `align`:

   - ``"hidden"`` (the default): fitted on the two models' hidden states over a few encoded
     texts (`align_data`; 64 is enough), one pair per (small, large) hidden state: a module of
     large layer ``j`` (from small layer ``i``) reads through the map of states (i, j) and writes
     through (i + 1, j + 1); the task head reads through the last states' map. One forward pass
     of each model over the texts. The small model is read *with its adapter on* and the large
     one as its base, so the maps regress the large base's states onto the small model's adapted
     ones: they carry part of what the adapter does (docs/hybrid.md: 12 points better than
     aligning the two bases on MiniLM-L3 -> L6, 3 seeds). Not exact when small == large.
   - ``"hidden-base"``: as ``"hidden"``, with both models read as their bases (`disabled`).
   - ``"embeddings"``: one pair from the input-embedding matrices of the shared vocabulary,
     ``P = argmin ||E_s P - E_l||``, ``Q = argmin ||E_l Q - E_s||``; needs no data, but two
     independently trained models' embedding tables are far apart (docs/hybrid.md: near chance
     on MiniLM-L3 -> L6), so it is the fallback, not the default.

   When small and large are the same model, ``"hidden-base"`` and ``"embeddings"`` give identity
   maps and an exact transfer.

Which side of a module is the residual stream is read from the module's place in a BERT /
Llama / GPT-2 block (`READS_RESIDUAL`, `WRITES_RESIDUAL`).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.hybrid.config import ALIGNS, HybridRecipe, TransferConfig
from petkit.core.io import adapter_state, fill_attached, read_adapter, config_of
from petkit.core.model import attach, disabled
from petkit.core.state import adapters
from petkit.data import collate
from petkit.training import TrainConfig, TrainResult, train
from petkit.training.sections import optimizers

LAYER = re.compile(r"^(.*?\.(?:layer|layers|h|block)\.)(\d+)(\..*)$")
READS_RESIDUAL = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "intermediate.dense",
                  "gate_proj", "up_proj", "c_attn", "c_fc", "pooler.dense")
WRITES_RESIDUAL = ("attention.output.dense", "o_proj", "down_proj", "c_proj")
WRITES_OUTPUT = re.compile(r"(^|\.)output\.dense$")  # BERT's FFN output (not attention.output)


@dataclass
class Transfer:
    """What `transfer_adapter` did: the layer map, the alignment residual, refinement cost."""

    layer_map: dict[int, int]
    alignment_error: float  # relative least-squares residual ||x P - y|| / ||y|| (mean over maps)
    align: str = "hidden"
    refined: TrainResult | None = None
    notes: list[str] = field(default_factory=list)


def layer_count(model: nn.Module) -> int:
    """Number of transformer blocks (config.num_hidden_layers / n_layer)."""
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot read the layer count of {type(model).__name__} "
                      "(config.num_hidden_layers)")


def depth_map(small_layers: int, large_layers: int) -> dict[int, int]:
    """Large layer -> small layer by nearest relative depth."""
    if large_layers == 1 or small_layers == 1:
        return {j: 0 for j in range(large_layers)}
    ratio = (small_layers - 1) / (large_layers - 1)
    return {j: int(round(j * ratio)) for j in range(large_layers)}


def least_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin_M ||x M - y|| by the normal equations in float64 (one Gram product: fast for
    many rows), with a ridge of 1e-8 * trace / d against an ill-conditioned Gram matrix."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    ridge = 1e-8 * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), x.T @ y)


ALIGN_TEXTS = TransferConfig().align_texts  # texts taken from refine_data (no align_data)


def embedding_maps(small: nn.Module, large: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(P, Q, relative residual): least-squares maps between the residual streams, from the
    input embeddings of the shared vocabulary (`align="embeddings"`)."""
    e_s = small.get_input_embeddings().weight.detach().double()
    e_l = large.get_input_embeddings().weight.detach().double()
    if e_s.shape[0] != e_l.shape[0]:
        raise ConfigError(f"the two models need one vocabulary to align their hidden spaces; "
                          f"small has {e_s.shape[0]} tokens, large {e_l.shape[0]}")
    if torch.equal(e_s, e_l):
        eye = torch.eye(e_s.shape[1], dtype=torch.float32)
        return eye, eye, 0.0
    p, q = least_squares(e_s, e_l), least_squares(e_l, e_s)
    err = float(torch.linalg.norm(e_s @ p - e_l) / torch.linalg.norm(e_l))
    return p.float(), q.float(), err


def _fit(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`t` zero-padded / truncated to `shape` (a dimension outside the residual stream)."""
    out = torch.zeros(shape, dtype=t.dtype)
    idx = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape))
    out[idx] = t[idx]
    return out


def _sides(module_path: str) -> tuple[bool, bool]:
    """(reads the residual stream, writes it) for a module path."""
    reads = any(module_path.endswith(s) for s in READS_RESIDUAL)
    writes = any(module_path.endswith(s) for s in WRITES_RESIDUAL) or (
        bool(WRITES_OUTPUT.search(module_path)) and "attention" not in module_path)
    return reads, writes


Maps = tuple[torch.Tensor, torch.Tensor]  # (P: small -> large, Q: large -> small)


class HiddenAligner:
    """(P, Q) between the small model's hidden state `i` and the large model's `j` (0 = the
    embedding output), fitted by least squares on the non-pad tokens of `data`. The large model
    runs inside `disabled` (its base); the small one with its adapters on when `adapted` (the
    maps then carry what the adapter does to its states, `align="hidden"`), else as its base
    too (`align="hidden-base"`)."""

    def __init__(self, small: nn.Module, large: nn.Module, data: Sequence[dict],
                 pad_id: int, adapted: bool = False) -> None:
        batch = collate(list(data), pad_id)
        keep = batch["attention_mask"].reshape(-1).bool()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        self.states = []
        with torch.no_grad():
            for model in (small, large):
                with nullcontext() if adapted and model is small else disabled(model):
                    out = model(**inputs, output_hidden_states=True)
                self.states.append([h.reshape(-1, h.shape[-1])[keep].double()
                                    for h in out.hidden_states])
        self.cache: dict[tuple[int, int], Maps] = {}
        self.errors: list[float] = []

    def __call__(self, i: int, j: int) -> Maps:
        if (i, j) not in self.cache:
            h_s, h_l = self.states[0][i], self.states[1][j]
            p = least_squares(h_s, h_l)
            self.errors.append(float(torch.linalg.norm(h_s @ p - h_l) / torch.linalg.norm(h_l)))
            self.cache[(i, j)] = (p.float(), least_squares(h_l, h_s).float())
        return self.cache[(i, j)]

    def error(self) -> float:
        """Mean relative residual of the fitted small -> large maps."""
        return sum(self.errors) / len(self.errors) if self.errors else 0.0


def _aligner(align: str, small: nn.Module, large: nn.Module, align_data: Sequence[dict] | None,
             pad_id: int) -> tuple[Any, Any]:
    """(maps(i, j) -> (P, Q), error() -> residual) for the chosen alignment."""
    if align == "embeddings":
        p, q, err = embedding_maps(small, large)
        return (lambda i, j: (p, q)), (lambda: err)
    if not align_data:
        raise ConfigError(f"transfer_adapter: hidden-state alignment (align={align!r}) "
                          "needs align_data (a few encoded texts, e.g. 64 training examples) or "
                          "refine_data; pass align='embeddings' to align without data")
    aligner = HiddenAligner(small, large, align_data, pad_id, adapted=align == "hidden")
    return aligner, aligner.error


def map_tensor(key: str, local: str, t: torch.Tensor, shape: Sequence[int],
               read: Maps, write: Maps) -> torch.Tensor:
    """One delta tensor of module `key` projected across widths (see the module docstring):
    `read` maps the residual stream the module reads, `write` the one it writes."""
    reads, writes = _sides(key.replace(".copy", ""))  # a trainable copy sits at <path>.copy
    t = t.float()
    d_s = read[0].shape[0]
    if t.dim() == 2 and local.endswith("lora_A") and reads and t.shape[1] == d_s:
        t = t @ read[1].T  # (r, d_s) -> (r, d_l)
    elif t.dim() == 2 and local.endswith("lora_B") and writes and t.shape[0] == d_s:
        t = write[0].T @ t  # (d_s, r) -> (d_l, r)
    elif t.dim() == 2 and local.endswith("weight") and reads and t.shape[1] == d_s:
        t = t @ read[1].T  # a full copy (task head): input side
    if tuple(t.shape) != tuple(shape):
        t = _fit(t, shape)
    return t


def _source_key(key: str, layers: dict[int, int]) -> tuple[str, int | None]:
    """The small model's key for large `key`, and the large layer index (None: not in a layer)."""
    match = LAYER.match(key)
    if match is None:
        return key, None
    j = int(match.group(2))
    return f"{match.group(1)}{layers[j]}{match.group(3)}", j


def _load(adapter: Any, small: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter attached to `small` by name, or of an adapter folder."""
    if isinstance(adapter, str) and adapter in adapters(small):
        state = {k: v.detach().cpu() for k, v in adapter_state(small, adapter).items()}
        return adapters(small)[adapter].config, state
    if not isinstance(adapter, (str, os.PathLike)):
        raise ConfigError(f"adapter must be an adapter name attached to the small model or an "
                          f"adapter folder, got {type(adapter).__name__}")
    meta, tensors = read_adapter(adapter)
    return config_of(meta, adapter), tensors


def _settings(recipe: HybridRecipe | None, config: TransferConfig | None,
              refine: TrainConfig | None, align: str | None) -> tuple[TransferConfig, Any]:
    """The transfer section and the refinement's train section: `config` / `refine` given apart
    replace the recipe's; `align=` (earlier releases) still works, with a DeprecationWarning."""
    recipe = recipe or HybridRecipe()
    config = config or recipe.transfer
    if align is not None:
        warnings.warn("transfer_adapter(align=...) is deprecated: give "
                      f"config=TransferConfig(align={align!r}) (or a hybrid recipe)",
                      DeprecationWarning, stacklevel=3)
        if align not in ALIGNS:
            raise ConfigError(f"transfer_adapter: align must be one of {ALIGNS}, got {align!r}")
        config = dataclasses.replace(config, align=align)
    return config, refine if refine is not None else recipe.train


def transfer_adapter(adapter: str | os.PathLike, small_model: nn.Module, large_model: nn.Module,
                     *, name: str = "default", recipe: HybridRecipe | None = None,
                     config: TransferConfig | None = None, refine: TrainConfig | None = None,
                     refine_data: Sequence[dict] | None = None,
                     eval_data: Sequence[dict] | None = None, pad_id: int = 0,
                     align_data: Sequence[dict] | None = None,
                     align: str | None = None) -> Transfer:
    """Attach `adapter` (trained on `small_model`) to `large_model` as `name`, mapped by depth
    and width without gradients; with a refinement train section (a zeroth-order or CMA-ES
    TrainConfig) and `refine_data`, refine it with `pk.train`.

    The settings are sections: `recipe` (a `HybridRecipe`, e.g. `load_hybrid_recipe("pet-gc")`)
    holds the transfer section and the refinement's train section; `config` (a
    `TransferConfig`) and `refine` replace them. `config.align="hidden"` (default) fits the width
    maps on the two models' hidden states over `align_data` (encoded examples; when not given,
    the first `config.align_texts` of `refine_data`), reading the small model with its adapter
    on; `"hidden-base"` reads it as its base; `"embeddings"` fits one pair on the input
    embeddings (no data). Returns the layer map, the alignment residual and the refinement's
    `TrainResult`."""
    config, refine = _settings(recipe, config, refine, align)
    align = config.align
    if refine is not None and not refine.stepper.GRADIENT_FREE:
        raise ConfigError(f"transfer refinement is gradient-free: TrainConfig.optimizer must be "
                          f"one of {', '.join(optimizers(gradient_free=True))}, got {refine.optimizer!r}")
    if refine is not None and not refine_data:
        raise ConfigError("transfer_adapter(refine=...) needs refine_data")
    method_config, tensors = _load(adapter, small_model)
    layers = depth_map(layer_count(small_model), layer_count(large_model))
    n_s, n_l = layer_count(small_model), layer_count(large_model)
    texts = align_data if align_data else list(refine_data or [])[:config.align_texts]
    maps, error = _aligner(align, small_model, large_model, texts, pad_id)
    attach(large_model, method_config, name)
    target = adapter_state(large_model, name)
    mapped = {}
    for key, param in target.items():
        source, j = _source_key(key, layers)
        if source not in tensors:
            raise ConfigError(f"the small model's adapter has no tensor {source!r} for the large "
                              f"model's {key!r}")
        module, _, local = key.rpartition(".")
        # a layer reads hidden state j and writes j + 1; the head reads the last one
        read = maps(layers[j], j) if j is not None else maps(n_s, n_l)
        write = maps(layers[j] + 1, j + 1) if j is not None else read
        mapped[key] = map_tensor(module, local, tensors[source], param.shape, read, write)
    fill_attached(large_model, name, mapped, trainable=True)
    result = Transfer(layers, error(), align)
    if refine is not None:
        result.refined = train(large_model, list(refine_data or []), refine, eval_data,
                               pad_id=pad_id)
    return result
