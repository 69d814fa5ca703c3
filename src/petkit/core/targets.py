"""Target matching: the one place that turns a user's `targets` into module paths.

Rules (DESIGN.md): a list entry matches a module path exactly or as a `.suffix`; a string is a
regex full-match; "all-linear" selects every linear layer except the output head. No match
raises `TargetError` listing close names; so does a list entry that matched nothing.
"""
from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Sequence

from torch import nn

from .delta import canonical_modules, innermost
from .errors import TargetError


def _is_conv1d(module: nn.Module) -> bool:
    """A GPT-2 style Conv1D (weight stored (in, out)). Its class is looked up, not imported: a
    model holding one has imported transformers' module already, and `import petkit` plus a
    method's config need not load transformers (seconds)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


Targets = str | Sequence[str] | None

# Architecture roles: where the usual delta placements sit, by `config.model_type`.
# A method's defaults name roles; adding an architecture is one row here.
_LLAMA = {
    "attn_qv": ["q_proj", "v_proj"], "attn_kv": ["k_proj", "v_proj"], "attn_out": ["o_proj"],
    "ffn_out": ["down_proj"], "ffn_in": ["down_proj"], "ffn": ["mlp"],
}
ROLES: dict[str, dict[str, list[str] | str]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": _LLAMA, "phi3": _LLAMA, "olmo": _LLAMA, "smollm3": _LLAMA,
    "bert": {
        "attn_qv": ["query", "value"], "attn_kv": ["key", "value"],
        "attn_out": ["attention.output.dense"], "ffn_out": r".*layer\.\d+\.output\.dense",
        "ffn_in": r".*layer\.\d+\.output\.dense", "ffn": r".*layer\.\d+\.output\.dense",
    },
    "gpt2": {
        "attn_qv": ["c_attn"], "attn_kv": ["c_attn"], "attn_out": ["attn.c_proj"],
        "ffn_out": ["mlp.c_proj"], "ffn_in": ["mlp.c_proj"], "ffn": ["mlp"],
    },
}
ROLES["roberta"] = ROLES["distilbert"] = ROLES["bert"]
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler.dense")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_in_by_out) of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1], True
    raise TargetError(f"expected a Linear or Conv1D layer, got {type(module).__name__}")


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def role_targets(model: nn.Module, *roles: str) -> Targets:
    """Default targets for the model's architecture by role; "all-linear" where unknown."""
    table = ROLES.get(model_type(model))
    if table is None:
        return "all-linear"
    found: list[str] = []
    for role in roles:
        entry = table[role]
        if isinstance(entry, str):
            if len(roles) == 1:
                return entry
            found.append(entry)  # regex joined below
        else:
            found.extend(entry)
    if any(e.startswith(".*") for e in found):  # mixed regex: join as one regex
        return "|".join(e if e.startswith(".*") else rf".*\.{re.escape(e)}" for e in found)
    return found


def output_head_paths(model: nn.Module, paths: Sequence[str], linear_paths: Sequence[str]) -> set[str]:
    """Paths of the output head(s): excluded from "all-linear"."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, outer, inner in canonical_modules(model):
        if out is not None and (outer is out or inner is out):
            heads.add(path)
        if any(path == h or path.endswith("." + h) for h in HEAD_NAMES) and path in linear_paths:
            heads.add(path)
    if not heads and linear_paths and not hasattr(model, "config"):
        heads.add(linear_paths[-1])  # plain module: its last linear layer is the head
    return heads


def match_targets(
    model: nn.Module,
    targets: Targets,
    *,
    accept: Callable[[nn.Module], bool] = is_linear,
    what: str = "Linear/Conv1D",
) -> list[str]:
    """Resolve `targets` to canonical module paths whose innermost module passes `accept`."""
    modules = {path: inner for path, _, inner in canonical_modules(model) if path}
    paths = list(modules)
    linear_paths = [p for p in paths if is_linear(modules[p])]
    if targets is None or (isinstance(targets, Sequence) and not isinstance(targets, str) and not targets):
        raise TargetError("no targets given: pass a list of module names, a regex or 'all-linear'")
    if targets == "all-linear":
        heads = output_head_paths(model, paths, linear_paths)
        found = [p for p in linear_paths if p not in heads]
        if not found:
            raise TargetError(f"'all-linear' found no linear layers in {type(model).__name__}")
        return found
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise TargetError(f"targets regex {targets!r} is invalid: {exc}") from None
        found = [p for p in paths if pattern.fullmatch(p) and accept(modules[p])]
        if not found:
            raise TargetError(
                f"targets regex {targets!r} matched no {what} module.{_close(targets, paths)}"
            )
    else:
        found = []
        for entry in targets:
            hits = [p for p in paths if p == entry or p.endswith("." + entry)]
            if not hits:
                raise TargetError(f"target {entry!r} matched no module.{_close(entry, paths)}")
            found.extend(h for h in hits if h not in found)
        found = [p for p in paths if p in found]  # model order
    wrong = [p for p in found if not accept(modules[p])]
    if wrong:
        kinds = sorted({type(modules[p]).__name__ for p in wrong})
        raise TargetError(
            f"targets matched {len(wrong)} module(s) this method cannot wrap (needs {what}; got "
            f"{', '.join(kinds)}), e.g. {wrong[0]!r}"
        )
    return found


def match_parameters(model: nn.Module, entries: Sequence[str]) -> dict[str, list[str]]:
    """Resolve parameter targets (`<module path>.<parameter>`, exactly or as a `.suffix`, e.g.
    "experts.gate_up_proj") to {canonical module path: its matched parameter names}, modules in
    model order and each module's names in the order it registered them (PEFT's nesting order)."""
    if isinstance(entries, str) or not entries:
        raise TargetError("parameter targets must be a non-empty list of names like 'experts.gate_up_proj'")
    found: dict[str, list[str]] = {}
    keys: list[str] = []
    for path, _, inner in canonical_modules(model):
        for pname, _ in inner.named_parameters(recurse=False):
            key = f"{path}.{pname}" if path else pname
            keys.append(key)
            if any(key == e or key.endswith("." + e) for e in entries):
                found.setdefault(path, []).append(pname)
    for entry in entries:
        if not any(k == entry or k.endswith("." + entry) for k in keys):
            raise TargetError(f"parameter target {entry!r} matched no parameter.{_close(entry, keys, 'Parameter')}")
    return found


def _close(entry: str, paths: Sequence[str], noun: str = "Module") -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths} | set(paths))
    close = difflib.get_close_matches(entry, leaves, n=5, cutoff=0.5)
    if not close:
        close = sorted({p.rsplit(".", 1)[-1] for p in paths})[:12]
        return f" {noun} names in this model include: {', '.join(close)}"
    return f" Close names: {', '.join(close)}"


def linear_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in, out, transposed) of the innermost Linear / Conv1D under `base`."""
    return linear_dims(innermost(base))
