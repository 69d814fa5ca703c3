"""One file per method; importing this package imports (and so registers) every module in it.

`family/` holds machinery shared by several methods (virtual tokens, layer prompts, low-rank
factors, prompt initialisation, bias deltas); it registers nothing.
"""
import importlib
import pkgutil

from petkit.core.registry import METHODS

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "family":
        importlib.import_module(f"{__name__}.{_info.name}")


def method_configs() -> dict[str, type]:
    """{class name: config class} of every registered method (LoraConfig, AdapterConfig, ...)."""
    return {m.config_cls.__name__: m.config_cls for m in METHODS.values()}
