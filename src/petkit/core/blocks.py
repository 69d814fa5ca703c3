"""The layer stack: a model's repeated transformer blocks, found by structure.

Methods that act on one block (late prompt tuning) and training regimes that act per block
(IST) need "layer i" of any model: `model.layers.i` (Llama), `transformer.h.i` (GPT-2),
`bert.encoder.layer.i` (BERT). The stack is the `nn.ModuleList` whose children share one
type, preferring the one as long as `config.num_hidden_layers`, else the longest. Paths are
canonical, so blocks that are themselves wrapped by a delta are still found.
"""
from __future__ import annotations

from torch import nn

from .delta import canonical_modules, innermost


def layer_paths(model: nn.Module) -> list[str]:
    """Canonical paths of the model's repeated blocks in order; [] when it has none."""
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: list[str] = []
    for path, _, inner in canonical_modules(model):
        if not isinstance(inner, nn.ModuleList) or len(inner) < 1:
            continue
        kinds = {type(innermost(child)) for child in inner}
        if len(kinds) != 1:
            continue
        children = [f"{path}.{name}" if path else name for name, _ in inner.named_children()]
        if len(children) == want:
            return children
        if len(children) > len(best):
            best = children
    return best


def layer_of(path: str, stack: list[str]) -> int | None:
    """Index of the block that canonical `path` lies in (or is), None if outside the stack."""
    for index, block in enumerate(stack):
        if path == block or path.startswith(block + "."):
            return index
    return None
