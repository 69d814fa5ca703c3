"""The `--<section>.<field>` flags of every subcommand, derived from the sections' dataclasses.

A section is a frozen dataclass owned by the code that reads it (`SOURCES`: `train` is
`TrainConfig`, `runtime` is `RuntimeConfig`, ...). Every subcommand takes every section's fields as
flags (`--train.lr`, `--runtime.device`), listed in its `--help` grouped per section with their
type or choices, default and help text, unless `NOT_APPLICABLE` says why a section does not apply
to it. A field added to a section appears everywhere with no other edit.

The fields are read from the dataclasses' source with `ast` (only each class's statement is
parsed), not by importing them: the sections live beside torch code, and `petkit <command>
--help` must not import torch (tests/test_startup.py). `tests/test_cli_sections.py` checks that what is read here equals
`dataclasses.fields()` of each class. A field's help is its `metadata["help"]`, else the comment
on its line; its choices are `metadata["choices"]`. The method's section depends on `--method` and
the stepper's on `--optimizer`: every registered stepper's fields are listed, and a method's
fields pass through as `--method.FIELD=VALUE` (checked against that method's config on use).
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petkit.app.aliases import ALIASES
from petkit.cli_flags import HELP
from petkit.cli_io import UsageError
from petkit.continual import cli as continual_cli  # flags only
from petkit.fed import flags as fed_flags  # flags only: nothing optional

# Short flags (name -> field) and their help, for the fields that have no help of their own.
SHORT_FLAGS = ((ALIASES, HELP), (fed_flags.FLAGS, fed_flags.HELP))

PACKAGE = Path(__file__).resolve().parent
# section -> (file under src/petkit, class); "train.stepper" is every StepperConfig in steppers/.
SOURCES = {"model": ("app/recipe.py", "ModelSpec"), "data": ("app/recipe.py", "DataSpec"),
           "train": ("training/config.py", "TrainConfig"),
           "runtime": ("training/runtime.py", "RuntimeConfig"),
           "train.objective": ("training/objectives_config.py", "ObjectiveConfig"),
           "train.ist": ("training/steppers/ist.py", "IstConfig"),
           "train.dp": ("training/dp.py", "DPConfig"),
           "fed": ("fed/config.py", "FedConfig")}
STEPPERS = "training/steppers"
RECIPE = ("method", "model", "data", "train", "runtime")  # the sections of a training recipe
SUBSECTIONS = ("train.stepper", "train.objective", "train.ist", "train.dp")
TRAIN_NESTED = {"runtime", "ist", "dp"}  # TrainConfig fields that are sections of their own
# Sections each subcommand takes beyond the recipe's.
EXTRA = {"fed": ("fed",)}
# Why a section does not apply to a subcommand (the only exceptions to "every section").
NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "methods": dict.fromkeys(RECIPE, "it lists the registered methods and runs nothing"),
    "embedded": dict.fromkeys(RECIPE, "it lists the embedded tasks and models and runs nothing"),
    "replay": dict.fromkeys(RECIPE, "it rebuilds the adapter exactly as the zeroth-order run's "
                                    "log and saved recipe say"),
    "bench": {"method": "the grid names each arm's method and fields (methods:, method_options:)",
              "model": "each task of the grid names its model (tasks: - model:)",
              "data": "each task of the grid names its data (tasks: - data:)"},
    "continual": {"data": "the tasks and their sizes come from --tasks, --max-train, "
                          "--max-test and --max-length"},
    "quantize": {"method": "--method picks efficientqat or rtn, not a PET method",
                 "model": "--model names the causal LM, quantised from full precision",
                 "data": "calibration text comes from --calibration, --samples, --seq-len",
                 "train": "Block-AP has its own schedule: --epochs, --lr-weight, --lr-quant",
                 "runtime": "it runs where the model loads (the CPU), in full precision"},
    **{cmd: {"method": "it answers with saved adapters (--adapter)",
             "data": "it answers prompts, it reads no task",
             "train": "it trains nothing"} for cmd in ("generate", "chat", "serve")},
    # (generate / chat / serve read model.name, model.quantize and runtime.device of the
    # sections they take, and refuse the other fields by name: app/serving.py)
}
DEST = "section_values"  # the namespace attribute holding {"section.field": text}, in order


@dataclass(frozen=True)
class FieldDoc:
    """One field of a section as `--help` shows it."""

    name: str
    type: str  # the annotation's source text
    default: str  # as a flag would spell it ("none", "true", "2e-4"), "" when computed
    help: str
    choices: tuple[str, ...] = ()


@functools.lru_cache(maxsize=None)
def _lines(path: str) -> tuple[str, ...]:
    return tuple((PACKAGE / path).read_text(encoding="utf-8").splitlines())


def _statement(path: str, pattern: str) -> tuple[ast.stmt, int] | None:
    """The top-level statement of `path` whose first line matches `pattern`, parsed alone (not
    the whole file: `--help` stays fast), and the number of lines before it."""
    lines = _lines(path)
    for start, line in enumerate(lines):
        if re.match(pattern, line):
            end = start + 1  # up to the next line that starts a top-level statement
            while end < len(lines) and (not lines[end] or lines[end][0] in " \t#)]}"):
                end += 1
            return ast.parse("\n".join(lines[start:end])).body[0], start
    return None


def _constant(path: str, name: str, depth: int = 0) -> Any:
    """The literal value of module-level `name` in `path`, following `from petkit.x import name`."""
    found = _statement(path, rf"{name}\s*(:[^=]*)?=")
    if found is not None:
        return ast.literal_eval(found[0].value)  # type: ignore[attr-defined]
    for line in _lines(path):
        if depth < 2 and line.startswith("from petkit.") and re.search(rf"\b{name}\b", line):
            module = line.split()[1]
            return _constant(module.removeprefix("petkit.").replace(".", "/") + ".py", name,
                             depth + 1)
    raise ValueError(f"{path}: no literal constant {name}")


def _value(path: str, node: ast.expr) -> Any:
    """A literal, or a module constant named by `node`."""
    if isinstance(node, ast.Name):
        return _constant(path, node.id)
    return ast.literal_eval(node)


def _spell(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _metadata(path: str, node: ast.expr | None) -> dict[str, Any]:
    """`metadata={...}` or `metadata=_help("text", choices=NAME)` as a dict."""
    if isinstance(node, ast.Dict):
        return {ast.literal_eval(k): _value(path, v) for k, v in zip(node.keys, node.values)
                if k is not None}
    if isinstance(node, ast.Call):
        out = {kw.arg: _value(path, kw.value) for kw in node.keywords if kw.arg}
        if node.args:
            out["help"] = _value(path, node.args[0])
        return out
    return {}


def _field(path: str, node: ast.AnnAssign, offset: int) -> FieldDoc | None:
    name, kind = node.target.id, ast.unparse(node.annotation)  # type: ignore[union-attr]
    if kind.startswith(("InitVar", "ClassVar")) or name.isupper():
        return None
    meta: dict[str, Any] = {}
    default = ""
    value = node.value
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        keywords = {kw.arg: kw.value for kw in value.keywords}
        meta = _metadata(path, keywords.get("metadata"))
        value = keywords.get("default")
    if value is not None:
        try:
            default = _spell(_value(path, value))
        except ValueError:
            default = ast.unparse(value)
    comment = _lines(path)[offset + node.lineno - 1].partition("  # ")[2].strip()
    choices = tuple(str(c) for c in meta.get("choices", ()))
    return FieldDoc(name, kind, default, meta.get("help") or comment, choices)


def _class(path: str, name: str) -> tuple[ast.ClassDef, int]:
    found = _statement(path, rf"class {name}\b")
    if found is None:
        raise ValueError(f"{path}: no class {name}")
    return found  # type: ignore[return-value]


def class_fields(path: str, name: str) -> list[FieldDoc]:
    """The dataclass fields of class `name` in `path` (a file under src/petkit), in order."""
    node, offset = _class(path, name)
    found = (_field(path, n, offset) for n in node.body
             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
    return [f for f in found if f is not None]


def stepper_classes() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(file, class, NAME, OPTIMIZERS) of every StepperConfig in training/steppers/."""
    out = []
    for file in sorted((PACKAGE / STEPPERS).glob("*.py")):
        path = f"{STEPPERS}/{file.name}"
        for line in _lines(path):
            match = re.match(r"class (\w+)\((?:[^)]*\W)?StepperConfig\W", line)
            if match is None:
                continue
            node, _ = _class(path, match.group(1))
            consts = {n.target.id: ast.literal_eval(n.value) for n in node.body
                      if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                      and n.target.id in ("NAME", "OPTIMIZERS") and n.value is not None}
            out.append((path, node.name, consts.get("NAME", ""),
                        tuple(consts.get("OPTIMIZERS", ()))))
    return out


def section_fields(section: str) -> list[FieldDoc]:
    """The fields `--<section>.FIELD` takes (the stepper section: every stepper's, the help
    naming the stepper; the train section without its nested sections)."""
    if section == "train.stepper":
        owners: dict[str, list[tuple[str, FieldDoc]]] = {}
        for path, cls, name, optimizers in stepper_classes():
            for f in class_fields(path, cls):
                owner = f"{name} ({', '.join(optimizers)})" if optimizers else name
                owners.setdefault(f.name, []).append((owner, f))
        return [FieldDoc(name, found[0][1].type, "", "; ".join(
            f"{owner}: {f.help or f.type} (default: {f.default})" for owner, f in found))
            for name, found in owners.items()]
    fields = class_fields(*SOURCES[section])
    return [f for f in fields if not (section == "train" and f.name in TRAIN_NESTED)]


def sections_of(command: str) -> tuple[str, ...]:
    """The sections `command` takes as flags (its recipe's, its own, minus NOT_APPLICABLE)."""
    skipped = NOT_APPLICABLE.get(command, {})
    return tuple(s for s in (*RECIPE, *EXTRA.get(command, ())) if s not in skipped)


class _Store(argparse.Action):
    """Keeps `--section.field VALUE` as text, in command-line order, in `namespace.<DEST>`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, DEST, {**getattr(namespace, DEST, {}), self.dest: values})


def _metavar(f: FieldDoc) -> str:
    if f.choices:
        return "{" + ",".join(f.choices) + "}"
    kinds = [k.strip() for k in f.type.split("|")]
    names = {"float": "FLOAT", "int": "INT", "bool": "BOOL", "str": "TEXT", "None": "none"}
    return "|".join(dict.fromkeys(names.get(k, "LIST" if k.startswith(("list", "tuple"))
                                            else "MAP" if k.startswith("dict") else "NAME")
                                  for k in kinds))


def _group_title(section: str) -> str:
    if section == "train.stepper":
        return "section train.stepper: the stepper's own settings (picked by --optimizer)"
    if section == "method":
        return "section method: the fields of the method's config"
    return f"section {section} ({SOURCES[section][1]}; recipe key {section.split('.')[-1]}:)"


def short_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """{"section.field": "--flag"}: the command's own short flags and the field each sets."""
    fields = {"fed": fed_flags.FLAGS, "continual": {
        dest: ALIASES[row] for dest, row in continual_cli.NAMED.items()}}.get(command, ALIASES)
    return {fields[a.dest]: a.option_strings[0] for a in parser._actions
            if a.dest in fields and a.option_strings}


def _help(section: str, f: FieldDoc, flags: dict[str, str]) -> str:
    """The field's help (else a short flag's, else its class and name), its default and the
    command's short flag for it (`flags`, from `short_flags`), escaped for argparse."""
    dotted = f"{section}.{f.name}"
    borrowed = (helps.get(name, "") for table, helps in SHORT_FLAGS
                for name, field in table.items() if field == dotted)
    text = f.help.replace("%", "%%") or next((h for h in borrowed if h), "") or \
        f"{SOURCES.get(section, ('', section))[1]}.{f.name}"
    also = f"; also {flags[dotted]}" if dotted in flags else ""
    if f.default and "(default" not in text:
        return f"{text} (default: {f.default}{also})"
    return f"{text} ({also[2:]})" if also else text


def add_section_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Every field of every section `command` takes, as `--section.field`, grouped per section;
    then the sections it does not take, each with the reason."""
    skipped = NOT_APPLICABLE.get(command, {})
    flags = short_flags(parser, command)
    for section in sections_of(command):
        if section == "method":
            parser.add_argument_group(_group_title(section), (
                "--method.FIELD=VALUE sets a field of the chosen method's config, e.g. "
                "--method.dropout=0.1 --method.targets=q_proj,v_proj (`petkit inspect --method "
                "NAME` shows where it attaches; docs/methods.md lists each method's fields)"))
            continue
        subsections = [s for s in SUBSECTIONS if s.startswith(section + ".")]
        for name in (section, *subsections):
            note = None if name != "train" else (
                "Defaults shown are the sections' own; the command's recipe may set others "
                "(petkit train: the shipped 'default' recipe, or --recipe)")
            group = parser.add_argument_group(_group_title(name), note)
            for f in section_fields(name):
                group.add_argument(f"--{name}.{f.name}", dest=f"{name}.{f.name}", action=_Store,
                                   default=argparse.SUPPRESS, metavar=_metavar(f),
                                   help=_help(name, f, flags))
    by_reason: dict[str, list[str]] = {}
    for section, reason in skipped.items():
        by_reason.setdefault(reason, []).append(f"--{section}.*")
    if by_reason:
        parser.add_argument_group("sections not taken here", "; ".join(
            f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()))


def values(args: argparse.Namespace) -> dict[str, str]:
    """{"section.field": text} of the section flags given, in command-line order."""
    return dict(getattr(args, DEST, {}))


def check_applies(command: str, dotted: dict[str, str]) -> None:
    """A `--section.field` of a section that does not apply to `command`: a usage error."""
    for key in dotted:
        reason = NOT_APPLICABLE.get(command, {}).get(key.split(".")[0])
        if reason:
            raise UsageError(f"petkit {command} takes no --{key.split('.')[0]}.* settings "
                             f"(--{key}): {reason}")
