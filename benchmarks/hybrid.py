"""The measurements of docs/hybrid.md: module transfer (PET-GC), patch porting (PORTLLM), preference
tuning (DPO / MEET). One subcommand per system, each in its own module (hybrid_transfer.py,
hybrid_port.py, hybrid_prefer.py; shared helpers in hybrid_common.py); each prints one JSON line
per seed and appends it to runs/hybrid/<system>.jsonl (`prefer-summary` tabulates the
generations that `prefer --hard-movies` saved).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/hybrid.py transfer --seeds 0
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/hybrid.py port --seeds 0
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/hybrid.py prefer --seeds 0

Compute is counted in passes over single examples: a backprop step over a batch of B is B
forward + B backward passes, a MeZO step 2B forward passes; wall seconds are reported too (the
CPU is shared, so they are noisy).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import hybrid_port
import hybrid_prefer
import hybrid_transfer
from hybrid_common import int_list

SYSTEMS = (hybrid_transfer, hybrid_port, hybrid_prefer)
COMMANDS = {"transfer": hybrid_transfer.run, "port": hybrid_port.run, "prefer": hybrid_prefer.run,
            "prefer-summary": hybrid_prefer.summarise}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for system in SYSTEMS:
        system.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--seeds", type=int_list, default=[0])
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "prefer":
        hybrid_prefer.check(parser, args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    COMMANDS[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
