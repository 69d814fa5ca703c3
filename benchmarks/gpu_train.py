"""LoRA training on a GPU: PEFT's modes against petkit through `pk.train`, side by side.

Random-weight Llama shapes in bf16, LoRA r16 (alpha 32, no dropout) on all 7 linear layers,
fused AdamW (lr 1e-3, linear decay, grad-norm clip 1.0), causal-LM loss on every token, the same
64 seeded sequences in petkit's seeded epoch order for every case. Each case runs in its own
process. Throughput is input tokens over the wall time of the last 10 steps (after compilation);
peak is `torch.cuda.max_memory_allocated` over the whole process; the loss is the mean training
loss of the last 10 steps. MFU counts the useful work of a LoRA step, 4 N + 12 L s d FLOPs per token
(forward 2N, input gradients 2N, attention forward + backward; recompute not counted), against
989 TFLOP/s (H200 dense bf16). `petkit-bare-*` runs petkit's layers and modes in a plain loop
(no `pk.train`): the loop's own cost is pk.train's time over it.

    python benchmarks/gpu_train.py --shape 1b            # all 1.1B cases
    python benchmarks/gpu_train.py --shape 8b --cases peft-compile-ckpt petkit-compile-ckpt
    python benchmarks/gpu_train.py --smoke --cases petkit-blocks-selective-fused   # CPU check
    python benchmarks/gpu_train.py --shape 1b --steps 50 --curves --cases petkit-blocks-selective \
        petkit-blocks-selective-fused petkit-blocks-selective-triton   # loss curves vs the first
    bash benchmarks/gpu_kernels.sh OUT    # the fused-kernel cases and the context probe, one call

`--curves` keeps every step's loss (pk.train logging every step) and compares each case's curve
with the first case's: the largest relative gap over the steps (goal: within 0.5%).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from gpu_train_runs import child_row  # noqa: F401  (gpu_context.py takes it from here)
from gpu_train_runs import (curve_gaps, curves_table, run_all, smoke_failures, table, timed_loop,
                            window_row)

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv=2, batch=2, seq=64),
    "1b": dict(vocab=32000, hidden=2048, inter=5632, layers=22, heads=32, kv=4, batch=8, seq=1024),
    "8b": dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv=8, batch=4,
               seq=2048),
}
# case: (library, compile: "" eager | "model" one graph | "blocks" each block, checkpointing or
# "budget-F": no checkpointing, the compiler keeps at most F of the activations, kernels:
# `--runtime.kernels` for petkit ("liger" with the pieces of LIGER_PIECES; "fused2": "fused" with
# the forward's two products as two GEMMs, `fused_delta.ONE_GEMM_FORWARD`; "triton": the fused
# delta on petkit's Triton kernel, `triton_delta`), for PEFT "liger" is
# Liger's own Llama patch, as LLaMA-Factory's `enable_liger_kernel` applies it)
CASES: dict[str, tuple[str, str, str, str]] = {
    "peft-eager": ("peft", "", "off", "none"),
    "peft-ckpt": ("peft", "", "full", "none"),
    "peft-compile-ckpt": ("peft", "model", "full", "none"),
    "peft-blocks-ckpt": ("peft", "blocks", "full", "none"),
    "peft-liger-ckpt": ("peft", "", "full", "liger"),
    "peft-liger-blocks-ckpt": ("peft", "blocks", "full", "liger"),
    "petkit-eager": ("petkit", "", "off", "none"),
    "petkit-ckpt": ("petkit", "", "full", "none"),
    "petkit-compile": ("petkit", "model", "off", "none"),
    "petkit-compile-ckpt": ("petkit", "model", "full", "none"),
    "petkit-compile-selective": ("petkit", "model", "selective", "none"),
    "petkit-compile-every2": ("petkit", "model", "every-2", "none"),
    "petkit-blocks": ("petkit", "blocks", "off", "none"),
    "petkit-blocks-ckpt": ("petkit", "blocks", "full", "none"),
    "petkit-blocks-selective": ("petkit", "blocks", "selective", "none"),
    "petkit-blocks-elementwise": ("petkit", "blocks", "elementwise", "none"),
    "petkit-blocks-budget50": ("petkit", "blocks", "budget-0.5", "none"),
    "petkit-blocks-budget35": ("petkit", "blocks", "budget-0.35", "none"),
    "petkit-blocks-budget20": ("petkit", "blocks", "budget-0.2", "none"),
    "petkit-blocks-selective-fused": ("petkit", "blocks", "selective", "fused"),
    "petkit-blocks-selective-fused2": ("petkit", "blocks", "selective", "fused2"),
    "petkit-blocks-selective-flce": ("petkit", "blocks", "selective", "liger"),
    "petkit-blocks-selective-fused-flce": ("petkit", "blocks", "selective", "fused,liger"),
    "petkit-blocks-budget35-fused-flce": ("petkit", "blocks", "budget-0.35", "fused,liger"),
    "petkit-blocks-elementwise-fused-flce": ("petkit", "blocks", "elementwise", "fused,liger"),
    "petkit-blocks-selective-triton": ("petkit", "blocks", "selective", "triton"),
    "petkit-blocks-selective-triton-flce": ("petkit", "blocks", "selective", "triton,liger"),
    "petkit-blocks-budget35-triton-flce": ("petkit", "blocks", "budget-0.35", "triton,liger"),
    "petkit-blocks-elementwise-triton-flce": ("petkit", "blocks", "elementwise", "triton,liger"),
    "petkit-blocks-elementwise-fp8": ("petkit", "blocks", "elementwise", "none"),
    "petkit-blocks-elementwise-fp8-flce": ("petkit", "blocks", "elementwise", "liger"),
    "petkit-blocks-elementwise-fp8mlp": ("petkit", "blocks", "elementwise", "none"),
    "petkit-blocks-elementwise-fp8mlp-flce": ("petkit", "blocks", "elementwise", "liger"),
    "petkit-blocks-budget50-fp8": ("petkit", "blocks", "budget-0.5", "none"),
    "petkit-blocks-budget50-fp8-flce": ("petkit", "blocks", "budget-0.5", "liger"),
    "petkit-blocks-budget50-fp8mlp": ("petkit", "blocks", "budget-0.5", "none"),
    "petkit-blocks-fp8-flce": ("petkit", "blocks", "off", "liger"),
    "petkit-blocks-elementwise-fp8big-flce": ("petkit", "blocks", "elementwise", "liger"),
    **{f"petkit-blocks-{name}-off{pct}": ("petkit", "blocks", ckpt, "liger")
       for name, ckpt, percents in [("elementwise-fp8-flce", "elementwise", (25, 40, 50)),
                                    ("elementwise-flce", "elementwise", (50, 100)),
                                    ("fp8-flce", "off", (25, 35, 50))] for pct in percents},
    "petkit-blocks-selective-dropout": ("petkit", "blocks", "selective", "none"),
    "petkit-blocks-selective-fused-dropout": ("petkit", "blocks", "selective", "fused"),
    "petkit-blocks-selective-triton-dropout": ("petkit", "blocks", "selective", "triton"),
    "petkit-bare-compile-ckpt": ("bare", "model", "full", "none"),
    "petkit-bare-blocks-selective": ("bare", "blocks", "selective", "none"),
    "petkit-bare-blocks-elementwise": ("bare", "blocks", "elementwise", "none"),
    "petkit-bare-eager": ("bare", "", "off", "none"),
    "petkit-bare-blocks-elementwise-fp8-flce": ("bare", "blocks", "elementwise", "liger"),
    **{f"petkit-blocks-elementwise-fp8-flce-{variant}": ("petkit", "blocks", "elementwise", "liger")
       for variant in ("copy", "inplace", "shared", "off50-copy")},
}
LIGER_PIECES = "flce"  # --runtime.liger of the petkit cases with "liger"
DROPOUT = 0.05  # LoRA dropout of the `-dropout` cases (the others: none); only the Triton kernel
# fuses it (the torch fused path keeps such layers eager: `-fused-dropout` shows that)
# `-fp8` cases keep what the compiled blocks save for the backward in fp8 (e4m3, one scale per
# tensor: `--runtime.activation_quantization=fp8`), every saved tensor of at least 1 MiB;
# `-fp8mlp` only the MLP's hidden activations (`fp8-mlp`); `-fp8big` those of at least 16 MiB
# `-offNN`: NN% of the blocks' saved activations in host memory (activation_offload_fraction);
# the library's defaults add LoRA's B-product into the base output in place (`core.accumulate`)
# and form the A-products of LoRA layers that read one input as one GEMM (`training.shared_input`);
# `-copy` turns both off (the path before 2026-12-07), `-inplace` keeps only the first, `-shared`
# is the defaults under the name the 2026-12-07 calls measured them by
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 989.0
LR, SEQUENCES = 1e-3, 64


def build_model(shape: dict[str, int], device: str) -> Any:
    """A random-weight Llama of `shape` in bf16 on `device`, seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                         max_position_embeddings=max(shape["seq"], 2048), use_cache=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)


def examples(shape: dict[str, int]) -> list[dict[str, Any]]:
    """SEQUENCES seeded random sequences; labels = inputs."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (SEQUENCES, shape["seq"]), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def flops_per_token(shape: dict[str, int]) -> float:
    """Useful FLOPs of one LoRA training token: 4 N (linear layers and head) + attention."""
    d, layers = shape["hidden"], shape["layers"]
    kv = d // shape["heads"] * shape["kv"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * shape["inter"]
    n = layers * per_layer + d * shape["vocab"]
    return 4 * n + 12 * layers * shape["seq"] * d


def batches(data: list[dict[str, Any]], batch: int, steps: int) -> list[dict[str, Any]]:
    """The micro-batches pk.train sees: petkit's seeded epoch order, collated."""
    from petkit.data import collate
    from petkit.training.batching import epoch_order

    out, epoch = [], 0
    while len(out) < steps:
        order = epoch_order(len(data), 0, epoch)
        for start in range(0, len(order) - batch + 1, batch):
            out.append(collate([data[i] for i in order[start:start + batch]], pad_id=0))
        epoch += 1
    return [{k: v for k, v in b.items() if k != "attention_mask"} for b in out[:steps]]


def peft_case(args: argparse.Namespace, shape: dict[str, int], compiled: str, ckpt: str,
              kernels: str = "none") -> dict:
    """PEFT LoRA in a plain loop, HF gradient checkpointing, torch.compile(model) or of each
    decoder layer (regional, as `compile_scope="blocks"` does for petkit); with "liger", Liger's
    Llama patch (every kernel, its fused linear cross-entropy included) applied first."""
    import torch
    from peft import LoraConfig, get_peft_model

    from petkit.training.schedule import lr_factor

    model = build_model(shape, args.device)
    if kernels == "liger":
        if not args.device.startswith("cuda"):
            raise SystemExit("peft + liger needs a CUDA device")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    if ckpt == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=args.device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps=args.steps, warmup_steps=0, schedule="linear"))
    model.train()
    forward = torch.compile(model) if compiled == "model" else model
    if compiled == "blocks":
        for layer in model.base_model.model.model.layers:
            layer.compile()

    def step(batch: dict[str, Any]) -> torch.Tensor:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = timed_loop(step, batches(examples(shape), shape["batch"], args.steps),
                               args.device)
    return window_row(args, shape, times, losses)


def quantization(case: str) -> tuple[str, float]:
    """`--runtime.activation_quantization` and its size floor in MiB for `case`."""
    kind = "fp8-mlp" if "-fp8mlp" in case else "fp8" if "-fp8" in case else "none"
    return kind, 16.0 if "-fp8big" in case else 1.0


def offload(case: str) -> float | None:
    """`--runtime.activation_offload_fraction` of `case` (None: no offload)."""
    _, off, percent = case.removesuffix("-copy").rpartition("-off")
    return int(percent) / 100 if off and percent.isdigit() else None


def petkit_config(args: argparse.Namespace, compiled: str, ckpt: str, batch: int,
                  kernels: str = "none") -> Any:
    from petkit.training import RuntimeConfig, TrainConfig

    budget = ckpt.startswith("budget-")  # the compiler chooses what to recompute
    kind, floor = quantization(getattr(args, "case", None) or "")
    fraction = offload(getattr(args, "case", None) or "")
    runtime = RuntimeConfig(device=args.device, precision="bf16", compile=bool(compiled),
                            compile_scope=compiled or "model",
                            activation_checkpointing="off" if budget else ckpt,
                            activation_budget=float(ckpt[7:]) if budget else None,
                            activation_quantization=kind, activation_quantization_min_mb=floor,
                            kernels=kernels, liger=LIGER_PIECES,
                            activation_offload=fraction is not None,
                            activation_offload_fraction=fraction or 1.0)
    log_every = 1 if getattr(args, "curves", False) else args.window  # --curves: every step
    return TrainConfig(lr=LR, max_steps=args.steps, batch_size=batch, log_every=log_every,
                       schedule="linear", progress=False, runtime=runtime)


def petkit_model(args: argparse.Namespace, shape: dict[str, int]) -> Any:
    import torch

    import petkit as pk

    model = build_model(shape, args.device)
    torch.manual_seed(0)
    dropout = DROPOUT if (args.case or "").endswith("-dropout") else 0.0
    return pk.attach(model, pk.LoraConfig(r=16, alpha=32, dropout=dropout, targets=TARGETS))


def petkit_case(args: argparse.Namespace, shape: dict[str, int], compiled: str, ckpt: str,
                kernels: str = "none") -> dict:
    """petkit LoRA through pk.train with the run's modes set in its runtime section."""
    import petkit as pk

    model = petkit_model(args, shape)
    started = time.perf_counter()
    config = petkit_config(args, compiled, ckpt, shape["batch"], kernels)
    result = pk.train(model, examples(shape), config)
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    w = min(args.window, len(losses)) if args.curves else 1  # the window's mean, as logged
    return {"tok_s": result.tokens_per_s, "loss": sum(losses[-w:]) / w,
            "run_s": time.perf_counter() - started,
            "kernels": result.report.get("kernels", "none"),
            **({"losses": losses} if args.curves else {})}


def bare_case(args: argparse.Namespace, shape: dict[str, int], compiled: str, ckpt: str,
              kernels: str = "none") -> dict:
    """petkit's layers and modes (compile, checkpointing, chunked loss) in a plain loop."""
    import torch

    import petkit as pk
    from petkit.training.evaluate import autocast
    from petkit.training.run_modes import RunModes
    from petkit.training.schedule import lr_factor

    model = petkit_model(args, shape)
    params = pk.trainable_parameters(model)
    config = petkit_config(args, compiled, ckpt, shape["batch"], kernels)
    modes = RunModes(model, config.runtime, params, None)
    objective = modes.objective()
    opt = torch.optim.AdamW(list(params.values()), lr=LR, fused=args.device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps=args.steps, warmup_steps=0, schedule="linear"))

    def dense(batch: dict[str, Any]) -> torch.Tensor:
        with autocast("bf16", modes.device):
            return objective(model, batch).loss

    forward = modes.wrap(dense)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        loss = forward({k: v.to(args.device) for k, v in batch.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    plan = batches(examples(shape), shape["batch"], args.steps)
    with modes.installed(None, dense):
        times, losses = timed_loop(step, plan, args.device)
    return {**window_row(args, shape, times, losses), "kernels": modes.kernels.note()}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process."""
    import torch

    from petkit.core import accumulate
    from petkit.training import fused_delta, run_modes

    library, compiled, ckpt, kernels = CASES[args.case]
    shape = SHAPES[args.shape]
    if args.smoke:  # run the fused delta's code on the CPU too (it is installed on CUDA only)
        fused_delta.FUSED_DEVICES = ("cuda", "cpu")
    if kernels == "fused2":  # the fused delta with its forward as two GEMMs
        kernels, fused_delta.ONE_GEMM_FORWARD = "fused", False
    accumulate.IN_PLACE = not args.case.endswith("-copy")  # both on by default
    run_modes.SHARED_INPUT_LOWRANK = not args.case.endswith(("-copy", "-inplace"))
    run = {"peft": peft_case, "petkit": petkit_case, "bare": bare_case}[library]
    row = run(args, shape, compiled, ckpt, kernels)
    cuda = args.device.startswith("cuda")
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    row["mfu"] = row["tok_s"] * flops_per_token(shape) / (PEAK_TFLOPS * 1e12)
    return {"case": args.case, **row}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `--smoke` is every selected case tiny on the CPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--window", type=int, default=10,
                        help="tok/s and loss over the last WINDOW steps (pk.train's log_every)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds for all cases: a case gets at most what is left of it")
    parser.add_argument("--min-case", type=float, default=20.0,
                        help="no case is started with less than this left of --deadline")
    parser.add_argument("--json", help="write the rows to this file (after every case)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape on the CPU, 6 steps: checks every selected case runs "
                             "(a case needing CUDA or liger-kernel must fail saying so)")
    parser.add_argument("--curves", action="store_true",
                        help="keep every step's loss; compare each case's curve with the first's")
    parser.add_argument("--case", choices=list(CASES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # a shared CPU may be slow: a case gets up to 20 minutes
        args.shape, args.device, args.steps, args.window = "tiny", "cpu", 6, 2
        args.timeout = max(args.timeout, 1200.0)
    return args


def main() -> None:
    """Parse; run one case (`--worker`) or all asked for and print the table."""
    args = parse()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = run_all(__file__, args)
    s = SHAPES[args.shape]
    print(table(rows, f"{args.shape} Llama shape, batch {s['batch']}x{s['seq']}, bf16, LoRA r16 "
                      f"on 7 linear"))
    if args.curves:
        print(curves_table(curve_gaps(rows)))
    if args.smoke and smoke_failures(rows):
        raise SystemExit(f"smoke: {len(smoke_failures(rows))} case(s) failed")


if __name__ == "__main__":
    main()
