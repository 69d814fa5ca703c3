"""Scaling of `pk.train` over GPUs: DDP (1.1B) and FSDP2 (8B) on W GPUs against one, MeZO's traffic.

Random-weight Llama shapes in bf16 (the shapes of benchmarks/gpu_train.py), LoRA r16 (alpha 32)
on all 7 linear layers, fp32 deltas, per-GPU micro-batch `batch x seq` (so the global batch is
W x batch), AdamW; MeZO with its default settings. Each case runs under torchrun in its own
processes; every rank prints one JSON line and the launcher joins them. Throughput is global
input tokens per second over the last `--window` steps (rank 0's own shard rate times W: the
shards are equal); peak is `torch.cuda.max_memory_allocated` per rank; `delta sha256` is taken on
every rank after training, so "identical on both ranks" is a comparison of hashes.

    python benchmarks/distributed_scaling.py --cases ddp-1b fsdp-8b mezo-1b --gpus 1 2
    python benchmarks/distributed_scaling.py --cases ddp-tiny --gpus 1 2 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_train import SHAPES, TARGETS, build_model, examples, flops_per_token  # noqa: E402

# case: (shape, distributed mode, optimizer, compile: "" | "model" | "blocks", checkpointing)
CASES: dict[str, tuple[str, str, str, str, str]] = {
    "ddp-1b": ("1b", "ddp", "adamw", "blocks", "selective"),
    "ddp-1b-model": ("1b", "ddp", "adamw", "model", "selective"),
    "ddp-1b-eager": ("1b", "ddp", "adamw", "", "full"),
    "fsdp-8b": ("8b", "fsdp", "adamw", "", "full"),
    "mezo-1b": ("1b", "ddp", "mezo", "", "off"),
    "ddp-tiny": ("tiny", "ddp", "adamw", "", "full"),
    "ddp-tiny-blocks": ("tiny", "ddp", "adamw", "blocks", "selective"),
    "fsdp-tiny": ("tiny", "fsdp", "adamw", "", "full"),
    "mezo-tiny": ("tiny", "ddp", "mezo", "", "off"),
}
PEAK_TFLOPS = 989.0


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One rank of one case: build, attach, pk.train, report."""
    import torch

    import petkit as pk
    from petkit.training.distributed import full
    from petkit.training.ranks import init_from_env

    shape_name, mode, optimizer, compiled, ckpt = CASES[args.case]
    shape = dict(SHAPES[shape_name])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    init_from_env()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if args.device == "cuda" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    model = build_model(shape, device)
    torch.manual_seed(0)
    pk.attach(model, pk.LoraConfig(r=16, alpha=32, dropout=0.0, targets=TARGETS))
    steps = args.steps if optimizer == "adamw" else args.steps * 2
    config = pk.TrainConfig(lr=1e-3 if optimizer == "adamw" else 1e-6, max_steps=steps,
                            batch_size=shape["batch"] * world, optimizer=optimizer,
                            log_every=args.window, schedule="constant", device=device,
                            precision="bf16", compile=bool(compiled),
                            compile_scope=compiled or "model", activation_checkpointing=ckpt,
                            distributed=mode if world > 1 else "off", progress=False)
    data = examples({**shape, "batch": shape["batch"] * world})
    started = time.perf_counter()
    result = pk.train(model, data, config)
    wall = time.perf_counter() - started
    params = full(dict(pk.trainable_parameters(model)))  # FSDP2: gather the shards
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(params[name].detach().float().cpu().numpy().tobytes())
    tok_s = result.tokens_per_s * world
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return {"case": args.case, "gpus": world, "rank": rank, "tok_s": tok_s, "peak_gib": peak,
            "mfu_per_gpu": tok_s * flops_per_token(shape) / world / (PEAK_TFLOPS * 1e12),
            "loss": result.history[-1].get("train_loss"), "delta_sha256": digest.hexdigest()[:16],
            "report": {k: v for k, v in result.report.items() if "byte" in k or k == "mode"},
            "wall_s": round(wall, 1)}


def launch(args: argparse.Namespace, case: str, gpus: int) -> list[dict[str, Any]]:
    """torchrun one case on `gpus` processes; the ranks' rows."""
    folder = tempfile.mkdtemp(prefix=f"{case}-{gpus}-")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", os.path.abspath(__file__),
           "--worker", "--case", case, "--steps", str(args.steps), "--window", str(args.window),
           "--device", args.device, "--out", folder]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"),
         os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "4"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"case": case, "gpus": gpus, "error": f"timed out after {args.timeout} s"}]
    rows = [json.loads(open(os.path.join(folder, name), encoding="utf-8").read())
            for name in sorted(os.listdir(folder))]
    if done.returncode != 0 or len(rows) != gpus:
        print(done.stderr[-4000:], file=sys.stderr)
        return rows or [{"case": case, "gpus": gpus,
                         "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (case, gpus) with rank 0's figures, the max peak over ranks."""
    lines = ["| case | GPUs | tok/s | x vs 1 GPU | efficiency | peak GiB per GPU | MFU per GPU | "
             "loss | delta identical on ranks | bytes/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    one: dict[str, float] = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        for gpus in sorted({r["gpus"] for r in rows if r["case"] == case}):
            group = [r for r in rows if r["case"] == case and r["gpus"] == gpus]
            head = next((r for r in group if r.get("rank", 0) == 0), group[0])
            if "error" in head:
                lines.append(f"| {case} | {gpus} | failed: {head['error'][:90]} |||||||")
                continue
            if gpus == 1:
                one[case] = head["tok_s"]
            speedup = head["tok_s"] / one[case] if case in one else float("nan")
            same = len({r["delta_sha256"] for r in group}) == 1 and len(group) == gpus
            lines.append(f"| {case} | {gpus} | {head['tok_s']:,.0f} | {speedup:.2f} | "
                         f"{speedup / gpus:.0%} | {max(r['peak_gib'] for r in group):.2f} | "
                         f"{head['mfu_per_gpu']:.1%} | {head['loss']:.4f} | {'yes' if same else 'NO'} | "
                         f"{json.dumps(head.get('report', {}))} |")
    return "\n".join(lines)


def main() -> None:
    """Run (or, with --worker, be one rank of) the asked-for cases on 1..N GPUs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["ddp-1b", "fsdp-8b", "mezo-1b"],
                        choices=list(CASES))
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=420.0)
    parser.add_argument("--json", help="write all rows here (after every case)")
    parser.add_argument("--case", choices=list(CASES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one file per rank: ranks' stdout lines interleave
        row = worker(args)
        with open(os.path.join(args.out, f"rank-{row['rank']}.json"), "w", encoding="utf-8") as f:
            json.dump(row, f)
        return
    rows: list[dict[str, Any]] = []
    for case in args.cases:
        for gpus in args.gpus:
            started = time.perf_counter()
            got = launch(args, case, gpus)
            for row in got:
                row.setdefault("launch_s", round(time.perf_counter() - started, 1))
                print(json.dumps(row), flush=True)
            rows += got
            if args.json:
                with open(args.json, "w", encoding="utf-8") as out:
                    json.dump({"args": vars(args), "rows": rows}, out, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
