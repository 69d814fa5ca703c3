"""Regenerate the method table of docs/methods.md: every registered method on two small tasks.

    python benchmarks/methods_table.py                   # run missing cells, rewrite docs/methods.md
    python benchmarks/methods_table.py --only ia3,lora   # (re)run only these methods' cells
    python benchmarks/methods_table.py --render          # rewrite the doc from the cache only

Settings (one cell = one method on one setting, in its own process so peak memory is its own):
  decoder: smollm2-135m on rotten-tomatoes, verbaliser (label words' next-token logits)
  encoder: minilm-l6 on bbc-news, a new classification head trained with the delta
Methods come from the registry, so a newly registered method gets its row on the next run; a
method whose config says `applies_to` excludes a setting, or that cannot attach to the model,
gets a note instead. Cells are cached in docs/methods_table.json (keyed by the protocol below):
an interrupted run resumes where it stopped. Untuned rows evaluate the model with no delta.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "docs" / "methods_table.json"
DOC = ROOT / "docs" / "methods.md"
SETTINGS = {  # the 135M decoder costs ~6x the 22M encoder per example: it gets fewer
    "decoder": {"model": "smollm2-135m", "data": "rotten-tomatoes", "task_type": "verbaliser",
                "train_size": 128},
    "encoder": {"model": "minilm-l6", "data": "bbc-news", "task_type": "head", "train_size": 256},
}
PROMPT_TEXT = {"decoder": "Classify the sentiment of this movie review.",  # soft prompts' init
               "encoder": "Classify the topic of this news article."}
PROTOCOL = {"test_size": 300, "max_length": 64, "epochs": 2, "batch_size": 16,
            "warmup_ratio": 0.1, "seed": 0, "threads": 2}
# Learning rate: the method's `suggested_lr` (what `petkit train --method NAME` uses; soft prompts
# and prefixes need 3-10x LoRA's rate, and at 3e-3 the prefixes and the encoder's new head barely
# move in this short protocol), else DEFAULT_LR.
DEFAULT_LR = 3e-3
BASELINE = "untuned"


def learning_rate(method: str) -> float:
    from petkit.core.registry import suggested_lr

    return suggested_lr(method) or DEFAULT_LR  # the baseline's name is no method: DEFAULT_LR


def recipe(setting: str, method: str) -> Any:
    from petkit.training.config import TrainConfig
    from petkit.app.recipe import DataSpec, ModelSpec, Recipe

    s, p = SETTINGS[setting], PROTOCOL
    data = DataSpec(name=s["data"], task_type=s["task_type"], train_size=s["train_size"],
                    test_size=p["test_size"], max_length=p["max_length"])
    train = TrainConfig(lr=learning_rate(method), max_steps=None, epochs=p["epochs"],
                        batch_size=p["batch_size"], warmup_ratio=p["warmup_ratio"], seed=p["seed"],
                        progress=False, log_every=1000)
    return Recipe(method={"name": "lora" if method == BASELINE else method},
                  model=ModelSpec(s["model"]), data=data, train=train)


def run_cell(setting: str, method: str) -> dict[str, Any]:
    """Train `method` on `setting` in this process; test accuracy, size, memory, step times."""
    import torch

    import petkit
    from petkit.training import train
    from petkit.training.loop import peak_memory_mb
    from petkit.app.pipeline import method_config, prepare, test_metrics

    torch.set_num_threads(PROTOCOL["threads"])
    rec = recipe(setting, method)
    prep, _ = prepare(rec)
    rec = with_text_init(rec, setting, prep.tokenizer)
    base_total = sum(p.numel() for p in prep.model.parameters())
    if method == BASELINE:
        acc = test_metrics(prep, rec)["accuracy"]
        return {"accuracy": acc, "base_params": base_total, "peak_mb": peak_memory_mb(torch.device("cpu"))}
    petkit.attach(prep.model, method_config(rec, prep))
    trainable = sum(p.numel() for p in petkit.trainable_parameters(prep.model).values())
    config = rec.train.replace(label_token_ids=prep.label_token_ids)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(prep.model, prep.train, config, pad_id=prep.pad_id)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    acc = test_metrics(prep, rec)["accuracy"]
    return {"accuracy": acc, "trainable": trainable, "base_params": base_total, "steps": result.steps,
            "cpu_s_per_step": cpu / result.steps, "wall_s_per_step": wall / result.steps,
            "peak_mb": peak_memory_mb(torch.device("cpu")), "lr": config.lr}


def with_text_init(rec: Any, setting: str, tokenizer: Any) -> Any:
    """Soft prompts (methods with `init_text_ids`) start from the setting's task sentence.

    Lester et al.'s text initialisation: the prompt's first embeddings are those of a sentence
    describing the task, so the untuned prompt does not push the model off its base accuracy
    (random vocabulary tokens in front of every input do, and 16 steps do not undo it).
    """
    import dataclasses

    import petkit

    if rec.method["name"] == BASELINE:
        return rec
    names = {f.name for f in dataclasses.fields(petkit.get_method(rec.method["name"]).config_cls)}
    if "init_text_ids" not in names:
        return rec
    ids = list(tokenizer(PROMPT_TEXT[setting], add_special_tokens=False)["input_ids"])
    method = {**rec.method, "init": "text", "init_text_ids": ids, "num_virtual_tokens": len(ids)}
    if "branch_init" in names:  # residual prompt: P' starts as the sentence too
        method["branch_init"] = "zero"
    return dataclasses.replace(rec, method=method)


def skip_reason(setting: str, method: str) -> str | None:
    """Why a method has no cell for a setting (its config's `applies_to`), else None."""
    import petkit

    if method == BASELINE:
        return None
    applies = getattr(petkit.get_method(method).config_cls, "applies_to", ("decoder", "encoder"))
    return None if setting in applies else f"not meant for {setting}s (applies_to={list(applies)})"


def cell_in_subprocess(setting: str, method: str) -> dict[str, Any]:
    """One cell in a fresh process (its own peak memory); errors become a note."""
    # Passive OpenMP waits: idle threads sleep instead of spinning, so CPU time counts work only.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(PROTOCOL["threads"]),
           "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, __file__, "--cell", setting, method]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return {**json.loads(lines[-1]), "cpu_seconds": round(cpu, 1)}
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"note": (err[-1] if err else f"exit code {proc.returncode}")[:200]}


def methods() -> list[tuple[str, str]]:
    import petkit

    return [(name, family) for name, family, _ in petkit.list_methods()]


def load_cache() -> dict[str, Any]:
    """The cached cells, or none when the protocol changed (a method's LR is per cell)."""
    protocol = {**PROTOCOL, "settings": SETTINGS}
    if CACHE.is_file():
        cache = json.loads(CACHE.read_text())
        if cache.get("protocol") == protocol:
            return cache
        print("protocol changed: every cell runs again", flush=True)
    return {"protocol": protocol, "cells": {}}


def run_missing(cache: dict[str, Any], only: set[str] | None) -> None:
    todo = [BASELINE, *(m for m, _ in methods())]
    for method in todo:
        for setting in SETTINGS:
            key = f"{setting}/{method}"
            if only is not None and method not in only:
                continue
            if only is None and key in cache["cells"]:
                continue
            reason = skip_reason(setting, method)
            started = time.perf_counter()
            cell = {"note": reason} if reason else cell_in_subprocess(setting, method)
            cell["seconds"] = round(time.perf_counter() - started, 1)
            cache["cells"].update(load_cache()["cells"])  # keep what a parallel run wrote meanwhile
            cache["cells"][key] = cell
            CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
            print(f"{key}: {cell}", flush=True)


KEPT = "<!-- below: written by hand; benchmarks/methods_table.py keeps it -->"


def hand_written() -> str:
    """The doc's hand-written sections (from the KEPT marker on), kept when the tables are redone."""
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    return "\n" + text[text.index(KEPT):] if KEPT in text else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated methods to (re)run; 'untuned' is the baseline")
    parser.add_argument("--render", action="store_true", help="only rewrite the doc from the cache")
    parser.add_argument("--cell", nargs=2, metavar=("SETTING", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cell:
        print(json.dumps(run_cell(*args.cell)), flush=True)
        return
    cache = load_cache()
    if not args.render:
        run_missing(cache, set(args.only.split(",")) if args.only else None)
    from methods_doc import render

    DOC.write_text(render(cache, methods(), SETTINGS, PROTOCOL, BASELINE) + hand_written(), encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
