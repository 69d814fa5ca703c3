"""One DP step of the dp-lora recipe, looked at (docs/privacy.md): CPU time of its per-example
gradients with and without length chunks, and how its signal compares with its noise.

    OMP_NUM_THREADS=1 python benchmarks/dp_step_probe.py --rows 256

MiniLM-L6 + a new rotten-tomatoes head, LoRA r 1 on layer 5's value (the dp-lora recipe), one
collated batch of `--rows` training examples padded to its longest row: `per_example_grads` over
the whole batch (what a DP step did before) against `by_length` chunks of 32 rows, each cut to its
longest row (what it does now); the clipped sums are compared too. Then: each trainable tensor's
share of the per-example gradient norm, the norm of the mean clipped gradient (the signal of a
step, at C = 1), and the norm of the noise added to that mean at the recipe's epsilon 8 for a
step of 512 of 4,000 examples, sigma x C x sqrt(d) / 512.
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
    signal_vs_noise(model, params, loss_fn, batch)


def signal_vs_noise(model, params, loss_fn, batch) -> None:  # type: ignore[no-untyped-def]
    """Per-tensor shares of the per-example norms; mean clipped gradient against the noise."""
    from petkit.training.dp import DPConfig, noise_multiplier, per_example_grads

    grads, _ = per_example_grads(model, params, loss_fn, batch)
    flat = [g.reshape(g.shape[0], -1) for g in grads]
    norms = torch.sqrt(sum(f.pow(2).sum(1) for f in flat))
    factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    print(f"per-example gradient norm: median {float(norms.median()):.3f}, min {float(norms.min()):.3f}")
    for name, f in zip(params, flat):
        mean = (factor[:, None] * f).mean(0)
        print(f"  {name} {f.shape[1]} coords: share of the example's norm "
              f"{float((f.norm(dim=1) / norms).mean()):.3f}, mean clipped gradient norm {float(mean.norm()):.4f}")
    signal = torch.sqrt(sum((factor[:, None] * f).mean(0).pow(2).sum() for f in flat))
    d = sum(f.shape[1] for f in flat)
    sigma = noise_multiplier(DPConfig(), 512 / 4000, 24)
    print(f"mean clipped gradient norm {float(signal):.4f}; noise on the mean at sigma {sigma:.3f}, "
          f"B 512, d {d}: {sigma * d ** 0.5 / 512:.4f}")


if __name__ == "__main__":
    main()
