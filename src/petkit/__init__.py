"""petkit — parameter-efficient tuning of pretrained transformers on any torch.nn.Module.

    import petkit as pk
    model = pk.attach(model, pk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    pk.save_adapter(model, "out/adapter")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .core.errors import (
    AdapterLoadError,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    MissingPackageError,
    PetkitError,
    TargetError,
)
from .core.io import adapter_state, load_adapter, read_adapter, save_adapter
from .core.fold import fold
from .core.model import (
    activate,
    active_adapters,
    adapters,
    attach,
    detach,
    disabled,
    merge,
    set_trainable,
    summary,
    trainable_parameters,
    unload,
    unmerge,
)
from .core.registry import METHODS, MethodConfig, get_method, make_config, register
from .core.combine import merge_adapters
from .core.compose import adapter_weights, swap_adapter
from .core.controls import expert_load, set_rank
from .core.mixed import mixed_forward, mixed_generate
from . import methods as _methods  # noqa: F401 - registers every method

# pk.<Method>Config for every registered method (LoraConfig, AdapterConfig, ...)
globals().update({m.config_cls.__name__: m.config_cls for m in METHODS.values()})
from .methods.cola import save_links  # noqa: E402 - chain of LoRA: one adapter folder per link
_method_configs = [m.config_cls.__name__ for m in METHODS.values()]


def list_methods() -> list[tuple[str, str, str]]:
    """(name, family, paper) of every registered method."""
    return [(m.name, m.family, m.paper) for m in METHODS.values()]


def __getattr__(name: str):  # heavier layers load on first use
    if name in ("export_peft", "import_peft"):
        from .core import peft_interop

        return getattr(peft_interop, name)
    if name == "bench":  # the harness module, callable: pk.bench("grid.yaml", "runs/bench")
        import importlib  # not `from . import bench`: that asks this __getattr__ for "bench"

        return importlib.import_module(".bench", __name__)
    if name in ("train", "TrainConfig", "TrainResult", "evaluate", "replay_mezo"):
        import importlib  # not `from . import train`: that asks this __getattr__ for "train"

        return getattr(importlib.import_module(".train", __name__), name)
    raise AttributeError(f"module 'petkit' has no attribute {name!r}")


__all__ = [
    "AdapterLoadError", "bench", "AdapterStateError", "CheckpointError", "ConfigError", "MissingPackageError",
    "PetkitError", "TargetError", "METHODS", "MethodConfig", "activate", "active_adapters", "adapter_state",
    "adapters", "attach", "detach", "disabled", "export_peft", "fold", "get_method", "import_peft", "list_methods",
    "load_adapter", "make_config", "merge", "read_adapter", "register", "save_adapter", "set_trainable",
    "summary", "merge_adapters", "adapter_weights", "swap_adapter", "expert_load", "set_rank", "mixed_forward",
    "mixed_generate", "save_links", "train", "replay_mezo", "TrainConfig", "TrainResult", "evaluate", "trainable_parameters", "unload", "unmerge",
    *_method_configs,
]
