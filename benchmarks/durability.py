"""Measure petkit's durability guarantees (docs/durability.md):

1. SIGKILLs at random times during a loop of overwriting `save_adapter` calls: how often the
   adapter still loads, how often the kill landed inside a save, what is left after the next save;
2. two processes saving 40 versions each into one folder while this process reads it;
3. hostile `adapter.json` metadata: a rank of 10^7, a 2 GB (sparse) file, a catastrophic regex
   as targets: time to the error (or load) and this process's peak-RSS growth.

    OMP_NUM_THREADS=1 python benchmarks/durability.py --kills 30 --out docs/durability.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from torch import nn

import petkit as pk

SAVER = """
import sys, torch, petkit as pk
from torch import nn
folder, sign, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
pk.attach(model, pk.LoraConfig(r=32, targets=["0"]), name="a")
params = list(pk.trainable_parameters(model).values())
for k in range(1, limit + 1):
    with torch.no_grad():
        for p in params:
            p.fill_(sign * k)
    pk.save_adapter(model, folder, name="a")
    print(k, flush=True)
"""


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))


def saver(folder: Path, sign: float, limit: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(sign), str(limit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _forked_saver(folder: str, sign: float, limit: int, done: Connection) -> None:
    """SAVER, as `python -c SAVER folder sign limit` runs it, in a forked child: its printed
    save counts go to `done`."""
    torch.set_num_threads(1)
    sys.argv = ["-c", folder, str(sign), str(limit)]
    exec(SAVER, {"__name__": "__main__", "print": lambda k, flush=True: done.send(k)})


class ForkedSavers:
    """SAVER children forked from one `multiprocessing` fork server that imported torch and
    petkit once: a child killed mid-save is the same SIGKILL of a process inside `save_adapter`
    as `saver`'s, without an interpreter start-up (~2 s) per child."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["torch", "petkit", "durability"])
        self.children: dict[int, tuple[multiprocessing.process.BaseProcess, Connection]] = {}

    def start(self, folder: Path, sign: float, limit: int) -> int:
        """Start a saver; return its pid once its first save is complete."""
        counts, done = self.context.Pipe(duplex=False)
        child = self.context.Process(target=_forked_saver, args=(str(folder), sign, limit, done),
                                     daemon=True)
        child.start()
        done.close()
        if not counts.poll(120):
            child.kill()
            raise RuntimeError(f"saver {child.pid} completed no save in 120 s")
        counts.recv()
        assert child.pid is not None
        self.children[child.pid] = (child, counts)
        return child.pid

    def kill(self, pid: int) -> None:
        """SIGKILL the saver `pid` and wait until it is gone."""
        child, counts = self.children.pop(pid)
        child.kill()
        child.join()
        counts.close()

    def close(self) -> None:
        for pid in list(self.children):
            self.kill(pid)


def version(folder: Path) -> float:
    """The one version every tensor of the loaded adapter holds (raises on a mix)."""
    state = pk.adapter_state(pk.load_adapter(fresh(), folder), "a")
    values = {float(v.min()) for v in state.values()} | {float(v.max()) for v in state.values()}
    if len(values) != 1:
        raise AssertionError(f"mixed versions {values}")
    return values.pop()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if ".petkit-" in p.name]


def kills(n: int, seed: int = 0) -> dict[str, int]:
    folder, rng = Path(tempfile.mkdtemp()) / "ad", random.Random(seed)
    loads = inside = 0
    for _ in range(n):
        child = saver(folder, 1.0, 10**9)
        assert child.stdout is not None
        child.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        inside += bool(leftovers(folder))
        try:
            version(folder)
            loads += 1
        except pk.PetkitError:
            pass
    pk.save_adapter(pk.load_adapter(fresh(), folder), folder, name="a")
    return {"kills": n, "adapter_loads": loads, "kills_inside_a_save": inside,
            "leftovers_after_next_save": len(leftovers(folder))}


def two_writers(limit: int = 40) -> dict[str, int]:
    folder = Path(tempfile.mkdtemp()) / "ad"
    writers = [saver(folder, 1.0, limit), saver(folder, -1.0, limit)]
    reads = failed = 0
    while any(w.poll() is None for w in writers):
        if folder.exists() or leftovers(folder):
            try:
                version(folder)
                reads += 1
            except (pk.PetkitError, AssertionError):
                failed += 1
    errors = sum(w.returncode != 0 for w in writers)
    return {"saves": 2 * limit, "writer_errors": errors, "reads": reads, "failed_reads": failed}


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def hostile() -> dict[str, dict[str, float | str]]:
    root = Path(tempfile.mkdtemp())
    model = pk.attach(fresh(), pk.LoraConfig(r=4, targets=["0"]), name="a")
    good = pk.save_adapter(model, root / "good", name="a")
    cases = {"rank_1e7": lambda m: m["config"].update(r=10**7),
             "catastrophic_regex_targets": lambda m: m["config"].update(targets="((.*)*)*" * 10 + "x"),
             "json_2GB_sparse": None}
    out: dict[str, dict[str, float | str]] = {}
    for name, change in cases.items():
        folder = root / name
        folder.mkdir()
        (folder / "adapter.safetensors").write_bytes((good / "adapter.safetensors").read_bytes())
        meta = json.loads((good / "adapter.json").read_text())
        if change is None:
            with open(folder / "adapter.json", "wb") as fh:
                fh.truncate(2 << 30)
        else:
            change(meta)
            (folder / "adapter.json").write_text(json.dumps(meta))
        before, started = _rss_kib(), time.perf_counter()
        try:
            pk.load_adapter(fresh(), folder)
            result = "loaded (regex replaced by the recorded exact paths)"
        except pk.PetkitError as err:
            result = f"{type(err).__name__}: {str(err).split(': ', 1)[-1][:90]}"
        out[name] = {"seconds": round(time.perf_counter() - started, 4),
                     "peak_rss_growth_mib": round((_rss_kib() - before) / 1024, 1), "result": result}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = {"hostile_metadata": hostile(), "two_writers": two_writers(), "sigkill": kills(args.kills)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
