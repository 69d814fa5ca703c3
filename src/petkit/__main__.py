"""`python -m petkit ...`: the `petkit` command; what torchrun starts on every rank:

    torchrun --nproc-per-node 2 -m petkit train ...
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from petkit.cli import main

if __name__ == "__main__":
    sys.exit(record(main)())
