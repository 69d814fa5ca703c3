"""petkit — parameter-efficient tuning of pretrained transformers on any torch.nn.Module.

    import petkit as pk
    model = pk.attach(model, pk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    pk.save_adapter(model, "out/adapter")

This module is the public facade: names and where they live, nothing else. Each name is imported
on first use, so `import petkit` (and `petkit --help`) loads no regime, and not even torch, until
a name needs it. `pk.<Method>Config` is looked up in the method registry (LoraConfig,
AdapterConfig, ...). Nothing inside the package imports this module (tests/test_layers.py fails
on any import from a lower layer to a higher one).
"""
from __future__ import annotations

from petkit.core.lazy import lazy_exports
from petkit.core.version import __version__

# public name -> "module" (same name there) or "module:attribute"
_EXPORTS = {
    "__version__": "petkit.core.version",
    "BenchReport": "petkit.benchmark", "bench": "petkit.benchmark:run",
    "continual": "petkit.continual.run:run_continual",
    **dict.fromkeys(["PruneConfig", "finish_pruning", "merge_dense", "merge_quantized",
                     "quantization_info", "quantize", "start_pruning", "save_quantized",
                     "load_quantized"], "petkit.compress"),
    "merge_adapters": "petkit.core.adapter_merge",
    **dict.fromkeys(["expert_load", "set_rank"], "petkit.core.capabilities"),
    **dict.fromkeys(["AdapterLoadError", "AdapterStateError", "CheckpointError", "ConfigError",
                     "MissingPackageError", "PetkitError", "TargetError"], "petkit.core.errors"),
    "fold": "petkit.core.fold",
    "initialize": "petkit.core.initialize",
    "loftq": "petkit.models.loftq",
    **dict.fromkeys(["adapter_state", "load_adapter", "read_adapter", "save_adapter",
                     "swap_adapter"], "petkit.core.io"),
    **dict.fromkeys(["mixed_forward", "mixed_generate"], "petkit.core.mixed_batch"),
    **dict.fromkeys(["activate", "attach", "detach", "disabled", "merge", "set_trainable",
                     "summary", "trainable_parameters", "unload", "unmerge"], "petkit.core.model"),
    **dict.fromkeys(["export_peft", "import_peft"], "petkit.core.peft_interop"),
    **dict.fromkeys(["METHODS", "MethodConfig", "get_method", "list_methods", "make_config",
                     "register"], "petkit.core.registry"),
    "adapter_weights": "petkit.core.stacking",
    **dict.fromkeys(["active_adapters", "adapters"], "petkit.core.state"),
    **dict.fromkeys(["port_adapter", "train_preference", "transfer_adapter"], "petkit.hybrid"),
    "save_links": "petkit.methods.cola",
    "DPConfig": "petkit.training.dp",
    **dict.fromkeys(["RuntimeConfig", "TrainConfig", "TrainResult", "evaluate", "replay_mezo",
                     "train"], "petkit.training"),
}


# pk.<Method>Config for every registered method (LoraConfig, AdapterConfig, ...) comes from
# the method registry, asked only for a name the table lacks.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, more="petkit.methods:method_configs",
                                    more_suffix="Config")
