"""The compressed-bases table of docs/compressed.md: LoRA on fp32 / nf4 / int8 bases, PEQA, pruning.

    python benchmarks/compressed.py                          # run missing cells, print the table
    python benchmarks/compressed.py --only qlora-nf4 --seeds 0,1,2
    python benchmarks/compressed.py --render                 # table from the cache only
    python benchmarks/compressed.py --settings decoder --only lora-fp32,loraprune-50 \
        --train-size 512 --epochs 2 --threads 1              # a longer schedule (64 steps)

Protocol: the methods table's (benchmarks/methods_table.py: smollm2-135m on rotten-tomatoes with
a verbaliser, minilm-l6 on bbc-news with a new head; 128 / 256 training examples, 2 epochs,
batch 16, 300 test examples, max length 64, 2 threads), one process per cell. LoRA arms use
r=8 on every linear layer (pruning reads importance from all of them) at lr 3e-3; PEQA arms at
the rates `--select-lr` chose per setting (below), a new head at head_lr 3e-3. Measured per
cell: test accuracy, trainable parameters, peak RSS *during training* (sampled every 20 ms: the
fp32 checkpoint is loaded before quantising, so the process peak would hide the difference),
wall time per step, and the size of the weights a deployment stores (quantised layers at their
bit width, PEQA integers packed at `bits` per weight, pruned models at their new shapes). Pruned
arms also time the forward pass of the pruned model against the unpruned one (same batch).
The `eqat-ap-int4+peqa` / `eqat-int4+peqa` arms (decoder only) are E2E-QP on the task: PEQA over
the EfficientQAT int4 folders that `QAT_BASES` (below) names, which must exist first.
On the encoder (minilm-l6) pruning removes MLP channels only (BERT heads cannot be reloaded
fewer by transformers 5), the same fraction of block parameters as on the decoder.

`--train-size N` / `--epochs N` / `--threads N` change the protocol (defaults: the methods
table's, unchanged). Cells of a changed size or epochs go to docs/compressed_long.json under
keys `setting/arm/seed/nNeE` (N training examples, E epochs), never into the table's cache;
`--render` with the same flags shows that protocol's table. `--threads` changes only speed.

Learning-rate selection (how PEQA's lr was chosen; the test examples are never evaluated):

    python benchmarks/compressed.py --settings encoder --only peqa-int4 --seeds 0 \
        --select-lr 1e-4,3e-4,1e-3,3e-3 --val 200 --threads 1

trains each candidate lr on the protocol's number of training examples, drawn from a seeded
subset of N + V training-split examples whose other V are held out (`data.validation_size`), and
reports accuracy on those V. Cells go to docs/compressed_long.json under
`setting/arm/seed/valV/lrX`; `--head-lr X|none` overrides an arm's head_lr there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compressed_probes import RssPeak, backend_speed, merge_error  # noqa: E402
from compressed_table import render, render_selection  # noqa: E402
CACHE = ROOT / "docs" / "compressed.json"
LONG_CACHE = ROOT / "docs" / "compressed_long.json"  # cells of a non-default --train-size / --epochs
LORA = {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"}
LR = 3e-3
ARMS: dict[str, dict[str, Any]] = {
    "lora-fp32": {"method": LORA},
    "qlora-nf4": {"method": LORA, "quantize": "nf4"},
    "lora-int8": {"method": LORA, "quantize": "int8"},
    # PEQA's scale lr per setting, chosen on 200 held-out training examples, seed 0 (--select-lr,
    # docs/compressed.md); head_lr: the encoder's new head trains at the LoRA arms' lr.
    "peqa-int4": {"method": {"name": "peqa", "bits": 4}, "lr": {"decoder": 3e-4, "encoder": 1e-3}, "head_lr": LR},
    "peqa-int3": {"method": {"name": "peqa", "bits": 3}, "lr": {"decoder": 3e-3, "encoder": 3e-3}, "head_lr": LR},
    # E2E-QP on the task: PEQA's step sizes over the EfficientQAT int4 (group 128) folders that
    # `petkit quantize` writes (QAT_BASES); rates chosen on 200 held-out training examples, seed 0
    # (1e-4 for both among 3e-5..1e-3: docs/compressed.md); a causal LM only. This one: Block-AP,
    # then E2E-QP on the calibration text, then on the task.
    "eqat-int4+peqa": {"method": {"name": "peqa"}, "model": "runs/eqat-int4-g128", "lr": 1e-4,
                       "settings": ("decoder",)},
    # The paper's order for a task: Block-AP only (`--e2e-steps 0`), then E2E-QP on the task itself.
    "eqat-ap-int4+peqa": {"method": {"name": "peqa"}, "model": "runs/eqat-ap-int4-g128", "lr": 1e-4,
                          "settings": ("decoder",)},
    "loraprune-30": {"method": LORA, "prune": {"sparsity": 0.3}},
    "loraprune-50": {"method": LORA, "prune": {"sparsity": 0.5}},
    "apt-30": {"method": LORA, "prune": {"sparsity": 0.3, "method": "apt", "init_rank": 2, "grow_rank": 2,
                                         "grow_every": 2, "every": 1}},
    "apt-50": {"method": LORA, "prune": {"sparsity": 0.5, "method": "apt", "init_rank": 2, "grow_rank": 2,
                                         "grow_every": 2, "every": 1}},
}


QAT = "petkit quantize --method efficientqat --bits int4 --group-size 128"
QAT_BASES = {"runs/eqat-int4-g128": f"{QAT} --output runs/eqat-int4-g128",  # the command that writes each folder
             "runs/eqat-ap-int4-g128": f"{QAT} --e2e-steps 0 --output runs/eqat-ap-int4-g128"}


def model_of(arm: str, setting: str) -> Any:
    """The recipe's ModelSpec for the arm: the setting's model, or the arm's quantised folder."""
    from methods_table import recipe
    from petkit.app.recipe import ModelSpec

    folder = ARMS[arm].get("model")
    if folder is None:
        return recipe(setting, "lora").model
    if not (ROOT / folder / "config.json").is_file():
        raise SystemExit(f"{arm} needs the EfficientQAT folder {folder}: run `{QAT_BASES[folder]}` first")
    return ModelSpec(str(ROOT / folder))


def arms_on(setting: str, arms: list[str]) -> list[str]:
    """The arms of `arms` that run on `setting` (an arm's "settings", else every setting)."""
    return [arm for arm in arms if setting in ARMS[arm].get("settings", (setting,))]


def lr_of(arm: str, setting: str) -> float:
    """The arm's learning rate on `setting` (a number, or one per setting)."""
    lr = ARMS[arm].get("lr", LR)
    return lr[setting] if isinstance(lr, dict) else lr


def memory_cell(arm: str, steps: int = 4) -> dict[str, Any]:
    """Peak RSS while training `steps` steps of a decoder arm (run with MALLOC_MMAP_THRESHOLD_ set,
    so memory freed after quantising goes back to the OS and RSS shows live memory)."""
    import dataclasses

    import torch

    import petkit as pk
    from methods_table import recipe
    from petkit.app.pipeline import method_config, prepare
    from petkit.training import train

    torch.set_num_threads(2)
    spec = ARMS[arm]
    rec = recipe("decoder", "lora")
    rec = dataclasses.replace(rec, method=dict(spec["method"]), train=rec.train.replace(
        lr=lr_of(arm, "decoder"), max_steps=steps, epochs=None))
    prep, _ = prepare(rec)
    if "quantize" in spec:
        pk.quantize(prep.model, spec["quantize"])
    pk.attach(prep.model, method_config(rec, prep))
    with RssPeak() as idle:
        time.sleep(0.2)
    with RssPeak() as rss:
        train(prep.model, prep.train, rec.train.replace(label_token_ids=prep.label_token_ids), pad_id=prep.pad_id)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
    kinds = {k.lower(): round(int(v.split()[0]) / 1024) for k, v in status.items()}  # anon / file-backed
    return {"arm": arm, "steps": steps, "rss_before_train_mb": round(idle.mb), "peak_train_mb": round(rss.mb),
            "after_train_mb": kinds}


def head_lr_of(arm: str, task_type: str, override: str | None = None) -> float | None:
    """The arm's head_lr on a task with a new head (`override`: a number or "none"); None on a
    verbaliser task (no trainable copy: TrainConfig.head_lr would be refused)."""
    value = ARMS[arm].get("head_lr") if override is None else \
        (None if override == "none" else float(override))
    return value if task_type == "head" else None


def setup_arm(arm: str, model: Any, task_type: str, heads: tuple[str, ...], seed: int) -> tuple[Any, Any]:
    """The harness's arm for `arm` (`petkit.benchmark.arms`) and the model it set up: quantised /
    pruning-ready, the delta attached at its initialisation."""
    from petkit.benchmark.arms import ArmContext, make_arm
    from petkit.benchmark.spec import ArmSpec

    spec = ARMS[arm]
    options = {k: v for k, v in spec["method"].items() if k != "name"}
    bench_arm = make_arm(ArmSpec(arm, "petkit", spec["method"]["name"], options,
                                 quantize=spec.get("quantize"), prune=spec.get("prune", {})))
    return bench_arm, bench_arm.setup(model, ArmContext(task_type, heads, seed))


def zero_shot(setting: str, arm: str) -> dict[str, Any]:
    """Test accuracy of the arm's model *before training* (its base as the arm sets it up, the
    delta at initialisation; a verbaliser setting, where an untrained model has an accuracy)."""
    import dataclasses

    import torch

    from methods_table import recipe
    from petkit.app.pipeline import prepare
    from petkit.training import evaluate

    torch.set_num_threads(1)
    rec = dataclasses.replace(recipe(setting, "lora"), method=dict(ARMS[arm]["method"]), model=model_of(arm, setting))
    prep, _ = prepare(rec)
    model = setup_arm(arm, prep.model, prep.task_type, (), 0)[1]
    metrics = evaluate(model, prep.test, batch_size=16, pad_id=prep.pad_id,
                       label_token_ids=prep.label_token_ids, collate_fn=prep.collate)
    return {"setting": setting, "arm": arm, "zero_shot_accuracy": metrics["accuracy"], "test_size": len(prep.test)}


def run_cell(setting: str, arm: str, seed: int, opts: argparse.Namespace) -> dict[str, Any]:
    """One cell through the harness's arm (`petkit.benchmark.arms`): quantise / attach / prune,
    train, finish pruning; on the methods table's protocol (no validation carve-out), with its
    training size, epochs and threads unless `opts` gives them. With `opts.val` V, the training
    examples are drawn from N + V with V held out, and the cell reports accuracy on those V only
    (the test subset is never evaluated): learning-rate selection."""
    import dataclasses

    import torch

    import petkit as pk
    from methods_table import PROTOCOL, recipe
    from petkit.app.pipeline import prepare, test_metrics
    from petkit.benchmark.arms import Finishing
    from petkit.compress.measure import forward_seconds, stored_bytes
    from petkit.core.model import trainable_copy_parameters
    from petkit.models import head_module_names
    from petkit.training import evaluate, train

    torch.set_num_threads(opts.threads or PROTOCOL["threads"])
    spec = ARMS[arm]
    rec = recipe(setting, "lora")
    size, val = opts.train_size or rec.data.train_size, opts.val or 0
    data = dataclasses.replace(rec.data, train_size=size + val, validation_size=val)
    train_config = rec.train.replace(lr=opts.lr or lr_of(arm, setting), seed=seed,
                                     epochs=opts.epochs or rec.train.epochs)
    rec = dataclasses.replace(rec, method=dict(spec["method"]), data=data, model=model_of(arm, setting),
                              train=train_config)
    torch.manual_seed(seed)
    prep, _ = prepare(rec)
    model = prep.model
    batch = {"input_ids": torch.randint(3, 1000, (16, 64))}
    out: dict[str, Any] = {"seed": seed, "lr": rec.train.lr}
    if "prune" in spec:
        out["forward_s_unpruned"], out["forward_cpu_s_unpruned"] = forward_seconds(model, batch)
    heads = tuple(head_module_names(model)) if prep.task_type == "head" else ()
    bench_arm, model = setup_arm(arm, model, prep.task_type, heads, seed)
    out["trainable"] = sum(p.numel() for p in pk.trainable_parameters(model).values())
    config = rec.train.replace(label_token_ids=prep.label_token_ids,
                               head_lr=head_lr_of(arm, prep.task_type, opts.head_lr))
    out["head_lr"] = config.head_lr
    head_before = {k: p.detach().clone() for k, p in trainable_copy_parameters(model).items()}
    wall = time.perf_counter()
    with RssPeak() as rss:
        result = train(model, prep.train, config, pad_id=prep.pad_id)
    out["wall_s_per_step"] = (time.perf_counter() - wall) / result.steps
    out["peak_train_mb"] = rss.mb
    if head_before:  # how far the new head moved: ||W - W0|| / ||W0|| over its parameters
        after = trainable_copy_parameters(model)
        moved = sum(float((after[k] - v).norm() ** 2) for k, v in head_before.items()) ** 0.5
        out["head_relative_change"] = moved / sum(float(v.norm() ** 2) for v in head_before.values()) ** 0.5
    if isinstance(bench_arm, Finishing) and "prune" in spec:
        model = bench_arm.finish(model)
        out["prune"] = bench_arm.report
        if bench_arm.report.get("apt_live_lora_parameters"):
            out["trainable_live"] = bench_arm.report["apt_live_lora_parameters"]
        out["forward_s_pruned"], out["forward_cpu_s_pruned"] = forward_seconds(model, batch)
    if val:
        out["val_accuracy"] = evaluate(model, prep.validation, batch_size=16, pad_id=prep.pad_id,
                                       label_token_ids=prep.label_token_ids,
                                       collate_fn=prep.collate)["accuracy"]
        out["val_size"] = len(prep.validation)
    else:
        out["accuracy"] = test_metrics(prep, rec)["accuracy"]
    out["stored_mb"] = stored_bytes(model) / 2**20
    out["steps"] = result.steps
    out["train_size"], out["epochs"] = len(prep.train), rec.train.epochs
    return out


def cell_in_subprocess(setting: str, arm: str, seed: int, protocol: list[str], threads: int) -> dict[str, Any]:
    """`protocol`: the --train-size / --epochs / --threads arguments passed on to the cell."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, __file__, "--cell", setting, arm, str(seed), *protocol]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"note": (err[-1] if err else f"exit code {proc.returncode}")[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated arms")
    parser.add_argument("--settings", default="decoder,encoder")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--backends", action="store_true", help="time one layer per quantisation backend")
    parser.add_argument("--merge-error", action="store_true", help="merge-into-4-bit error on a tiny Llama")
    parser.add_argument("--memory", help="peak RSS of a few training steps of these arms (comma-separated)")
    parser.add_argument("--train-size", type=int, help="training examples (default: the methods table's)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the methods table's, 2)")
    parser.add_argument("--threads", type=int, help="torch / OpenMP threads per cell (default 2)")
    parser.add_argument("--select-lr", help="comma-separated candidate lrs, scored on --val held-out examples")
    parser.add_argument("--val", type=int, help="training examples held out for validation (with --select-lr)")
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)  # a cell's lr (from --select-lr)
    parser.add_argument("--head-lr", help="override the arms' head_lr in a selection run: a number or none")
    parser.add_argument("--zero-shot", help="test accuracy of these decoder arms before training (comma-separated)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory and not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        for arm in args.memory.split(","):  # each arm in its own process, freed memory returned to the OS
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
            subprocess.run([sys.executable, __file__, "--memory", arm], env=env, cwd=ROOT)
        return
    if args.memory:
        print(json.dumps(memory_cell(args.memory)), flush=True)
        return
    if args.backends or args.merge_error:
        for row in (backend_speed() if args.backends else merge_error()):
            print(json.dumps(row))
        return
    if args.zero_shot:  # one process, arm after arm; each result stored under setting/arm/zero-shot
        for arm in args.zero_shot.split(","):
            row = zero_shot("decoder", arm)
            cache = json.loads(LONG_CACHE.read_text()) if LONG_CACHE.is_file() else {}
            LONG_CACHE.write_text(json.dumps({**cache, f"decoder/{arm}/zero-shot": row}, indent=1, sort_keys=True))
            print(json.dumps(row), flush=True)
        return
    if args.cell:
        cell = run_cell(args.cell[0], args.cell[1], int(args.cell[2]), args)
        print(json.dumps(cell), flush=True)
        return
    run_grid(args)


def run_grid(args: argparse.Namespace) -> None:
    """Run the missing cells one process at a time, caching each, then print the table."""
    from methods_table import PROTOCOL, SETTINGS

    protocol = [f"--{flag}={value}" for flag, value in
                (("train-size", args.train_size), ("epochs", args.epochs), ("threads", args.threads)) if value]
    suffix, cache_path = "", CACHE
    if args.train_size or args.epochs:
        sizes = {SETTINGS[s]["train_size"] for s in args.settings.split(",")}
        if not args.train_size and len(sizes) > 1:
            raise SystemExit("--epochs without --train-size: run one --settings at a time")
        suffix = f"/n{args.train_size or sizes.pop()}e{args.epochs or PROTOCOL['epochs']}"
        cache_path = LONG_CACHE
    # Learning-rate selection: one cell per candidate, scored on held-out training examples.
    candidates: list[float | None] = [None]
    if args.select_lr:
        if not args.val:
            raise SystemExit("--select-lr needs --val N (held-out training examples to score on)")
        candidates, cache_path = [float(x) for x in args.select_lr.split(",")], LONG_CACHE
        suffix += f"/val{args.val}" + (f"/head{args.head_lr}" if args.head_lr else "")
        protocol += [f"--val={args.val}"] + ([f"--head-lr={args.head_lr}"] if args.head_lr else [])
    threads = args.threads or PROTOCOL["threads"]
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    arms = args.only.split(",") if args.only else list(ARMS)
    for seed in ([] if args.render else [int(s) for s in args.seeds.split(",")]):
        for setting in args.settings.split(","):
            for arm in arms_on(setting, arms):
                for lr in candidates:
                    key = f"{setting}/{arm}/{seed}{suffix}" + (f"/lr{lr:g}" if lr else "")
                    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}  # a parallel run may have done it
                    if key in cache:
                        continue
                    started = time.perf_counter()
                    cell = cell_in_subprocess(setting, arm, seed, protocol + ([f"--lr={lr}"] if lr else []), threads)
                    cell["seconds"] = round(time.perf_counter() - started, 1)
                    cell["threads"], cell["load_average"] = threads, [round(x, 2) for x in os.getloadavg()]
                    cache = {**(json.loads(cache_path.read_text()) if cache_path.is_file() else {}), key: cell}
                    cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
                    print(f"{key}: {cell}", flush=True)
    print(render_selection(cache, suffix, candidates) if args.select_lr
          else render(cache, list(ARMS), suffix))


if __name__ == "__main__":
    main()
