"""Benchmark grids from YAML: tasks x arms x seeds x training sizes, checked before anything runs.

    tasks:                                  # a model + data pair each
      - {name: rt, model: smollm2-135m, data: rotten-tomatoes, max_length: 64, test_size: 300}
    methods: all                            # every registered method, or a list:
                                            #   [lora, {name: prompt, num_virtual_tokens: 10}]
                                            # PEFT's implementation alone (`kind: peft`):
                                            #   {name: lora, arm: peft-lora, kind: peft, r: 8}
                                            # compressed bases (`arm` names the row):
                                            #   {name: lora, arm: qlora-nf4, quantize: nf4}
                                            #   {name: lora, arm: loraprune-50, prune: {sparsity: 0.5}}
    exclude: [cola]                         # with `all`: methods to leave out
    method_options:                         # per method: config fields, and `train` overrides
      prompt: {num_virtual_tokens: 10, train: {lr: 3.0e-2}}
    baselines:
      full: {lr: 5.0e-5}                    # full fine-tuning (TrainConfig overrides), or true
      peft: true                            # the `peft` twin of each petkit method peft also has
    seeds: [0, 1, 2]
    sizes: [64, 256, 1024, full]            # training examples, validation carved from them
    validation: {fraction: 0.2, max: 64}    # fraction 0: no validation, the last step is kept
    train: {epochs: 5, max_steps: 30, batch_size: 8, eval_every: 10, lr: 1.0e-3}

Image tasks (docs/vision.md): a task takes `image_size` and `classes` (the labels kept, relabelled
0..k-1 in that order); `shots: [1, 2, 4]` instead of `sizes` draws k training examples per class;
`baselines: {linear-probe: true}` trains the new head alone; a method entry's `arm` names it (two
entries of one method) and its `pretrain: {classes: [0, 1, 2, 3, 4], train: {max_steps: 40}}`
starts it from the same method trained on those classes of the task's training split (PVP).

An *arm* is what a cell trains: a petkit method, the full fine-tuning baseline or a `peft`
baseline. Each cell has a fingerprint of everything that decides its result (resolved method
config included), so a resumed grid re-runs a cell whose definition changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petkit.app.recipe import Recipe, apply_overrides
from petkit.app.safe_yaml import load_yaml_file
from petkit.compress.prune import PruneConfig
from petkit.core.errors import ConfigError
from petkit.training.config import TrainConfig
from petkit.core.registry import METHODS, get_method, make_config
from petkit.benchmark.spec_values import (FULL, label_ids, as_mapping, no_unknown, seed_list,
                                          sizes_or_shots, stack_entries_of, with_adapter_lr)

KEYS = ("tasks", "methods", "method_options", "baselines", "seeds", "sizes", "shots", "validation",
        "train", "threads")
TASK_KEYS = ("name", "model", "data", "task_type", "max_length", "test_size", "train",
             "image_size", "classes")
PRETRAIN_KEYS = ("classes", "train", "seed")
LINEAR_PROBE = "linear-probe"
# petkit methods that `peft` also implements: the twins the peft baseline runs.
PEFT_TWINS = ("lora", "prefix", "prompt", "ia3")


@dataclass(frozen=True)
class TaskSpec:
    """A model + data pair; `train` overrides the grid's TrainConfig fields for this task."""

    name: str
    model: str
    data: str
    task_type: str = "auto"
    max_length: int = 128
    test_size: int | None = 300
    train: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224  # image tasks: the ViT's input side
    classes: tuple[int, ...] | None = None  # image tasks: labels kept, relabelled in this order


@dataclass(frozen=True)
class ArmSpec:
    """What a cell trains. kind: "petkit" | "full" | "peft"; `method` is the petkit method name
    (for "peft", the method whose twin runs); `options` its config fields; `pretrain` (petkit
    arms): classes, train overrides and seed of the source run whose delta the arm starts from."""

    name: str
    kind: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None  # petkit arms: nf4 | fp4 | int8 base (pk.quantize) before attaching
    prune: dict[str, Any] = field(default_factory=dict)  # petkit arms: PruneConfig fields (LoRAPrune, APT)
    # petkit arms: more methods trained beside `method`, each {name, adapter, options, lr}: attached
    # as adapter `adapter` and trained together with it, at `lr` (None: the arm's rate)
    stack: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    task: TaskSpec
    arm: ArmSpec
    size: int | None  # None: the full training set
    seed: int
    per_class: bool = False  # size counts examples per class (shots)

    @property
    def size_label(self) -> str:
        """"64", "256", ... or "full"."""
        return FULL if self.size is None else str(self.size)

    @property
    def unit(self) -> str:
        """"k" (shots per class) or "n" (training examples)."""
        return "k" if self.per_class else "n"

    @property
    def key(self) -> str:
        """Readable unique id: task/arm/size/seed."""
        return f"{self.task.name}/{self.arm.name}/{self.unit}={self.size_label}/seed={self.seed}"


@dataclass(frozen=True)
class BenchSpec:
    """A validated grid."""

    tasks: tuple[TaskSpec, ...]
    arms: tuple[ArmSpec, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    sizes: tuple[int | None, ...] = (64, 256, 1024, None)
    validation_fraction: float = 0.2
    validation_max: int | None = None
    train: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    per_class: bool = False  # sizes are shots per class
    # `petkit bench --train.F / --runtime.F`: applied to every run's TrainConfig, last
    overrides: dict[str, str] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every cell; seeds outermost, so a grid cut short still compares every arm."""
        return [Cell(task, arm, size, seed, self.per_class) for seed in self.seeds
                for task in self.tasks for size in self.sizes for arm in self.arms]

    def train_config(self, cell: Cell) -> TrainConfig:
        """The grid's, then the task's, then the arm's TrainConfig fields; the cell's seed."""
        fields = {"progress": False, **self.train, **cell.task.train, **cell.arm.train}
        return self._overridden({**fields, "seed": cell.seed, "output_dir": None,
                                 "resume": False, "save_every": 0})

    def pretrain_config(self, cell: Cell) -> TrainConfig:
        """TrainConfig of the arm's source run: the cell's fields, then `pretrain.train`; no
        validation (nothing of the source task's test split is read)."""
        fields = {"progress": False, **self.train, **cell.task.train, **cell.arm.train,
                  **cell.arm.pretrain.get("train", {})}
        return self._overridden({**fields, "seed": cell.arm.pretrain.get("seed", 0),
                                 "output_dir": None, "resume": False, "save_every": 0,
                                 "eval_every": 0})

    def _overridden(self, fields: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of `fields` with the command line's section overrides on top."""
        config = TrainConfig.from_dict(fields)
        return apply_overrides(Recipe(train=config), self.overrides).train if self.overrides \
            else config

    def fingerprint(self, cell: Cell) -> str:
        """Hash of everything that decides the cell's result."""
        method = resolved_options(cell.arm) if cell.arm.method else {}
        blob = {"task": _set_fields(cell.task), "arm": _set_fields(cell.arm), "method": method, "size": cell.size, "seed": cell.seed,
                "validation": [self.validation_fraction, self.validation_max],
                "train": set_train_fields(self.train_config(cell))}
        if cell.arm.stack:  # the stacked methods' full configs (defaults filled in)
            blob["stack"] = [make_config(e["name"], **e["options"]).to_dict() for e in cell.arm.stack]
        if cell.per_class:  # only when set, so the fingerprints of earlier grids stay
            blob["per_class"] = True
        if cell.arm.pretrain:
            blob["pretrain_train"] = set_train_fields(self.pretrain_config(cell))
        text = json.dumps(blob, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_train_fields(config: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields that differ from their defaults: a field added to TrainConfig later
    (with a default that keeps the old behaviour) leaves finished cells finished. Runtime fields
    count by their flat names, as before the runtime section, so fingerprints stay the same."""
    defaults = _flat_train(TrainConfig())
    return {k: v for k, v in _flat_train(config).items() if k not in defaults or v != defaults[k]}


def _flat_train(config: TrainConfig) -> dict[str, Any]:
    data = config.to_dict()
    return {**data.pop("runtime"), **data}


def _set_fields(spec: TaskSpec | ArmSpec) -> dict[str, Any]:
    """The spec as a dict; the image / pretraining fields only when set (older fingerprints stay)."""
    later = {"image_size": 224, "classes": None, "pretrain": {}, "stack": ()}
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in later or v != later[k]}


def resolved_options(arm: ArmSpec) -> dict[str, Any]:
    """The method's full config (defaults filled in) as a dict."""
    assert arm.method is not None
    return make_config(arm.method, **arm.options).to_dict()


def _task(data: Any, index: int) -> TaskSpec:
    entry = as_mapping(data, f"tasks[{index}]")
    no_unknown(entry, TASK_KEYS, f"tasks[{index}]")
    for key in ("model", "data"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"bench spec: tasks[{index}].{key} must be a non-empty string")
    entry.setdefault("name", f"{entry['data']}-{entry['model']}")
    entry["train"] = as_mapping(entry.get("train"), f"tasks[{index}].train")
    size = entry.get("image_size", 224)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"bench spec: tasks[{index}].image_size must be an int >= 1, got {size!r}")
    if entry.get("classes") is not None:
        entry["classes"] = label_ids(entry["classes"], f"tasks[{index}].classes")
    return TaskSpec(**entry)


def _pretrain(value: Any, where: str) -> dict[str, Any]:
    """`{classes: [...], train: {...}, seed: 0}` of a PVP arm (classes required)."""
    pre = as_mapping(value, where)
    if not pre:
        return {}
    no_unknown(pre, PRETRAIN_KEYS, where)
    pre["classes"] = list(label_ids(pre.get("classes"), f"{where}.classes"))
    pre["train"] = as_mapping(pre.get("train"), f"{where}.train")
    seed = pre.setdefault("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"bench spec: {where}.seed must be an int >= 0, got {seed!r}")
    return pre


def _method_arm(entry: Any, options: dict[str, Any]) -> ArmSpec:
    """A petkit arm from `lora` or `{name: lora, r: 4, train: {...}}` plus method_options."""
    fields = {"name": entry} if isinstance(entry, str) else as_mapping(entry, "methods entry")
    name = fields.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"bench spec: each methods entry needs a name, got {entry!r}")
    merged = {**as_mapping(options.get(name), f"method_options.{name}"), **fields}
    train = as_mapping(merged.pop("train", None), f"{name}.train")
    label = merged.pop("arm", name)
    if not isinstance(label, str) or not label:
        raise ConfigError(f"bench spec: {name}.arm must be a non-empty string, got {label!r}")
    kind = merged.pop("kind", "petkit")
    if kind not in ("petkit", "peft"):
        raise ConfigError(f"bench spec: {label}.kind must be petkit or peft, got {kind!r}")
    pretrain = _pretrain(merged.pop("pretrain", None), f"{label}.pretrain")
    quantize, prune = merged.pop("quantize", None), as_mapping(merged.pop("prune", None), f"{label}.prune")
    stack_entries = merged.pop("stack", None)
    make_config(name, **merged)  # unknown method / bad field: ConfigError now
    if quantize not in (None, "nf4", "fp4", "int8"):
        raise ConfigError(f"bench spec: {label}.quantize must be nf4, fp4 or int8, got {quantize!r}")
    if prune:
        PruneConfig(**prune)  # a bad field fails now
    if kind == "peft" and (pretrain or quantize or prune):
        raise ConfigError(f"bench spec: {label} (kind: peft) takes no pretrain, quantize or prune")
    stack = stack_entries_of(stack_entries, label, bool(kind == "peft" or pretrain or quantize or prune))
    rates = {m["adapter"]: m["lr"] for m in stack if m["lr"] is not None}
    if rates:
        train = {**train, "stepper": with_adapter_lr(train.get("stepper", "backprop"), rates, label)}
    return ArmSpec(name=label, kind=kind, method=name, options=merged, train=train,
                   pretrain=pretrain, quantize=quantize, prune=prune, stack=stack)


def _has_defaults(method: str) -> bool:
    """Whether `method`'s config builds with no fields given."""
    try:
        make_config(method)
    except ConfigError:
        return False
    return True


def _arms(data: dict[str, Any]) -> list[ArmSpec]:
    options = as_mapping(data.get("method_options"), "method_options")
    for name in options:
        get_method(name)  # a typo in a method name: ConfigError listing the registered
    methods = data.get("methods", "all")
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list):
        raise ConfigError("bench spec: exclude must be a list of method names")
    if methods == "all":  # every method that has defaults to run with (not trainable-tokens)
        methods = [name for name in METHODS if name not in exclude and _has_defaults(name)]
    if not isinstance(methods, list):
        raise ConfigError("bench spec: methods must be 'all' or a list of method entries")
    arms = [_method_arm(m, options) for m in methods]
    baselines = as_mapping(data.get("baselines"), "baselines")
    no_unknown(baselines, (FULL, LINEAR_PROBE, "peft"), "baselines")
    for kind in (LINEAR_PROBE, FULL):
        wanted = baselines.get(kind)
        if wanted:
            arms.append(ArmSpec(kind, kind, train={} if wanted is True else as_mapping(wanted, kind)))
    peft = baselines.get("peft")
    if peft:
        wanted = PEFT_TWINS if peft is True else tuple(peft)
        arms += [dataclasses.replace(a, name=f"peft:{a.method}", kind="peft")
                 for a in list(arms) if a.kind == "petkit" and a.method in wanted
                 and not (a.quantize or a.prune or a.stack)]  # twins of the plain arms only
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"bench spec: arm names repeat in {names}; give entries distinct names")
    return arms


def spec_from_dict(data: dict[str, Any]) -> BenchSpec:
    """Build and check a grid from its YAML mapping (every TrainConfig is built once)."""
    data = as_mapping(data, "the spec")
    no_unknown(data, KEYS + ("exclude",), "the spec")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError("bench spec: tasks must be a non-empty list of {model, data} entries")
    validation = as_mapping(data.get("validation"), "validation")
    no_unknown(validation, ("fraction", "max"), "validation")
    fraction = validation.get("fraction", 0.2)
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"bench spec: validation.fraction must be in [0, 1), got {fraction!r}")
    vmax = validation.get("max")
    if vmax is not None and (not isinstance(vmax, int) or vmax < 1):
        raise ConfigError(f"bench spec: validation.max must be an int >= 1, got {vmax!r}")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"bench spec: threads must be an int >= 1, got {threads!r}")
    spec = BenchSpec(tasks=tuple(_task(t, i) for i, t in enumerate(tasks)),
                     arms=tuple(_arms(data)), seeds=seed_list(data.get("seeds", [0, 1, 2])),
                     sizes=sizes_or_shots(data), validation_fraction=float(fraction),
                     validation_max=vmax, train=as_mapping(data.get("train"), "train"),
                     threads=threads, per_class="shots" in data)
    names = [t.name for t in spec.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"bench spec: task names repeat in {names}")
    return checked(spec)


PER_CELL = ("train.seed", "train.output_dir", "train.resume", "train.save_every")


def with_overrides(spec: BenchSpec, overrides: dict[str, str]) -> BenchSpec:
    """`spec` whose every run takes the `--train.F` / `--runtime.F` overrides (checked now);
    the fields the grid sets per cell (PER_CELL) are refused."""
    fixed = sorted(k for k in overrides if k in PER_CELL)
    if fixed:
        raise ConfigError(f"petkit bench sets {', '.join('--' + k for k in fixed)} per cell "
                          "(the grid's seeds:, its run folder); drop the option")
    return checked(dataclasses.replace(spec, overrides=dict(overrides)))


def checked(spec: BenchSpec) -> BenchSpec:
    """`spec` once every (task, arm) builds its TrainConfig: a bad field fails before the grid."""
    for task in spec.tasks:  # a bad train field fails here, not after an hour of grid
        for arm in spec.arms:
            spec.train_config(Cell(task, arm, None, spec.seeds[0]))
            if arm.pretrain:
                spec.pretrain_config(Cell(task, arm, None, spec.seeds[0]))
    return spec


def load_spec(path: str | Path) -> BenchSpec:
    """Read a grid from a YAML file."""
    return spec_from_dict(load_yaml_file(Path(path), "bench spec") or {})
