"""Held-out perplexity of SmolLM2-135M: full precision vs RTN vs EfficientQAT, int4/3/2.

    nice -n 10 python benchmarks/efficientqat.py --group-size 128 --seeds 0,1,2 --out runs/eqat.jsonl

One process, the model loaded once and copied per arm; every arm's result is appended to --out as
a JSON line as soon as it is measured, seed by seed (every bit width of seed 0 first, so a run
cut short still has each width once); fp32 and RTN rows already in --out are not measured again. Calibration: bbc-news train split; held out: its test split
(the same windows for every arm) and, as a second domain the calibration never saw,
rotten-tomatoes' test split (`other`: does E2E-QP on the calibration text recover the
quantisation or only adapt to news?). EfficientQAT is measured twice per run: after Block-AP,
then after E2E-QP of the step sizes on the same calibration windows (`--e2e-steps`, continuing
from that model). RTN is deterministic (one row per bit width).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from petkit.cli_quantize import _texts
from petkit.compress import perplexity, quantize
from petkit.compress.efficientqat import INT_MODES, QatConfig, block_ap, e2e_qp, pad_groups, padded_rtn
from petkit.core.blocks import layer_paths
from petkit.compress.qformat import attach_scheme, save_quantized, text_windows
from petkit.models import load_model


def render(path: str) -> str:
    """The docs' table from the JSON lines: each arm's perplexity against fp32 and against RTN."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    fp32 = next(r for r in rows if r["arm"] == "fp32")
    arms, widths = ("fp32", "fp32+e2e-scales", "rtn", "block-ap", "block-ap+e2e-qp"), ("int4", "int3", "int2")
    rows.sort(key=lambda r: (r["arm"] != "fp32+e2e-scales", widths.index(r.get("bits", "int4")),
                             r.get("seed", -1), arms.index(r["arm"])))
    rtn = {r["bits"]: r["perplexity"] for r in rows if r["arm"] == "rtn"}
    lines = ["| arm | bits | seed | perplexity | vs fp32 | vs RTN | other domain (vs fp32) | seconds |",
             "|---|---|---|---:|---:|---:|---:|---:|",
             f"| fp32 | - | - | {fp32['perplexity']:.2f} | - | - | {fp32['other']:.2f} | - |"]
    for r in rows:
        if r["arm"] == "fp32":
            continue
        base = rtn.get(r.get("bits"))
        versus = "-" if r["arm"] == "rtn" or base is None else f"{100 * (r['perplexity'] / base - 1):+.1f}%"
        lines.append(f"| {r['arm']} | {r.get('bits', '-')} | {r.get('seed', '-')} | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / fp32['perplexity'] - 1):+.1f}% | {versus} | "
                     f"{r['other']:.2f} ({100 * (r['other'] / fp32['other'] - 1):+.1f}%) | {r['seconds']:.0f} |")
    return "\n".join(lines + means(rows, fp32, rtn))


def means(rows: list[dict], fp32: dict, rtn: dict[str, float]) -> list[str]:
    """Mean over the seeds of each EfficientQAT (arm, bits) run with more than one seed."""
    lines = []
    for arm in ("block-ap", "block-ap+e2e-qp"):
        for bits in ("int4", "int3", "int2"):
            runs = [r for r in rows if r["arm"] == arm and r.get("bits") == bits]
            if len(runs) < 2:
                continue
            ppl, other = (sum(r[k] for r in runs) / len(runs) for k in ("perplexity", "other"))
            seeds = ",".join(str(r["seed"]) for r in runs)
            versus = f"{100 * (ppl / rtn[bits] - 1):+.1f}%" if bits in rtn else "-"
            lines.append(f"| **{arm}** | {bits} | mean ({seeds}) | **{ppl:.2f}** | "
                         f"{100 * (ppl / fp32['perplexity'] - 1):+.1f}% | {versus} | "
                         f"{other:.2f} ({100 * (other / fp32['other'] - 1):+.1f}%) | - |")
    return lines


def measured(path: str) -> set[tuple[str, str | None]]:
    """(arm, bits) of the fp32 and RTN rows already in `path`: a later run does not repeat them."""
    try:
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    except FileNotFoundError:
        return set()
    return {(r["arm"], r.get("bits")) for r in rows if r["arm"] in ("fp32", "rtn", "fp32+e2e-scales")}


def fp32_grids(model: nn.Module, group: int) -> dict[str, tuple]:
    """The fp32 weights written as s ⊙ (W/s - 0) with int4 RTN's step sizes s and *unrounded* codes
    W/s: `e2e_qp` on these trains the same per-group scales with the same magnitudes, on an
    unquantised model (the control: what that tuning does without any quantisation)."""
    grids = {}
    for path in layer_paths(model):
        for sub, layer in model.get_submodule(path).named_modules():
            if isinstance(layer, nn.Linear):
                scales = padded_rtn(layer.weight, 4, group)[2]
                weight = pad_groups(layer.weight.detach().float(), group).reshape(*scales.shape, group)
                grids[f"{path}.{sub}"] = (weight / scales[..., None], torch.zeros_like(scales), scales)
    return grids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", default="int4,int3,int2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--e2e-steps", type=int, default=QatConfig.e2e_steps)
    parser.add_argument("--e2e-lr", type=float, default=QatConfig.e2e_lr)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--fp32-e2e", action="store_true",
                        help="also the control: the same E2E-QP tuning of per-group scales on the fp32 model")
    parser.add_argument("--save", help="also write each Block-AP + E2E-QP model as a compressed-tensors "
                        "folder DIR/BITS-seedN (what `petkit quantize` writes, e.g. for PEQA on a task)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--render", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args()
    if args.render:
        print(render(args.out))
        return
    model, tokenizer = load_model("smollm2-135m", task="causal-lm")
    train_texts, test_texts = _texts("bbc-news")
    held_out = text_windows(tokenizer, test_texts, args.seq_len, args.eval_samples, 0)
    other = text_windows(tokenizer, _texts("rotten-tomatoes")[1], args.seq_len, args.eval_samples, 0)
    settings = {"group_size": args.group_size, "samples": args.samples, "seq_len": args.seq_len,
                "epochs": args.epochs, "eval_windows": args.eval_samples}

    def record(measured: object, started: float, **row: object) -> None:
        row.update(perplexity=perplexity(measured, held_out), other=perplexity(measured, other),
                   seconds=round(time.perf_counter() - started, 1), **settings)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    done = measured(args.out)
    if ("fp32", None) not in done:
        record(model, time.perf_counter(), arm="fp32")
    if args.fp32_e2e and ("fp32+e2e-scales", None) not in done:
        started, tuned = time.perf_counter(), copy.deepcopy(model)
        calibration = text_windows(tokenizer, train_texts, args.seq_len, args.samples, 0)
        e2e_qp(tuned, fp32_grids(tuned, args.group_size), calibration,
               QatConfig(group_size=args.group_size, e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr))
        record(tuned, started, arm="fp32+e2e-scales", e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr)
        del tuned
    for seed in (int(s) for s in args.seeds.split(",")):
        for bits in filter(None, args.bits.split(",")):  # --bits "": only the fp32 rows
            if ("rtn", bits) not in done:  # RTN is deterministic: one row per width
                done.add(("rtn", bits))
                started = time.perf_counter()
                rtn = quantize(copy.deepcopy(model), bits, method="rtn", group_size=args.group_size)
                record(rtn, started, arm="rtn", bits=bits)
                del rtn
            started = time.perf_counter()
            calibration = text_windows(tokenizer, train_texts, args.seq_len, args.samples, seed)
            config = QatConfig(INT_MODES[bits], args.group_size, args.epochs, seed=seed,
                               e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr)
            qat = copy.deepcopy(model)
            grids = block_ap(qat, calibration, config)
            record(qat, started, arm="block-ap", bits=bits, seed=seed)
            if args.e2e_steps:
                started = time.perf_counter()
                grids = e2e_qp(qat, grids, calibration, config)
                record(qat, started, arm="block-ap+e2e-qp", bits=bits, seed=seed,
                       e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr)
                if args.save:
                    attach_scheme(qat, grids, config.bits, args.group_size)
                    save_quantized(qat, f"{args.save}/{bits}-seed{seed}", tokenizer)
            del qat


if __name__ == "__main__":
    main()
