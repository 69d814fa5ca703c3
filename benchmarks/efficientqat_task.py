"""Why the EfficientQAT int4 model lost rotten-tomatoes' zero-shot signal (docs/compressed.md).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/efficientqat_task.py --out runs/eqat_zero_shot.jsonl \
        --save runs

Zero-shot verbaliser accuracy of SmolLM2-135M on the decoder protocol's *validation* split (200
held-out training examples of rotten-tomatoes, the ones the learning rates are chosen on; the
test split is not read) for: fp32, RTN int4 g128, Block-AP only (`--e2e-steps 0`) and Block-AP +
E2E-QP on the calibration text (the `petkit quantize` default), one model after the other. Per
model: accuracy, the share of examples predicted "positive", the mean logits of the two label
words at the verbaliser position and their margin, and whether the output head is still the
(tied) fp32 embedding matrix. `--save DIR` also writes the two EfficientQAT models as
compressed-tensors folders (DIR/eqat-ap-int4-g128, DIR/eqat-int4-g128) and scores each reloaded
with PEQA attached at its initialisation (the task arms' starting point), so the save / load /
PEQA path is checked against the in-memory model. One JSON line per model, written as measured.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from methods_table import recipe  # noqa: E402

from petkit.cli_quantize import _texts  # noqa: E402
from petkit.compress import quantize  # noqa: E402
from petkit.compress.efficientqat import QatConfig, block_ap, e2e_qp  # noqa: E402
from petkit.compress.qformat import attach_scheme, save_quantized, text_windows  # noqa: E402
from petkit.training.batching import eval_batches  # noqa: E402
from petkit.training.evaluate import resolve_collate  # noqa: E402
from petkit.training.objectives import Verbaliser  # noqa: E402


def validation_recipe(model: Any = None) -> Any:
    """The decoder protocol with 200 training examples held out (what `--select-lr --val 200` uses)."""
    rec = recipe("decoder", "lora")
    data = dataclasses.replace(rec.data, train_size=rec.data.train_size + 200, validation_size=200)
    return dataclasses.replace(rec, data=data, **({"model": model} if model is not None else {}))


def label_scores(model: nn.Module, prep: Any) -> dict[str, Any]:
    """Accuracy and the label words' logits at the verbaliser position over the validation split."""
    verbaliser = Verbaliser(prep.label_token_ids)
    scores, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(prep.validation, 16, resolve_collate(prep.collate, prep.pad_id)):
            scores.append(verbaliser.class_logits(model, batch))
            labels.append(batch["labels"])
    s, y = torch.cat(scores), torch.cat(labels)
    margin = s[:, 1] - s[:, 0]
    return {"accuracy": float((s.argmax(1) == y).float().mean()), "predicted_positive": float((margin > 0).float().mean()),
            "logit_negative": float(s[:, 0].mean()), "logit_positive": float(s[:, 1].mean()),
            "margin_mean": float(margin.mean()), "margin_std": float(margin.std()), "size": len(y)}


def head_state(model: nn.Module, fp32_head: torch.Tensor) -> dict[str, bool]:
    """Is the output head still tied to the input embeddings, and equal to the fp32 model's?"""
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return {"head_tied": head is embed or head.data_ptr() == embed.data_ptr(),
            "head_equal_fp32": bool(torch.equal(head.detach().float(), fp32_head))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", help="folder for the two EfficientQAT int4 models (then reloaded + PEQA)")
    parser.add_argument("--seed", type=int, default=0, help="calibration windows / Block-AP order")
    parser.add_argument("--reload-only", action="store_true", help="only score the --save folders, reloaded + PEQA")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from petkit.app.pipeline import prepare

    prep, _ = prepare(validation_recipe())
    fp32 = prep.model
    fp32_head = fp32.get_output_embeddings().weight.detach().float().clone()

    def record(arm: str, model: nn.Module, started: float, **extra: Any) -> None:
        row = {"arm": arm, **label_scores(model, prep), **head_state(model, fp32_head),
               "seconds": round(time.perf_counter() - started, 1), "label_token_ids": prep.label_token_ids, **extra}
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if args.reload_only:
        return score_folders({"block-ap": f"{args.save}/eqat-ap-int4-g128",
                              "block-ap+e2e-qp": f"{args.save}/eqat-int4-g128"}, record)
    record("fp32", fp32, time.perf_counter())
    started = time.perf_counter()
    record("rtn-int4-g128", quantize(copy.deepcopy(fp32), "int4", method="rtn", group_size=128), started)
    calibration = text_windows(prep.tokenizer, _texts("bbc-news")[0], 128, 32, args.seed)
    config = QatConfig(seed=args.seed)
    qat, started = copy.deepcopy(fp32), time.perf_counter()
    grids = block_ap(qat, calibration, config)
    record("block-ap", qat, started, seed=args.seed)
    folders = {}
    if args.save:
        folders["block-ap"] = save_folder(qat, grids, config, f"{args.save}/eqat-ap-int4-g128", prep.tokenizer)
    started = time.perf_counter()
    grids = e2e_qp(qat, grids, calibration, config)
    record("block-ap+e2e-qp", qat, started, seed=args.seed, e2e_steps=config.e2e_steps, e2e_lr=config.e2e_lr)
    if args.save:
        folders["block-ap+e2e-qp"] = save_folder(qat, grids, config, f"{args.save}/eqat-int4-g128", prep.tokenizer)
    del qat
    score_folders(folders, record)


def score_folders(folders: dict[str, Any], record: Any) -> None:
    """The task arms' start: each folder loaded as `petkit train --model DIR` does, PEQA at init."""
    import petkit as pk
    from petkit.app.pipeline import prepare
    from petkit.app.recipe import ModelSpec

    for arm, folder in folders.items():
        started = time.perf_counter()
        loaded, _ = prepare(validation_recipe(ModelSpec(str(folder))))
        pk.attach(loaded.model, pk.PeqaConfig())
        record(f"{arm} (folder + peqa)", loaded.model, started, folder=str(folder))


def save_folder(model: nn.Module, grids: dict, config: QatConfig, folder: str, tokenizer: Any) -> Path:
    """The model as `petkit quantize` writes it (a copy gets the scheme; the caller's stays plain)."""
    saved = copy.deepcopy(model)
    attach_scheme(saved, grids, config.bits, config.group_size)
    return save_quantized(saved, folder, tokenizer)


if __name__ == "__main__":
    main()
