"""CPU time of one DP step's per-example gradients, with and without length chunks (docs/privacy.md).

    OMP_NUM_THREADS=1 python benchmarks/dp_chunk_timing.py --rows 256

MiniLM-L6 + a new rotten-tomatoes head, LoRA r 1 on layer 5's value (the dp-lora recipe), one
collated batch of `--rows` training examples padded to its longest row: `per_example_grads` over
the whole batch (what a DP step did before) against `by_length` chunks of 32 rows, each cut to its
longest row (what it does now); the clipped sums are compared too.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import petkit as pk
    from petkit.app.pipeline import method_config, prepare
    from petkit.app.recipe import apply_overrides, load_recipe
    from petkit.data.encode import collate
    from petkit.training.dp import by_length, clipped_sum, per_example_grads

    recipe = apply_overrides(load_recipe("dp-lora"), {"data.train_size": str(args.rows),
                                                      "data.test_size": "8"})
    torch.manual_seed(0)
    prep, _ = prepare(recipe)
    pk.attach(prep.model, method_config(recipe, prep))
    model = prep.model.eval()  # no dropout: both ways see the same function
    params = dict(pk.trainable_parameters(model))
    batch = collate(prep.train, prep.pad_id)

    def loss_fn(b: dict) -> torch.Tensor:
        return model(**b).loss

    sums = {}
    for name, chunks in (("whole batch", [batch]), ("length chunks", by_length(batch))):
        start = time.process_time()
        parts = [clipped_sum(per_example_grads(model, params, loss_fn, c)[0], 1.0) for c in chunks]
        sums[name] = [sum(p[i] for p in parts) for i in range(len(params))]
        widths = sorted({c["input_ids"].shape[1] for c in chunks})
        print(f"{name}: {time.process_time() - start:.1f} CPU-s for {args.rows} rows, padded widths {widths}")
    gap = max(float((a - b).abs().max()) for a, b in zip(*sums.values()))
    print(f"largest difference of the clipped sums: {gap:.2e}")


if __name__ == "__main__":
    main()
