"""Load a pretrained model and its tokenizer for a task, and name its newly initialised head.

`load_model` accepts an embedded short name (see `EMBEDDED_MODELS`), a local Hugging Face folder or
a hub id (offline runs fail with a `PetkitError` listing the embedded names). For ``task="seq-cls"``
the classification head is new; `head_module_names` returns the modules whose weights were missing
from the checkpoint, so a trainer can make exactly those trainable alongside the delta.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from petkit.core.errors import ConfigError, PetkitError, did_you_mean
from petkit.models.embedded import EMBEDDED_MODELS, resolve_model
from petkit.models.packages import quiet_optional_imports

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS = ("causal-lm", "seq-cls", "base")
# Attribute set on a loaded model: the module paths that were newly initialised (its task head).
NEW_MODULES_ATTR = "_petkit_new_modules"
# Fallback for models petkit did not load itself: usual names of a sequence-classification head.
KNOWN_HEAD_NAMES = ("classifier", "score", "pre_classifier", "classification_head", "logits_proj")


def _auto_class(task: str) -> type:
    import transformers

    classes = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }
    if task not in classes:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    return classes[task]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings (its load report) off inside: a task head missing from the
    checkpoint is expected, and petkit reports what else it finds (`report_new_weights`)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def report_new_weights(name: str, new_modules: list[str], unexpected: object) -> None:
    """One warning for weights that are new although they are not a task head, and one for
    checkpoint weights the model did not use."""
    odd = [m for m in new_modules if m.split(".")[-1] not in KNOWN_HEAD_NAMES]
    if odd:
        warnings.warn(f"model {name!r}: newly initialised (not in the checkpoint): "
                      f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}", stacklevel=3)
    unused = sorted(unexpected or [])  # type: ignore[call-overload]
    if unused:
        warnings.warn(f"model {name!r}: {len(unused)} checkpoint weights unused, e.g. "
                      f"{', '.join(unused[:3])}", stacklevel=3)


def _not_found(name: str, path: str, cause: Exception) -> PetkitError:
    known = list(EMBEDDED_MODELS)  # image encoders too
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        return PetkitError(f"cannot load model {name!r}: folder {path!r} holds no Hugging Face "
                           f"model (no config.json); a model folder is what save_pretrained "
                           f"writes, or use an embedded model ({', '.join(known)})")
    if folder.is_dir():
        detail = " ".join(str(cause).split())
        return PetkitError(f"cannot load model {name!r} from folder {path!r}: {detail}")
    return PetkitError(
        f"cannot load model {name!r}{did_you_mean(name, known)}: it is not an embedded name "
        f"({', '.join(known)}), not a local folder, and not reachable on the hub "
        f"({type(cause).__name__}: {' '.join(str(cause).split())})"
    )


def load_model(
    name_or_path: str,
    *,
    task: str = "causal-lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for `task`; the tokenizer always has a pad token."""
    from transformers import AutoTokenizer

    auto = _auto_class(task)
    if task == "seq-cls" and (num_labels is None or num_labels < 1):
        raise ConfigError(f"task='seq-cls' needs num_labels >= 1, got {num_labels!r}")
    path = resolve_model(name_or_path)
    kwargs: dict[str, object] = {"dtype": dtype}
    if task == "seq-cls":
        kwargs["num_labels"] = num_labels
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # A new head starts the same on every load, so an adapter saved with it (its fingerprint
        # covers the head it replaces) loads again; the caller's RNG state is left as it was.
        quiet = quiet_transformers() if task == "seq-cls" else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), quiet, quiet_optional_imports():
            torch.manual_seed(0)
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise _not_found(name_or_path, path, err) from err
    decompress_loaded(model)  # an integer folder (EfficientQAT / RTN): weights readable before attach
    _ensure_pad(model, tokenizer)
    new_modules = _missing_modules(model, info.get("missing_keys", ())) if task == "seq-cls" else []
    if task == "seq-cls":
        report_new_weights(name_or_path, new_modules, info.get("unexpected_keys"))
    setattr(model, NEW_MODULES_ATTR, new_modules)
    model.eval()
    return model, tokenizer


def decompress_loaded(model: torch.nn.Module) -> torch.nn.Module:
    """Decompress, now, a model that transformers loaded from a compressed-tensors folder.

    Such a model keeps its quantised layers compressed (`weight` holds int8 codes) until its first
    forward, which a hook (`ct_decompress_hook`) decompresses to s ⊙ (q - z) in place. A wrapper
    attached before that forward would read the codes as weights (PEQA's grid from them was
    garbage: one label for every example), so loaders decompress at once. Other models: unchanged.
    """
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if getattr(model, "ct_decompress_hook", None) is not None and compressor is not None:
        compressor.decompress_model(model)  # removes the hook too
    return model


def _ensure_pad(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (eos, else unk) and tell the model its id."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError("tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    model.config.pad_token_id = tokenizer.pad_token_id


def _missing_modules(model: torch.nn.Module, missing_keys: object) -> list[str]:
    """Module paths owning the missing weights, lifted to a parent when all its weights are new."""
    missing = set(missing_keys)  # type: ignore[arg-type]
    owners = sorted({key.rpartition(".")[0] for key in missing if "." in key})
    lifted: set[str] = set()
    for owner in owners:
        path = owner
        while "." in path:
            parent = path.rpartition(".")[0]
            names = [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_parameters()]
            if not names or not all(n in missing for n in names):
                break
            path = parent
        lifted.add(path)
    # Keep only the outermost paths.
    return sorted(p for p in lifted if not any(p.startswith(q + ".") for q in lifted))


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the newly initialised task-head modules ("classifier", "score", ...).

    Uses what `load_model` / `tiny_model` recorded (weights missing from the checkpoint); for any
    other model, falls back to the usual head attribute names that the model has.
    """
    recorded = getattr(model, NEW_MODULES_ATTR, None)
    if recorded is not None:
        return list(recorded)
    children = dict(model.named_children())
    return [name for name in KNOWN_HEAD_NAMES if name in children]
