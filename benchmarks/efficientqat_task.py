"""E2E-QP + PEQA on rotten-tomatoes over an EfficientQAT folder, in the compressed table's protocol.

    petkit quantize --method efficientqat --bits int4 --group-size 128 --output runs/q4/
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/efficientqat_task.py runs/q4/ --seeds 0 --out runs/eqat_task.jsonl

The decoder setting of benchmarks/compressed.py (smollm2-135m, verbaliser, 128 training examples,
2 epochs of batch 16, 300 test examples, max length 64): the same recipe with the model replaced
by the quantised folder and the method by PEQA (no bits / group given: the folder's own grid, so
only its step sizes train, end to end on the task), at PEQA int4's rate there (3e-4, chosen on
held-out training examples; docs/compressed.md). Compare with that table's lora-fp32 and peqa-int4
(RTN + PEQA) rows, same seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_table import recipe  # noqa: E402


def run(folder: str, seed: int, lr: float) -> dict[str, object]:
    """Test accuracy of E2E-QP (PEQA over the folder's grid) with this seed."""
    import petkit as pk
    from petkit.app.pipeline import prepare, test_metrics
    from petkit.training import train

    rec = recipe("decoder", "peqa")
    rec = dataclasses.replace(rec, model=dataclasses.replace(rec.model, name=folder), method={"name": "peqa"},
                              train=rec.train.replace(lr=lr, seed=seed))
    torch.manual_seed(seed)
    prep, _ = prepare(rec)
    model = pk.attach(prep.model, pk.PeqaConfig())
    trainable = sum(p.numel() for p in pk.trainable_parameters(model).values())
    result = train(model, prep.train, rec.train.replace(label_token_ids=prep.label_token_ids), pad_id=prep.pad_id)
    return {"folder": folder, "seed": seed, "lr": lr, "steps": result.steps, "trainable": trainable,
            "accuracy": test_metrics(prep, rec)["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in (int(s) for s in args.seeds.split(",")):
        row = run(args.folder, seed, args.lr)
        print(json.dumps(row), flush=True)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
