"""QLoRA on a GPU: petkit against PEFT + bitsandbytes on the same nf4 base, in one call.

Every case builds the random-weight Llama of `gpu_train.SHAPES` in bf16, quantises its linear
layers (not the head) to nf4 with bitsandbytes (`pk.quantize(model, "nf4")`: block 64, bf16
compute, as QLoRA), then trains LoRA r16 on the seven linear layers of each block:

  peft-qlora-ckpt          PEFT on the nf4 base, HF gradient checkpointing, eager: what
                           LLaMA-Factory's / TRL's QLoRA gives their users
  peft-qlora-blocks-ckpt   the same with each decoder layer compiled (PEFT's best mode elsewhere)
  petkit-qlora-selective   pk.train: compiled blocks, selective checkpointing
  petkit-qlora-fused       the same with `--runtime.kernels=fused` (the fused delta falls back on
                           the nf4 layers, saying why, where it cannot take them)
  petkit-qlora-elementwise-fp8-flce   compiled blocks, `elementwise` recompute, fp8 saved
                           activations, Liger's fused linear cross-entropy (gpu_train's suffixes)
  petkit-qlora-elementwise-fp8-flce-off25   the same with a quarter of the blocks' saved
                           activations in host memory (`activation_offload_fraction=0.25`)

`benchmarks/qlora_gpu.py` is the earlier, eager comparison (PEFT with
`prepare_model_for_kbit_training`, petkit with full checkpointing; README's QLoRA row); this one
puts each library in its fastest mode, through `gpu_train`'s own loops.

tok/s over the last `--window` steps, peak GPU memory after the base was quantised (the bf16 build
is not counted: both arms load a quantised checkpoint in real use). Each case in its own process.

    python benchmarks/gpu_qlora.py --shape 8b --out qlora.json
    python benchmarks/gpu_qlora.py --smoke        # tiny shape on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_train  # noqa: E402  (the shapes, the model builder and both libraries' loops)
from gpu_train_runs import run_cases  # noqa: E402  (each case in its own worker process)

CASES: dict[str, tuple[str, str, str, str]] = {  # library, compile, checkpointing, kernels
    "peft-qlora-ckpt": ("peft", "", "full", "none"),
    "peft-qlora-blocks-ckpt": ("peft", "blocks", "full", "none"),
    "petkit-qlora-selective": ("petkit", "blocks", "selective", "none"),
    "petkit-qlora-fused": ("petkit", "blocks", "selective", "fused"),
    "petkit-qlora-elementwise-fp8-flce": ("petkit", "blocks", "elementwise", "liger"),
    "petkit-qlora-elementwise-fp8-flce-off25": ("petkit", "blocks", "elementwise", "liger"),
    # the path before 2026-12-07: B-product out of place, no shared A-products (gpu_train's -copy)
    "petkit-qlora-elementwise-fp8-flce-copy": ("petkit", "blocks", "elementwise", "liger"),
}


def quantised_builder(build: Any) -> Any:
    """`build_model` followed by nf4 quantisation; the peak-memory counter starts after it."""
    def build_quantised(shape: dict[str, int], device: str) -> Any:
        import torch

        import petkit as pk

        model = build(shape, device)
        pk.quantize(model, "nf4", backend="bitsandbytes", compute_dtype=torch.bfloat16)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return model
    return build_quantised


def worker(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process."""
    import torch

    from petkit.core import accumulate
    from petkit.training import run_modes

    library, compiled, ckpt, kernels = CASES[case]
    accumulate.IN_PLACE = run_modes.SHARED_INPUT_LOWRANK = not case.endswith("-copy")
    gpu_train.build_model = quantised_builder(gpu_train.build_model)
    shape = gpu_train.SHAPES[args.shape]
    run = {"peft": gpu_train.peft_case, "petkit": gpu_train.petkit_case}[library]
    args.case = case  # gpu_train reads the -fp8 / -offNN suffixes from it
    row = run(args, shape, compiled, ckpt, kernels)
    cuda = args.device.startswith("cuda")
    row.pop("losses", None)
    return {"case": case, **row,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case in a fresh process under `--timeout`, within `--budget`."""
    def command(case: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--worker", case, "--shape", args.shape,
                "--device", args.device, "--steps", str(args.steps), "--window", str(args.window)]
    return run_cases(args.cases, args.budget, command, lambda case, left: min(args.timeout, left),
                     args.out, {"args": vars(args)}, min_left=30.0)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows; each case's tok/s and peak as ratios to PEFT's best (fastest) case."""
    done = [r for r in rows if "error" not in r]
    peft = max((r for r in done if r["case"].startswith("peft")), key=lambda r: r["tok_s"], default=None)
    lines = ["| case | tok/s | peak GiB | x PEFT best tok/s | x its peak | loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error'][:100]} | | | | |")
            continue
        x = (f"{r['tok_s'] / peft['tok_s']:.2f}", f"{r['peak_gib'] / peft['peak_gib']:.2f}") \
            if peft and peft["peak_gib"] else ("-", "-")
        lines.append(f"| {r['case']} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {x[0]} | {x[1]} | "
                     f"{r['loss']:.4f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", choices=sorted(gpu_train.SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per case")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all cases")
    parser.add_argument("--out", help="write the rows to this JSON file (after every case)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.steps, args.window = "tiny", "cpu", 4, 2
        args.timeout = args.budget = 1200.0
    args.curves = False  # gpu_train's loops read it
    return args


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = run_all(args)
    print(table(rows))


if __name__ == "__main__":
    main()
