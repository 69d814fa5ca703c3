"""Model loading for petkit: embedded offline defaults, local folders, hub ids, tiny test models.
Names load on first use, so `petkit.models.packages` (missing-package checks) costs no torch."""

from petkit.core.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["EMBEDDED_MODELS", "MODELS", "cache_root", "register_model", "resolve_model"],
                    "petkit.models.embedded"),
    **dict.fromkeys(["head_module_names", "load_model"], "petkit.models.loading"),
    "tiny_model": "petkit.models.tiny",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
