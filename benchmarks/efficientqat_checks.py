"""The two checks behind docs/compressed.md's EfficientQAT notes (SmolLM2-135M, bbc-news).

    nice -n 10 python benchmarks/efficientqat_checks.py rtn      # RTN re-implemented, by part
    nice -n 10 python benchmarks/efficientqat_checks.py lr 4     # Block-AP rates on 3 blocks

`rtn`: round-to-nearest written out here without petkit's quantiser (pad, min/max, round, clamp,
dequantise), on the same 32 held-out windows as benchmarks/efficientqat.py: all blocks at g64 and
g128, then one part at a time. `lr`: each (weight, quant) rate pair on the first three blocks,
quantised and chained as Block-AP does, scored by the output MSE on 8 further windows of the
*train* split (the test split is not read).
"""
from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F

from petkit.cli_quantize import _texts
from petkit.compress.efficientqat import QatConfig, _run, block_inputs, fit_block, rtn_grids, set_grid
from petkit.compress.qformat import perplexity, text_windows
from petkit.core.blocks import layer_paths
from petkit.models import load_model


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out_f, in_f = w.shape
    wp = F.pad(w, (0, (-in_f) % group)).reshape(out_f, -1, group)
    qmax = 2**bits - 1
    lo, hi = wp.amin(-1).clamp(max=0), wp.amax(-1).clamp(min=0)
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    z = torch.round(-lo / s).clamp(0, qmax)
    q = torch.clamp(torch.round(wp / s[..., None]) + z[..., None], 0, qmax)
    return (s[..., None] * (q - z[..., None])).reshape(out_f, -1)[:, :in_f]


def rtn_parts(model: torch.nn.Module, tok: object) -> None:
    _, test = _texts("bbc-news")
    held = text_windows(tok, test, 128, 32, 0)
    print("fp32", perplexity(model, held), flush=True)

    def run(bits: int, group: int, only: str | None = None) -> float:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in layer_paths(m):
                for n, layer in m.get_submodule(p).named_modules():
                    if isinstance(layer, torch.nn.Linear) and (only is None or only in n):
                        layer.weight.copy_(rtn(layer.weight, bits, group))
        return perplexity(m, held)

    for g in (64, 128):
        print("rtn int4 g", g, run(4, g), flush=True)
    for only in ("self_attn", "mlp", "down_proj"):
        print("rtn int4 g128 only", only, run(4, 128, only), flush=True)
    print("rtn int3 g128", run(3, 128), flush=True)


def lr_select(model: torch.nn.Module, tok: object, bits: int, blocks: int = 3) -> None:
    model.eval()
    train, _ = _texts("bbc-news")
    windows = text_windows(tok, train, 128, 40, 123)
    stack = layer_paths(model)
    x_cal, kw = block_inputs(model, model.get_submodule(stack[0]), windows[:32], 4)
    x_val, kwv = block_inputs(model, model.get_submodule(stack[0]), windows[32:], 4)
    for lw, lq in [(0.0, 0.0), (2e-5, 1e-4), (1e-4, 1e-3), (5e-4, 3e-3)]:
        started, m = time.time(), copy.deepcopy(model)
        fp_c, q_c, fp_v, q_v = x_cal, x_cal, x_val, x_val
        for path in stack[:blocks]:
            block = m.get_submodule(path)
            with torch.no_grad():
                tc = [_run(block, x, k) for x, k in zip(fp_c, kw)]
                tv = [_run(block, x, k) for x, k in zip(fp_v, kwv)]
            cfg = QatConfig(bits, 128, 2, 4, lw, lq, 0)
            grids = fit_block(block, q_c, tc, kw, cfg) if lw else rtn_grids(block, cfg)
            for sub, g in grids.items():
                set_grid(block.get_submodule(sub), *g)
            with torch.no_grad():
                q_c = [_run(block, x, k) for x, k in zip(q_c, kw)]
                q_v = [_run(block, x, k) for x, k in zip(q_v, kwv)]
            fp_c, fp_v = tc, tv
            mse = sum(F.mse_loss(a, b).item() for a, b in zip(q_v, tv)) / len(tv)
            print(f"bits {bits} lr_w {lw} lr_q {lq} {path} val mse {mse:.4e}", flush=True)
        print("seconds", round(time.time() - started), flush=True)


def main() -> None:
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m", task="causal-lm")
    if sys.argv[1] == "rtn":
        rtn_parts(model, tok)
    else:
        lr_select(model, tok, int(sys.argv[2]))


if __name__ == "__main__":
    main()
