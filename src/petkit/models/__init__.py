"""Model loading for petkit: embedded offline defaults, local folders, hub ids, tiny test models."""

from petkit.models.embedded import EMBEDDED_MODELS, cache_root, resolve_model
from petkit.models.loading import head_module_names, load_model
from petkit.models.tiny import tiny_model

__all__ = [
    "EMBEDDED_MODELS",
    "cache_root",
    "head_module_names",
    "load_model",
    "resolve_model",
    "tiny_model",
]
