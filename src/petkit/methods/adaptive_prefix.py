"""Adaptive prefix tuning (APT) — Zhang et al., 2023, "Towards Adaptive Prefix Tuning for
Parameter-Efficient Language Model Fine-tuning" (ACL 2023).

Prefix tuning (`methods.prefix`: n keys and values in front of every attention layer) whose
prefix in layer l is re-weighted by two gates computed at that layer:

    alpha_l = sigmoid(W_l u_{l-1} + b_l)       token level: one weight per prefix token, from the
                                                hidden state entering layer l, u = h / |h|
    lambda_l                                    layer level: a trainable scalar per layer
    [Pk_l ; Pv_l]  ->  lambda_l * alpha_l (.) [Pk_l ; Pv_l]

h_{l-1} is the hidden state of the caller's first real token (its [CLS] on an encoder; on a
decoder the one state every position may see, so the gate leaks nothing from later tokens),
scaled to unit length: hidden-state norms differ by orders of magnitude across layers (a
decoder's first token carries massive activations, |h| ~ 1e4 in SmolLM2), and at unit length
an optimiser step of size lr moves a gate logit by at most about lr * sqrt(hidden).
W_l = 0, b_l = 0 and lambda_l = 2 at initialisation, so APT starts as plain prefix tuning
(2 * sigmoid(0) = 1). The gated prefix is computed once per input (in the forward that puts it
into the key/value cache); cached decoding and `generate` reuse it.

Touches the input embedding (the prefixes, exactly as prefix tuning, including the optional
reparameterisation MLP and `pk.fold`) and every transformer block (the gates). Not mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import PeftLayout
from ..core.delta import innermost, wrap
from ..core.errors import TargetError
from .family.virtual_tokens import LayerExtension, Live
from ..core.blocks import layer_paths
from ..core.registry import register
from .prefix import KVPrefix, PrefixConfig, attach_prefix


def first_real_token(live: Live, batch: int, device: torch.device) -> torch.Tensor:
    """Index in the hidden sequence of each row's first unpadded caller token."""
    if live.mask is None:
        first = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        first = live.mask.to(device).long().argmax(dim=1)
    return first + live.offset


class PrefixGate(LayerExtension):
    """Token- and layer-level gates on adapter `source`'s prefix of attention layer `layer`."""

    def __init__(self, base: nn.Module, adapter_name: str, source: KVPrefix, layer: int, hidden: int) -> None:
        super().__init__(base, adapter_name, source, layer)
        ref = source.prefixes()
        self.gate = nn.Linear(hidden, source.num_kv(), dtype=ref.dtype, device=ref.device)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.scale = nn.Parameter(torch.tensor(2.0, dtype=ref.dtype, device=ref.device))

    def gates(self, hidden: torch.Tensor, live: Live) -> torch.Tensor:
        """lambda * sigmoid(W h/|h| + b): (batch, n)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h = hidden[rows, first_real_token(live, hidden.shape[0], hidden.device)].to(self.gate.weight.dtype)
        return self.scale * torch.sigmoid(self.gate(F.normalize(h, dim=-1)))

    def transform(self, hidden: torch.Tensor, live: Live) -> torch.Tensor:
        # The cache holds this layer's prefixes (this adapter's at live.start:live.end) and nothing
        # of this forward's tokens yet: re-weight them in place before the block appends its own.
        layer = live.cache.layers[self.layer]
        g = self.gates(hidden, live)[:, None, :, None]
        s, e = live.start, live.end
        for attr in ("keys", "values"):
            t = getattr(layer, attr)
            setattr(layer, attr, torch.cat([t[:, :, :s], t[:, :, s:e] * g.to(t.dtype), t[:, :, e:]], dim=2))
        return hidden


@register("adaptive-prefix", family="additive",
          paper="Zhang et al., 2023, Towards Adaptive Prefix Tuning for Parameter-Efficient Language Model Fine-tuning")
@dataclass(frozen=True)
class AdaptivePrefixConfig(PrefixConfig):
    """PrefixConfig's fields (the prefixes are prefix tuning's); `inject` adds the gates."""

    peft_layout: ClassVar[PeftLayout | None] = None  # PEFT has no gated prefixes

    def inject(self, model: nn.Module, name: str) -> list[str]:
        blocks = layer_paths(model)
        path, source = attach_prefix(model, name, self.num_virtual_tokens, self.projection_dim, self.init,
                                     self.init_std, self.seed, self.positions == "after_prefix")
        layers = source.shape[0]
        if layers != len(blocks):
            raise TargetError(f"{len(blocks)} transformer blocks but {layers} attention layers take a prefix: "
                              "adaptive prefix tuning needs one attention layer per block")
        hidden = innermost(model.get_input_embeddings()).weight.shape[1]
        for i, block in enumerate(blocks):
            wrap(model, block, PrefixGate, name, source, i, hidden)
        return [path, *blocks]
