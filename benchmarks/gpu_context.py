"""Long context: the longest sequence one LoRA training step fits on this GPU, petkit vs PEFT.

The 8B Llama shape of `gpu_train.py` (random bf16 weights, LoRA r16 on all 7 linear layers,
AdamW), batch 1, labels = inputs. For each library the sequence length doubles from `--start`
until a step fails, then bisects between the longest that fitted and the shortest that failed
(to `--resolution` of it, in multiples of `--granule` tokens), while `--budget` seconds last.
Every try is its own process with a time limit: an out-of-memory error ends that process, not
the probe. A try that runs out of time counts as not fitting, marked "timed out".

    petkit         pk.train: full activation checkpointing (eager), chunked loss,
                   --runtime.kernels=KERNELS (default fused: the fused delta; its note in the
                   row says which path ran)
    petkit-offload the same with activation_offload (saved block inputs in host memory)
    peft           PEFT LoRA, HF gradient checkpointing (non-reentrant), the model's dense loss
    peft-liger     the same after Liger's Llama patch (what LLaMA-Factory's enable_liger_kernel does)

tok/s is the last of `--steps` steps (the first allocates the optimiser state). Peak is
`torch.cuda.max_memory_allocated`.

    python benchmarks/gpu_context.py --json context.json                  # 8B, petkit and peft
    python benchmarks/gpu_context.py --smoke                              # tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_train import LR, SHAPES, TARGETS, build_model, child_row  # noqa: E402

LIBRARIES = ("petkit", "petkit-offload", "peft", "peft-liger")


def _sequence(shape: dict[str, int], seq: int, rows: int) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return list(torch.randint(0, shape["vocab"], (rows, seq), generator=gen))


def _petkit_try(args: argparse.Namespace, shape: dict[str, int]) -> dict[str, Any]:
    import torch

    import petkit as pk

    model = build_model(shape, args.device)
    torch.manual_seed(0)
    pk.attach(model, pk.LoraConfig(r=16, alpha=32, dropout=0.0, targets=TARGETS))
    data = [{"input_ids": row, "labels": row} for row in _sequence(shape, args.seq, args.steps)]
    runtime = pk.RuntimeConfig(device=args.device, precision="bf16",
                               activation_checkpointing="full", kernels=args.kernels,
                               activation_offload=args.library == "petkit-offload")
    result = pk.train(model, data, pk.TrainConfig(lr=LR, max_steps=args.steps, batch_size=1,
                                                  log_every=1, progress=False, runtime=runtime))
    return {"tok_s": result.tokens_per_s, "kernels": result.report.get("kernels", "")}


def _peft_try(args: argparse.Namespace, shape: dict[str, int]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    model = build_model(shape, args.device)
    if args.library == "peft-liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=args.device.startswith("cuda"))
    model.train()
    seconds = 0.0
    for row in _sequence(shape, args.seq, args.steps):
        ids = row[None].to(args.device)
        started = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        seconds = time.perf_counter() - started
    return {"tok_s": args.seq / seconds}


def one_try(args: argparse.Namespace) -> dict[str, Any]:
    """One training run of `args.library` at `args.seq` tokens in this process."""
    import torch

    shape = {**SHAPES[args.shape], "batch": 1, "seq": args.seq}
    run = _petkit_try if args.library.startswith("petkit") else _peft_try
    try:
        row = {"fits": True, **run(args, shape)}
    except torch.cuda.OutOfMemoryError:
        row = {"fits": False, "error": "out of memory"}
    if args.device.startswith("cuda"):
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def _launch(args: argparse.Namespace, library: str, seq: int, limit: float) -> dict[str, Any]:
    """One try in a fresh process; its JSON row, or why it gave none."""
    cmd = [sys.executable, os.path.abspath(__file__), "--try", "--library", library,
           "--seq", str(seq), "--shape", args.shape, "--device", args.device,
           "--steps", str(args.steps), "--kernels", args.kernels]
    started = time.perf_counter()
    row = child_row(cmd, limit)
    if "error" in row:
        row = {"fits": False, "error": row["error"][:200]}
    row.update(library=library, seq=seq, wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps(row), flush=True)
    return row


def _next_length(fit: int | None, fail: int | None, args: argparse.Namespace) -> int | None:
    """Double while nothing failed, halve while nothing fitted, else bisect; None: done."""
    if fail is None:
        nxt = args.start if fit is None else 2 * fit
        return nxt if nxt <= args.max else None
    if fit is None:
        nxt = fail // 2
        return nxt if nxt >= args.granule else None
    if fail - fit <= max(args.granule, args.resolution * fit):
        return None
    mid = (fit + fail) // 2 // args.granule * args.granule
    return mid if fit < mid < fail else None


def probe(args: argparse.Namespace, library: str, until: float) -> dict[str, Any]:
    """The longest length `library` fits, trying lengths while time is left before `until`."""
    fit, fail, tries = None, None, []
    while (seq := _next_length(fit, fail, args)) is not None:
        left = until - time.perf_counter()
        if left < args.min_try:
            break
        row = _launch(args, library, seq, min(args.try_timeout, left))
        tries.append(row)
        if row["fits"]:
            fit = seq
        else:
            fail = seq
    best = next((t for t in tries if t["fits"] and t["seq"] == fit), {})
    return {"library": library, "longest": fit, "shortest_failed": fail,
            "tok_s": best.get("tok_s"), "peak_gib": best.get("peak_gib"),
            "kernels": best.get("kernels", ""), "tries": tries}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=["petkit", "peft"])
    parser.add_argument("--start", type=int, default=16384, help="first length tried")
    parser.add_argument("--max", type=int, default=262144, help="longest length tried")
    parser.add_argument("--granule", type=int, default=1024, help="lengths are multiples of it")
    parser.add_argument("--resolution", type=float, default=0.125,
                        help="bisect until the gap is below this fraction of the longest fit")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--kernels", default="fused",
                        help="petkit's --runtime.kernels (its chunked loss holds no logits)")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds for the whole probe, shared equally by the libraries")
    parser.add_argument("--try-timeout", type=float, default=120.0, help="seconds per try")
    parser.add_argument("--min-try", type=float, default=25.0,
                        help="no try is started with less time than this left")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    parser.add_argument("--try", dest="one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # nothing runs out of memory on the CPU: --max ends the doubling
        args.shape, args.device, args.start, args.max, args.granule = "tiny", "cpu", 64, 256, 64
        args.min_try = 1.0
    return args


def main() -> None:
    """One try (`--try`), or the probe of every library, printed and written to --json."""
    args = parse()
    if args.one:
        print(json.dumps(one_try(args)))
        return
    began, results = time.perf_counter(), []
    share = args.budget / len(args.libraries)
    for i, library in enumerate(args.libraries):
        results.append(probe(args, library, began + share * (i + 1)))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump({"args": vars(args), "results": results}, out, indent=1)
    print(f"| {args.shape} shape, batch 1, LoRA r16 | longest fitting | first failing | "
          "tok/s there | peak GiB | kernels |\n|---|---:|---:|---:|---:|---|")
    for r in results:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] else "-"
        tok = f"{r['tok_s']:,.0f}" if r["tok_s"] else "-"
        print(f"| {r['library']} | {r['longest']} | {r['shortest_failed']} | {tok} | {peak} | "
              f"{r['kernels']} |")
    if args.smoke and any(r["longest"] is None for r in results):
        raise SystemExit("smoke: a library fitted no length")


if __name__ == "__main__":
    main()
