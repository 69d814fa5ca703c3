"""Recipes: a whole run (method, model, data, train, runtime) as one validated object, YAML
round-trip.

A recipe file has five sections (each optional)::

    method:  {name: lora, r: 8, targets: [q_proj, v_proj]}   # fields of that method's config
    model:   {name: smollm2-135m}                             # ModelSpec fields
    data:    {name: rotten-tomatoes, train_size: 512}         # DataSpec fields
    train:   {lr: 1.0e-3, max_steps: 60}                      # TrainConfig fields
    runtime: {device: cpu, precision: auto}                   # RuntimeConfig fields

`runtime` travels as `Recipe.train.runtime`; runtime keys written in `train:` (earlier releases)
still work, with a DeprecationWarning naming `runtime.<field>`.

Dotted overrides (`method.r=16`, `train.lr=1e-4`) are checked against those dataclasses, so the
CLI's generic flags come from the configs themselves.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from petkit.app.safe_yaml import load_yaml_file
from petkit.app.train_options import option_type, set_option
from petkit.core.config_io import check_keys, dataclass_from_dict
from petkit.core.errors import ConfigError
from petkit.training.config import LEGACY_KEYS, TrainConfig
from petkit.training.runtime import RUNTIME_FIELDS, RuntimeConfig
from petkit.core.registry import get_method, make_config
from petkit.recipes import shipped
from petkit.data import BAD_ROWS, EMBEDDED_TASKS, FORMATS, is_data_file, is_source
from petkit.data.chat import TRAIN_ON

TASK_TYPES = ("auto", "verbaliser", "head", "instruction")
SECTIONS = ("method", "model", "data", "train", "runtime")


@dataclass(frozen=True)
class ModelSpec:
    """Which pretrained model to tune: an embedded short name, a local folder or a hub id."""

    name: str = "smollm2-135m"
    quantize: str | None = None  # nf4 | fp4 | int8: the base's linear layers (pk.quantize) before attaching
    prune: str | None = None  # loraprune | apt: structured pruning while tuning (petkit.compress)
    sparsity: float = 0.5  # with prune: fraction of block parameters removed (decoder or BERT-style encoder)

    def __post_init__(self) -> None:
        """Validate."""
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model.name must be a non-empty string, got {self.name!r}")
        if self.quantize not in (None, "nf4", "fp4", "int8"):
            raise ConfigError(f"model.quantize must be nf4, fp4 or int8, got {self.quantize!r}")
        if self.prune not in (None, "loraprune", "apt"):
            raise ConfigError(f"model.prune must be loraprune or apt, got {self.prune!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity <= 0.95:
            raise ConfigError(f"model.sparsity must be in (0, 0.95], got {self.sparsity!r}")
        if self.prune and self.quantize:
            raise ConfigError("model.prune with model.quantize is not supported: pruning slices dense weights")


@dataclass(frozen=True)
class DataSpec:
    """Which task, how it becomes training examples and how much of it is used.

    task_type: "verbaliser" (decoder, label-word logits), "head" (new classification head),
    "instruction" (causal LM on completions) or "auto" (instruction for instruction tasks, head
    for encoder models, verbaliser otherwise). Sizes are seeded subsets; None uses everything.
    `validation_size` examples are split off the training subset for best-by-validation selection.
    """

    name: str = "rotten-tomatoes"
    task_type: str = "auto"
    train_size: int | None = None
    test_size: int | None = None
    validation_size: int = 0  # examples split off the training subset to pick the best step
    max_length: int = 128
    image_size: int = 224  # image tasks: side of the ViT's input (dinov2-s: a multiple of 14)
    test_file: str | None = None
    validation_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    test_fraction: float = 0.2  # share of a task without a test split held out for testing
    labels: list[str] | None = None  # label names in order (None: as the data names them)
    format: str = "auto"  # a data format of petkit.data.formats (auto: recognised from the columns)
    split: str = "train"  # datasets: the split that trains (a `test` split is the test set)
    config: str | None = None  # hub datasets: the configuration (subset) name
    chat_template: str | None = None  # None: the model's own; chatml | llama3 | zephyr | a file
    train_on: str = "assistant"  # chat: assistant | last | all (tokens that carry the loss)
    bad_rows: str = "error"  # malformed rows: error (named) | skip (named in the run's notes)

    def __post_init__(self) -> None:
        """Validate each field."""
        choices = {"format": ("auto", *FORMATS), "train_on": TRAIN_ON, "bad_rows": BAD_ROWS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} (data.{name}) must be one of "
                                  f"{', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("name", "text_column", "label_column", "prompt_column", "completion_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"data.{name} must be a non-empty string, got {value!r}")
        for name in ("test_file", "validation_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"data.{name} must be None or a file path, got {value!r}")
        if not isinstance(self.test_fraction, (int, float)) or not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.labels is not None and (not isinstance(self.labels, list) or len(self.labels) < 2):
            raise ConfigError(f"data.labels must be None or a list of >= 2 label names, "
                              f"got {self.labels!r}")
        if self.task_type not in TASK_TYPES:
            raise ConfigError(f"data.task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{name} must be None or an int >= 1, got {value!r}")
        if not isinstance(self.validation_size, int) or self.validation_size < 0:
            raise ConfigError(f"data.validation_size must be an int >= 0, "
                              f"got {self.validation_size!r}")
        if not isinstance(self.max_length, int) or not 8 <= self.max_length <= 32768:
            raise ConfigError(f"data.max_length must be an int in [8, 32768], "
                              f"got {self.max_length!r}")
        self._check_columns_fit_task()

    def _check_columns_fit_task(self) -> None:
        """Column names are for the user's own file: an embedded task has its own columns."""
        if self.name not in EMBEDDED_TASKS:
            return
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("text_column", "label_column", "prompt_column", "completion_column"):
            if getattr(self, name) != defaults[name]:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} names a column of your own "
                                  f"data file, but data.name={self.name!r} is an embedded task "
                                  f"with its own columns: drop data.{name}, or give your file "
                                  f"as data.name")


@dataclass(frozen=True)
class Recipe:
    """A complete run. `method` is the method's name plus its config fields (checked on use)."""

    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)

    def method_config(self) -> Any:
        """The petkit method config this recipe describes (validated by the method)."""
        fields = {k: v for k, v in self.method.items() if k != "name"}
        return make_config(self.method_name, **fields)

    @property
    def method_name(self) -> str:
        """Registered name of the method."""
        return str(self.method.get("name", "lora"))

    @property
    def runtime(self) -> RuntimeConfig:
        """The runtime section (carried by the train config into `pk.train`)."""
        return self.train.runtime  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the five sections."""
        train = self.train.to_dict()
        runtime = train.pop("runtime")
        return {"method": dict(self.method), "model": dataclasses.asdict(self.model),
                "data": dataclasses.asdict(self.data), "train": train, "runtime": runtime}

    def to_yaml(self) -> str:
        """YAML text that `recipe_from_dict(yaml.safe_load(...))` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section(cls: type, data: Any, section: str) -> Any:
    """Build dataclass `cls` from the mapping `data` (None: defaults), naming unknown keys."""
    extra = (*LEGACY_KEYS, *RUNTIME_FIELDS) if cls is TrainConfig else ()  # deprecated flat keys
    return dataclass_from_dict(cls, data, section, extra=extra)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Recipe from a {method, model, data, train, runtime} mapping; missing sections take
    defaults."""
    if not isinstance(data, dict):
        raise ConfigError("a recipe must be a mapping with sections " + ", ".join(SECTIONS))
    if "dp" in data:  # a top-level `dp:` is the train section's DP options (training/dp.py)
        data = {**data, "train": {**(data.get("train") or {}), "dp": data["dp"]}}
        del data["dp"]
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"recipe has unknown section(s) {unknown}; sections: {list(SECTIONS)}")
    method = data.get("method") or {"name": "lora"}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict):
        raise ConfigError("recipe section 'method' must be a mapping with a 'name'")
    return Recipe(method=dict(method), model=_section(ModelSpec, data.get("model"), "model"),
                  data=_section(DataSpec, data.get("data"), "data"),
                  train=_train(data.get("train"), data.get("runtime")))


def _train(train: Any, runtime: Any) -> TrainConfig:
    """The train section with the runtime section inside (`TrainConfig.runtime`)."""
    if train is not None and not isinstance(train, dict):
        return _section(TrainConfig, train, "train")  # the error naming the section
    train = dict(train or {})
    train.setdefault("runtime", _section(RuntimeConfig, runtime, "runtime"))
    return _section(TrainConfig, train, "train")


def shipped_recipes(subfolder: str = "") -> dict[str, Path]:
    """YAML recipes shipped in `petkit/recipes/<subfolder>`, by file stem."""
    return shipped(subfolder)


def builtin_recipes() -> dict[str, Path]:
    """The training recipes shipped in `petkit/recipes/`, by file stem."""
    return shipped_recipes()


def read_yaml_mapping(path_or_name: str | Path, shipped: dict[str, Path],
                      what: str = "recipe") -> dict[str, Any]:
    """The mapping in a YAML file, or in the shipped file of that name; `ConfigError` if neither
    exists or the YAML does not parse. Shared by every kind of recipe (training, federated)."""
    path = Path(path_or_name)
    if not path.is_file():
        if str(path_or_name) not in shipped:
            raise ConfigError(f"{what} {str(path_or_name)!r} is not a file nor a shipped {what} "
                              f"({', '.join(sorted(shipped)) or 'none'})")
        path = shipped[str(path_or_name)]
    data = load_yaml_file(path, what)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} {path} holds a YAML {type(data).__name__}; a {what} is a "
                          "mapping of sections (method:, model:, data:, train:, ...)")
    return data or {}


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Read a recipe from a YAML file, or a shipped one by name ("default", "minilm-bbc")."""
    return recipe_from_dict(read_yaml_mapping(path_or_name, builtin_recipes()))


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _accepts(annotation: Any, kind: type) -> bool:
    return annotation is kind or kind in typing.get_args(annotation)


def parse_value(text: str, annotation: Any = Any) -> Any:
    """A flag's text as a value of `annotation`: YAML scalars/lists, with numbers made floats
    where the field is a float (YAML reads "1e-4" as a string); "none" means None, except for a
    field that takes only text, where it is the word (`--runtime.kernels=none`)."""
    if text.strip().lower() == "none":
        return text.strip() if annotation is str else None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if annotation is str or annotation == str | None:  # a column or file named "1" stays text
        return value if value is None else text
    if _accepts(annotation, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _comma_list(value: Any, annotation: Any) -> Any:
    """"q_proj,k_proj" for a field that takes a list is that list (targets, modules_to_save);
    "5,6" for a list of ints (label_token_ids) is [5, 6]; a text with a regex repetition like
    {1,3} stays one pattern."""
    kinds = (annotation, *typing.get_args(annotation))
    takes_list = any(typing.get_origin(a) in (list, tuple) or a in (list, tuple) for a in kinds)
    if not (takes_list and isinstance(value, str) and "," in value and "{" not in value):
        return value
    items = [item.strip() for item in value.split(",") if item.strip()]  # as a YAML list reads
    ints = any(typing.get_args(a) == (int,) for a in kinds)
    return [int(i) for i in items] if ints and all(i.lstrip("-").isdigit() for i in items) \
        else items


def _section_class(data: dict[str, Any], section: str) -> type:
    if section == "method":
        return get_method(str(data["method"].get("name", "lora"))).config_cls
    return {"model": ModelSpec, "data": DataSpec, "train": TrainConfig,
            "runtime": RuntimeConfig}[section]


def apply_overrides(recipe: Recipe, overrides: dict[str, str]) -> Recipe:
    """Apply {"section.field": text} overrides, e.g. {"train.lr": "1e-4", "method.r": "16"}."""
    data = recipe.to_dict()  # validated once, at the end: overrides may depend on each other
    # Method name first: the other method fields are checked against that method's config;
    # the optimizer before the train options, since it picks the stepper whose options they are.
    first = ("method.name", "train.optimizer")
    ordered = sorted(overrides.items(), key=lambda kv: kv[0] not in first)
    for key, text in ordered:
        section, _, name = key.partition(".")
        if section == "dp":  # --dp.epsilon: the train section's DP options (training/dp.py)
            section, name = "train", f"dp.{name}"
        if section not in SECTIONS or not name:
            raise ConfigError(f"override {key!r} must look like <section>.<field> with section "
                              f"in {list(SECTIONS)}")
        if key == "method.name" and text != data["method"].get("name"):
            data["method"] = {"name": text}
            continue
        if section == "train":  # nested stepper / IST options and flat legacy keys
            annotation = option_type(data["train"], name)
            set_option(data["train"], name, _comma_list(parse_value(text, annotation), annotation))
            continue
        cls = _section_class(data, section)
        known = {f.name for f in dataclasses.fields(cls)} | ({"name"} if section == "method" else set())
        check_keys({key: text}, [f"{section}.{k}" for k in known], section)
        annotation = str if name == "name" else _field_type(cls, name)
        data[section][name] = _comma_list(parse_value(text, annotation), annotation)
    _fresh_file_sizes(recipe, data["data"], overrides)
    return recipe_from_dict(data)


def _fresh_file_sizes(recipe: Recipe, data: dict[str, Any], overrides: dict[str, str]) -> None:
    """A user file that an override names trains and tests on all its rows: the sizes and label
    names that came with the recipe's previous task are dropped unless these overrides set them."""
    if data["name"] == recipe.data.name or not is_source(data["name"]):
        return
    for key in ("train_size", "test_size", "labels"):
        if f"data.{key}" not in overrides:
            data[key] = None
