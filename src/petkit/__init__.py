"""petkit — parameter-efficient tuning of pretrained transformers on any torch.nn.Module.

    import petkit as pk
    model = pk.attach(model, pk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    pk.save_adapter(model, "out/adapter")

This module is the public facade: plain re-exports and nothing else. Nothing inside the package
imports it (tests/test_layers.py fails on any import from a lower layer to a higher one).
"""
from __future__ import annotations

from petkit.benchmark import BenchReport
from petkit.benchmark import run as bench
from petkit.continual import run_continual as continual
from petkit.compress import PruneConfig, finish_pruning, merge_dense, merge_quantized, quantization_info, quantize, start_pruning
from petkit.core.adapter_merge import merge_adapters
from petkit.core.capabilities import expert_load, set_rank
from petkit.core.errors import (
    AdapterLoadError,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    MissingPackageError,
    PetkitError,
    TargetError,
)
from petkit.core.fold import fold
from petkit.core.io import adapter_state, load_adapter, read_adapter, save_adapter, swap_adapter
from petkit.core.mixed_batch import mixed_forward, mixed_generate
from petkit.core.model import (
    activate,
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
from petkit.core.peft_interop import export_peft, import_peft
from petkit.core.registry import METHODS, MethodConfig, get_method, list_methods, make_config, register
from petkit.core.stacking import adapter_weights
from petkit.core.state import active_adapters, adapters
from petkit.core.version import __version__
from petkit.hybrid import port_adapter, train_preference, transfer_adapter
from petkit.methods import method_configs
from petkit.methods.cola import save_links
from petkit.training import TrainConfig, TrainResult, evaluate, replay_mezo, train

# pk.<Method>Config for every registered method (LoraConfig, AdapterConfig, ...)
globals().update(method_configs())

__all__ = [
    "PruneConfig", "finish_pruning", "merge_dense", "merge_quantized", "quantization_info", "quantize", "start_pruning",
    "METHODS", "AdapterLoadError", "AdapterStateError", "BenchReport", "CheckpointError", "ConfigError",
    "MethodConfig", "MissingPackageError", "PetkitError", "TargetError", "TrainConfig", "TrainResult",
    "__version__", "activate", "active_adapters", "adapter_state", "adapter_weights", "adapters", "attach",
    "bench", "continual", "detach", "disabled", "evaluate", "expert_load", "export_peft", "fold", "get_method",
    "import_peft", "list_methods", "load_adapter", "make_config", "merge", "merge_adapters", "mixed_forward",
    "mixed_generate", "read_adapter", "register", "replay_mezo", "save_adapter", "save_links", "set_rank",
    "set_trainable", "summary", "swap_adapter", "train", "trainable_parameters", "unload", "unmerge",
    "port_adapter", "train_preference", "transfer_adapter",
    *method_configs(),
]
