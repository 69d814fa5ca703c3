"""Running `gpu_train.py`'s cases, each in its own process, and reading their rows: the time
limits, the markdown table, the smoke verdict and the loss-curve comparison (`--curves`).

Every row is one JSON line from a worker (`gpu_train.py --worker --case C`); a worker that fails
gives a row with `error` (the last line of its stderr, or the time-out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# a smoke run (--smoke) skips these rows' errors on a machine without CUDA / liger-kernel
NEEDS_GPU = ("needs a CUDA device", "needs liger", "liger_kernel", "triton")
CURVE_GOAL = 0.005  # loss curves of fused and eager paths agree within 0.5% (issue 28)


def table(rows: list[dict[str, Any]], title: str) -> str:
    """Markdown table under `title`; ratios against the best PEFT row (highest tok/s)."""
    peft = [r for r in rows if r["case"].startswith("peft") and "tok_s" in r]
    best = max(peft, key=lambda r: r["tok_s"]) if peft else None
    lines = [f"{title}; ratios vs {best['case'] if best else '-'}", "",
             "| case | tok/s | peak GiB | MFU | x tok/s | x GiB | loss, window mean | "
             "kernels (the run's note) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        ratio = f"{r['tok_s'] / best['tok_s']:.2f}" if best else "-"
        mem = f"{r['peak_gib'] / best['peak_gib']:.2f}" if best and best["peak_gib"] else "-"
        lines.append(f"| {r['case']} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | "
                     f"{r['mfu']:.1%} | {ratio} | {mem} | {r['loss']:.4f} | "
                     f"{r.get('kernels', '-')} |")
    return "\n".join(lines)


def curve_gaps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's per-step loss curve against the first row's (the reference, e.g. the eager
    delta): the largest relative gap over the steps, the final step's, and whether both are
    within CURVE_GOAL."""
    curves = [r for r in rows if r.get("losses")]
    if len(curves) < 2:
        return []
    ref = curves[0]["losses"]
    out = []
    for row in curves[1:]:
        gaps = [abs(a - b) / abs(b) for a, b in zip(row["losses"], ref)]
        out.append({"case": row["case"], "reference": curves[0]["case"], "steps": len(gaps),
                    "max_gap": max(gaps), "last_gap": gaps[-1],
                    "within_goal": max(gaps) <= CURVE_GOAL})
    return out


def curves_table(gaps: list[dict[str, Any]]) -> str:
    """The loss-curve comparison as a markdown table."""
    lines = ["| case | reference | steps | max gap | last-step gap | within 0.5% |",
             "|---|---|---:|---:|---:|---|"]
    lines += [f"| {g['case']} | {g['reference']} | {g['steps']} | {g['max_gap']:.3%} | "
              f"{g['last_gap']:.3%} | {'yes' if g['within_goal'] else 'no'} |" for g in gaps]
    return "\n".join(lines)


def child_row(cmd: list[str], limit: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a worker that prints one JSON line, within `limit` seconds: its row, or `error` (the
    last line of its stderr, or the time-out), with `stderr` when it failed."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300],
            "stderr": done.stderr[-3000:]}


def worker_command(script: str, args: argparse.Namespace, case: str) -> list[str]:
    """The command line of one case's worker process."""
    cmd = [sys.executable, script, "--worker", "--case", case, "--shape", args.shape,
           "--device", args.device, "--steps", str(args.steps), "--window", str(args.window)]
    return cmd + (["--smoke"] if args.smoke else []) + (["--curves"] if args.curves else [])


def run_all(script: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case of `args.cases` in a fresh process of `script`, with a time limit; one JSON
    line back from each, printed and (with `--json`) written after every case."""
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.abspath(script)), "..", "src"),
         os.environ.get("PYTHONPATH", "")])}
    begun = time.perf_counter()
    for case in args.cases:
        started = time.perf_counter()
        limit = min(args.timeout, args.deadline - (started - begun))
        row = {"case": case, "error": f"not run: {args.deadline:.0f} s deadline"}
        if limit >= args.min_case:
            row = {"case": case, **child_row(worker_command(script, args, case), limit, env)}
            row["wall_s"] = round(time.perf_counter() - started, 1)
        stderr = row.pop("stderr", "")
        if stderr and not any(n in row["error"] for n in NEEDS_GPU):
            print(stderr, file=sys.stderr)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump({"args": vars(args), "rows": rows, "curves": curve_gaps(rows)}, out,
                          indent=1)
    return rows


def run_cases(cases: list[str], budget: float, command: Callable[[str], list[str]],
              limit: Callable[[str, float], float], out: str | None = None,
              meta: dict[str, Any] | None = None, min_left: float = 15.0) -> list[dict[str, Any]]:
    """Each case's worker (`command(case)`) in a fresh process with `src` on its path, within
    `limit(case, seconds left)` and all within `budget` seconds; each row printed and (with `out`)
    written with `meta` after every case."""
    rows: list[dict[str, Any]] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"),
         os.environ.get("PYTHONPATH", "")])}
    begun = time.perf_counter()
    for case in cases:
        started = time.perf_counter()
        left = budget - (started - begun)
        row = {"case": case, "error": f"not run: the {budget:.0f} s budget is spent"}
        if left >= min_left:
            row = {"case": case, **child_row(command(case), limit(case, left), env)}
            row["wall_s"] = round(time.perf_counter() - started, 1)
        if "stderr" in row:
            print(row.pop("stderr"), file=sys.stderr)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if out:
            with open(out, "w", encoding="utf-8") as handle:
                json.dump({**(meta or {}), "rows": rows}, handle, indent=1)
    return rows


def smoke_failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a smoke run that failed for a reason other than having no GPU / Liger."""
    return [r for r in rows if "error" in r and not any(n in r["error"] for n in NEEDS_GPU)]


def timed_loop(step: Any, plan: list[Any], device: str) -> tuple[list[float], list[float]]:
    """Run `step(batch) -> loss` over `plan`; per-step wall times and losses."""
    import torch

    times, losses = [], []
    for batch in plan:
        start = time.perf_counter()
        losses.append(float(step(batch)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, losses


def window_row(args: argparse.Namespace, shape: dict[str, int], times: list[float],
               losses: list[float]) -> dict[str, float]:
    """tok/s and mean loss over the last `args.window` steps of a plain loop."""
    w = args.window
    return {"tok_s": shape["batch"] * shape["seq"] * w / sum(times[-w:]),
            "loss": sum(losses[-w:]) / w, "first_s": times[0],
            **({"losses": losses} if args.curves else {})}
