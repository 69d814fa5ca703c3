"""One LoRA layer's forward + backward, timed alone: the eager products, petkit's torch fused
function (`fused_delta.FusedLowRank`) and petkit's Triton kernel (`triton_delta`), at the linear
layers' shapes of the 1.1B and 8B Llama cases of `gpu_train.py` (r 16, bf16 base, fp32 A and B,
scale 2; `--dropout P` adds LoRA dropout, which the torch fused function does not take).

Each row: the median wall time of one forward + backward (dx, dA, dB) over `--iters` runs after
`--warmup` (the Triton kernel autotunes in the warm-up), CUDA events, and each path's speed-up
over eager. This is where `kernels.AUTO_DELTA` is decided per layer; `gpu_train.py` gives the
end-to-end step.

    python benchmarks/gpu_delta_kernels.py                   # both shapes' layers
    python benchmarks/gpu_delta_kernels.py --dropout 0.05
    TRITON_INTERPRET=1 python benchmarks/gpu_delta_kernels.py --smoke   # CPU: tiny, checks it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# (name, tokens, in, out): the 7 linear layers' distinct shapes, batch x sequence tokens
LAYERS = {"1b": [("q/o", 8192, 2048, 2048), ("k/v", 8192, 2048, 256),
                 ("gate/up", 8192, 2048, 5632), ("down", 8192, 5632, 2048)],
          "8b": [("q/o", 8192, 4096, 4096), ("k/v", 8192, 4096, 1024),
                 ("gate/up", 8192, 4096, 14336), ("down", 8192, 14336, 4096)],
          "tiny": [("tiny", 40, 64, 96)]}
RANK, SCALE = 16, 2.0


def eager(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          dropout: float) -> torch.Tensor:
    """PEFT's and petkit's eager LoRA: three GEMMs, dropout on the delta's input."""
    xd = F.dropout(x, dropout) if dropout else x
    return F.linear(x, w) + SCALE * F.linear(F.linear(xd, a.to(x.dtype)), b.to(x.dtype))


def torch_fused(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                dropout: float) -> torch.Tensor:
    from petkit.training.fused_delta import FusedLowRank

    return FusedLowRank.apply(x, torch.cat([w, a.detach().to(w.dtype)]), a, b, SCALE)


def triton_kernel(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  dropout: float) -> torch.Tensor:
    from petkit.training.triton_delta import lowrank_linear

    return lowrank_linear(x, w, a, b, SCALE, dropout)


PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": eager, "torch-fused": torch_fused, "triton": triton_kernel}


def time_path(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], dropout: float,
              warmup: int, iters: int) -> float:
    """Median seconds of one forward + backward of `fn`."""
    x, w, a, b = inputs
    dy = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    cuda = x.device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        for t in (x, a, b):
            t.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        fn(x, w, a, b, dropout).backward(dy)
        if cuda:
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            elapsed = time.perf_counter() - began
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def layer_row(name: str, tokens: int, in_f: int, out_f: int, args: argparse.Namespace
              ) -> dict[str, Any]:
    """Every path on one layer shape; seconds and speed-ups over eager."""
    gen = torch.Generator(device=args.device).manual_seed(0)
    kw = {"device": args.device, "generator": gen}
    dtype = torch.float32 if args.smoke else torch.bfloat16
    x = torch.randn(tokens, in_f, **kw).to(dtype).requires_grad_(True)
    w = (torch.randn(out_f, in_f, **kw) / in_f**0.5).to(dtype)
    a = (torch.randn(RANK, in_f, **kw) / in_f**0.5).requires_grad_(True)
    b = (torch.randn(out_f, RANK, **kw) / 4).requires_grad_(True)
    row: dict[str, Any] = {"layer": name, "tokens": tokens, "in": in_f, "out": out_f}
    for path, fn in PATHS.items():
        if path == "torch-fused" and args.dropout:
            continue  # it keeps dropout layers on their own (eager) forward
        try:
            row[path] = time_path(fn, (x, w, a, b), args.dropout, args.warmup, args.iters)
        except Exception as err:  # a path that cannot run here: say why, keep the others
            row[path] = f"failed: {type(err).__name__}: {str(err)[:120]}"
    for path in PATHS:
        if isinstance(row.get(path), float) and isinstance(row["eager"], float):
            row[f"x {path}"] = row["eager"] / row[path]
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"one LoRA layer, forward + backward, r {RANK}, bf16, dropout {args.dropout}; "
            f"median of {args.iters} (ms; x: speed-up over eager)")
    lines = [head, "", "| layer | tokens x in -> out | eager | torch fused | triton | "
             "x torch fused | x triton |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        def ms(key: str) -> str:
            value = r.get(key, "-")
            return f"{value * 1e3:.3f}" if isinstance(value, float) else str(value)[:40]

        def x(key: str) -> str:
            return f"{r[key]:.2f}" if key in r else "-"

        lines.append(f"| {r['layer']} | {r['tokens']} x {r['in']} -> {r['out']} | {ms('eager')} "
                     f"| {ms('torch-fused')} | {ms('triton')} | {x('x torch-fused')} | "
                     f"{x('x triton')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(LAYERS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fp32 shape on the CPU (Triton's interpreter: TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.device, args.warmup, args.iters = ["tiny"], "cpu", 1, 2
    rows = [layer_row(*layer, args) for shape in args.shapes for layer in LAYERS[shape]]
    print(table(rows, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"args": vars(args), "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
