"""Fingerprint of the base modules an adapter touches: architecture, shapes and a weight hash."""
from __future__ import annotations

import hashlib
from typing import Any

from torch import nn

from .delta import get_canonical, innermost
from .delta import canonical_modules
from .qweight import logical_shape, plain_tensor, quantization_changed, quantization_field


def _base_params(module: nn.Module) -> dict[str, Any]:
    """The original parameters of a (possibly wrapped) module, wrappers' deltas excluded."""
    out = {}
    for sub_path, _, inner in canonical_modules(module):
        for pname, p in inner.named_parameters(recurse=False):
            out[f"{sub_path}.{pname}" if sub_path else pname] = p
    return out


def fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """What an adapter for `paths` expects of its base model."""
    digest = hashlib.sha256()
    shapes: dict[str, list[list[int]]] = {}
    for path in sorted(set(paths)):
        params = _base_params(get_canonical(model, path))
        shapes[path] = [list(logical_shape(p)) for _, p in sorted(params.items())]
        for pname, p in sorted(params.items()):
            digest.update(f"{path}.{pname}:{tuple(p.shape)}".encode())
            t = plain_tensor(p)
            if t.numel() > 1 << 22:  # large tensors (embeddings): hash a fixed strided sample
                t = t.flatten()[:: max(1, t.numel() >> 20)].contiguous()
            digest.update(t.numpy().tobytes())
    config = getattr(model, "config", None)
    return {
        "architecture": type(innermost(model)).__name__,
        "model_type": str(getattr(config, "model_type", "") or ""),
        "shapes": shapes,
        "weights_sha256": digest.hexdigest(),
        **quantization_field(model),
    }


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they agree)."""
    problems = []
    if expected.get("architecture") != actual.get("architecture"):
        problems.append(f"architecture {expected.get('architecture')} != this model's {actual.get('architecture')}")
    for path, shapes in expected.get("shapes", {}).items():
        got = actual.get("shapes", {}).get(path)
        if got != shapes:
            problems.append(f"module {path}: shapes {shapes} != this model's {got}")
    if not problems and expected.get("weights_sha256") != actual.get("weights_sha256") and not quantization_changed(expected, actual):
        problems.append("the touched base weights differ (another checkpoint, dtype, or a merged adapter?)")
    return problems
