"""Time to first token of a resident adapter against the base, per one-row delta variant, one GPU.

    python benchmarks/serve_ttft.py --out serve_ttft.json

A prefill of one short prompt on a 1.1B model is bound by Python and kernel launches, not by the
GPU, so what each adapted layer adds on the CPU side decides time to first token. This script
measures the one-row path of `petkit.core.batched_lowrank` in the variants below, each patched in
turn into the same engine (same model, same 44 rank-16 q/v adapters as benchmarks/serve_gpu.py):

  matmul   y + (x @ A^T) @ (s B)^T: two `matmul`s and an add (the path before 2026-12-07)
  bmm      baddbmm(y, bmm(x, A^T), (s B)^T): the decode step's two calls on the row's 3-D views
  grouped  q and v read the same input: one bmm(x, [A_q A_v]^T) per layer, reused by both, each
           layer's baddbmm against its B zero-padded to the pair's rank (no slicing); the ceiling
           of sharing the A-product between layers with one input (built here, not in the bank)
  dense    the floor of any low-rank path: q's call multiplies x by the pair's merged delta
           [A_q A_v]^T [B_q 0; 0 B_v] (one GEMM; a dense per-adapter copy, not a serving design),
           q and v each add their slice
  wrapper  the wrapped forward with no delta at all (what the wrapper costs alone)
  one-gemm the wrapper and one discarded bmm(x, A^T) (what one small GEMM costs)
  inplace  bmm, the expand added in place on the base output (`baddbmm_`: no copy of y first)
  shipped  whatever `_apply` does now
  shared   (with --graphs) the shipped per-slot graphs: siblings reading one input share one
           shrink GEMM with their joint A, each expand added in place (LowRankBank.sharing)

Every other variant is captured without the bank's sharing (`PrefillGraphs(share=False)`).

Then the shipped path's raw prefill ratio at other prompt lengths (`--lengths`): the adapter's
cost per layer is fixed while the base's prefill grows with the prompt.

Per variant: the raw prefill forward (`model(ids, use_cache=True, logits_to_keep=1)`, 64 tokens)
against the base's hook-free copy, alternating, medians of `--runs`; and the engine's time to
first token (one request, one new token) against a base engine, alternating, medians of
`--ttft-runs`. Ratios are adapter / base within each variant.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from serve_gpu import DEV, engine_for, random_terms, sync, tiny_llama_shape, ttft, variant

from petkit.core import batched_lowrank as bl
from petkit.serve.prefill_graphs import PrefillGraphs


def one_row_matmul(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y + torch.matmul(torch.matmul(x, g.a_t[0]), g.b_t[0])


def one_row_bmm(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(y, torch.bmm(x, g.a_t), g.b_t)


def one_row_mm2d(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.addmm(y[0], torch.mm(x[0], g.a_t[0]), g.b_t[0]).unsqueeze(0)


def one_row_grouped(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    shared = g.shared  # set by `share_inputs`
    if shared["x"] is not x or shared["version"] != x._version:
        shared["xa"], shared["x"], shared["version"] = torch.bmm(x, shared["a"]), x, x._version
    return torch.baddbmm(y, shared["xa"], g.b_pad)


def one_row_dense(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    shared = g.shared
    if shared["x"] is not x or shared["version"] != x._version:
        shared["d"], shared["x"], shared["version"] = torch.bmm(x, shared["m"]), x, x._version
    return y + shared["d"][..., g.cols]


def wrapper_only(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y


def one_gemm(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch.bmm(x, g.a_t)
    return y


def share_inputs(bank: bl.LowRankBank, key: tuple[int, ...]) -> None:
    """Give each q/v pair's gathered terms one concatenated A and zero-padded Bs (`grouped`)."""
    gathered = bank._cache[key]
    for path, g in gathered.items():
        if not path.endswith("q_proj"):
            continue
        other = gathered[path[: -len("q_proj")] + "v_proj"]
        shared = {"a": torch.cat([g.a_t, other.a_t], dim=2).contiguous(), "x": None, "version": -1}
        rq, rv = g.b_t.shape[1], other.b_t.shape[1]
        g.b_pad = torch.cat([g.b_t, g.b_t.new_zeros(1, rv, g.b_t.shape[2])], dim=1)
        other.b_pad = torch.cat([other.b_t.new_zeros(1, rq, other.b_t.shape[2]), other.b_t], dim=1)
        g.shared = other.shared = shared
        shared["m"] = torch.cat([g.a_t @ g.b_t, other.a_t @ other.b_t], dim=2).contiguous()
        g.cols, other.cols = slice(0, g.b_t.shape[2]), slice(g.b_t.shape[2], None)


def one_row_inplace(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y.baddbmm_(torch.bmm(x, g.a_t), g.b_t)


SHIPPED = bl._apply
VARIANTS: dict[str, Callable | None] = {"matmul": one_row_matmul, "bmm": one_row_bmm, "mm2d": one_row_mm2d,
                                        "grouped": one_row_grouped, "dense": one_row_dense,
                                        "wrapper": wrapper_only, "one-gemm": one_gemm, "inplace": one_row_inplace,
                                        "shipped": None, "shared": None}


def patched(one_row: Callable | None) -> Callable:
    """`_apply` with its one-row, low-rank-only, same-dtype case replaced by `one_row`."""
    if one_row is None:
        return SHIPPED

    def apply(g: bl._Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if (g.plain and g.a_t.shape[0] == 1 == x.shape[0] and x.dim() == 3
                and x.dtype == g.a_t.dtype == y.dtype):
            return one_row(g, x, y)
        return SHIPPED(g, x, y)
    return apply


def forward_ms(model: torch.nn.Module, ids: torch.Tensor) -> float:
    sync()
    started = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    sync()
    return 1000 * (time.perf_counter() - started)


def alternate_prefills(base, engine, slot: int, ids: torch.Tensor, runs: int) -> dict[str, list[float]]:
    """Raw prefill times (ms) of the base and of the adapter in `slot`, alternating, after 5 warm-up pairs."""
    times: dict[str, list[float]] = {"base": [], "adapter": []}
    for i in range(runs + 5):
        b = forward_ms(base.model, ids)
        with engine.pool.bank.using([slot]):
            a = forward_ms(engine.model, ids)
        if i >= 5:
            times["base"].append(b)
            times["adapter"].append(a)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=41, help="alternating raw prefills per variant")
    ap.add_argument("--ttft-runs", type=int, default=21)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lengths", type=int, nargs="*", default=[16, 256, 1024])
    ap.add_argument("--graphs", action="store_true",
                    help="time to first token with per-slot CUDA-graph prefills, each variant captured "
                         "anew (raw eager prefills and --lengths skipped)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model: check the script")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.ttft_runs = 3, 3
    model = tiny_llama_shape(args.smoke)
    base = engine_for(model, 0, graphs=args.graphs)  # the one-row path is what varies here
    engine = engine_for(copy.deepcopy(model), 1, graphs=args.graphs)
    if engine.graphs is not None:
        engine.graphs = PrefillGraphs(engine.model, engine.pool.bank, per_slot=True)
    engine.pool.register("a0", variant(random_terms(model, args.rank), 0), "lora")
    prompt = torch.randint(10, 32000, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([prompt], device=DEV)
    slot = engine.pool.acquire("a0")
    res: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                 "adapted_layers": len(engine.pool.bank.stacks), "variants": {}}
    with torch.no_grad():
        with engine.pool.bank.using([slot]):
            engine.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # fills the bank's cache
        share_inputs(engine.pool.bank, (slot,))
        for name in args.variants:
            bl._apply = patched(VARIANTS[name])
            if engine.graphs is not None:  # captured anew with this variant (a failed one stays eager)
                engine.graphs = PrefillGraphs(engine.model, engine.pool.bank, share=name == "shared")
            times = alternate_prefills(base, engine, slot, ids, 0 if args.graphs else args.runs)
            ttfts: dict[str, list[float]] = {"base": [], "adapter": []}
            ttft(base, prompt, None, runs=1), ttft(engine, prompt, "a0", runs=1)  # captures, if any
            for _ in range(args.ttft_runs):
                ttfts["base"].append(ttft(base, prompt, None, runs=1))
                ttfts["adapter"].append(ttft(engine, prompt, "a0", runs=1))
            row = {f"prefill_ms_{k}": statistics.median(v) for k, v in times.items() if v}
            row.update({f"ttft_ms_{k}": statistics.median(v) for k, v in ttfts.items()})
            row["graphed"] = engine.graphs is not None and engine.graphs.enabled
            if times["base"]:
                row["prefill_ratio"] = row["prefill_ms_adapter"] / row["prefill_ms_base"]
            row["ttft_ratio"] = row["ttft_ms_adapter"] / row["ttft_ms_base"]
            repeat = sum(k.split("#")[0] == name for k in res["variants"])
            res["variants"][name if not repeat else f"{name}#{repeat + 1}"] = row  # a repeated variant kept too
            print(name, json.dumps(row), flush=True)
        bl._apply = SHIPPED
        res["lengths"] = {}
        for length in [] if args.graphs else args.lengths:
            ids = torch.randint(10, 32000, (1, length), generator=torch.Generator().manual_seed(2)).to(DEV)
            times = alternate_prefills(base, engine, slot, ids, args.runs)
            row = {f"prefill_ms_{k}": statistics.median(v) for k, v in times.items()}
            row["prefill_ratio"] = row["prefill_ms_adapter"] / row["prefill_ms_base"]
            res["lengths"][length] = row
            print("length", length, json.dumps(row), flush=True)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
