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
from efficientqat_budget import first_blocks  # benchmarks/, beside this file
from petkit.compress.efficientqat import QatConfig
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


def lr_select(model: torch.nn.Module, tok: object, bits: int) -> None:
    train, _ = _texts("bbc-news")
    windows = text_windows(tok, train, 128, 40, 123)
    for lw, lq in [(0.0, 0.0), (2e-5, 1e-4), (1e-4, 1e-3), (5e-4, 3e-3)]:
        started = time.time()
        config = QatConfig(bits, 128, 2 if lw else 0, 4, lw, lq, 0)  # epochs 0: RTN
        for index, mse in enumerate(first_blocks(model, windows[:32], windows[32:], config)):
            print(f"bits {bits} lr_w {lw} lr_q {lq} block {index} val mse {mse:.4e}", flush=True)
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
