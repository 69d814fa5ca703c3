"""The signatures of modules' forward methods, cached per class in plain dicts.

Objectives and input-extension methods ask on every forward which arguments a model's (or a
block's) forward takes. A plain dict lookup is what torch.compile traces quietly; at a
`functools.lru_cache` wrapper Dynamo warns that it ignores the cache and traces the function.
"""

from __future__ import annotations

import inspect

_SIGNATURES: dict[type, inspect.Signature] = {}
_PARAMS: dict[type, frozenset[str]] = {}


def forward_signature(cls: type) -> inspect.Signature:
    """`inspect.signature(cls.forward)`, computed once per class."""
    signature = _SIGNATURES.get(cls)
    if signature is None:
        signature = _SIGNATURES[cls] = inspect.signature(cls.forward)
    return signature


def forward_params(cls: type) -> frozenset[str]:
    """The parameter names of `cls.forward`, computed once per class."""
    params = _PARAMS.get(cls)
    if params is None:
        params = _PARAMS[cls] = frozenset(forward_signature(cls).parameters)
    return params
