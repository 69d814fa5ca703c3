"""Hugging Face datasets as `--data`: a folder written by `save_to_disk` (a Dataset or a
DatasetDict), a folder of data files in the hub's layout, or a hub id (`org/name`, with
`--data-split` and `--data-config`), read with the `datasets` library (`pip install
'petkit[data]'`; imported only here).

Rows come back as `(where, row)` like `readers.read_rows`, `where` being "train row 12". A dataset
with a `test` split gives its test rows too (used when no `--test-file` is given). A hub id that
is not in the local cache while the hub cannot be reached is one `ConfigError` naming the
alternatives.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petkit.core.errors import ConfigError
from petkit.data.readers import SUFFIXES, Row
from petkit.models.packages import require_module

SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TEST_SPLIT = "test"


@dataclass
class DatasetRows:
    """The training split's rows, the dataset's test split's rows (None: it has none) and the
    names of all its splits."""

    source: str
    split: str
    train: list[Row]
    test: list[Row] | None
    splits: tuple[str, ...]


def _data_files(folder: Path) -> bool:
    """A folder of data files, at its top or under data/ (a hub snapshot)."""
    return any(p.suffix.lower() in SUFFIXES for d in (folder, folder / "data") if d.is_dir()
               for p in d.iterdir())


def is_dataset_folder(name: str) -> bool:
    """A folder saved with `save_to_disk`, or one holding data files (not images per class)."""
    folder = Path(name)
    return folder.is_dir() and (any((folder / m).is_file() for m in SAVED_MARKERS)
                                or _data_files(folder))


def is_hub_id(name: str) -> bool:
    """`org/name`, not an existing path."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def _rows(dataset: Any, split: str) -> list[Row]:
    return [(f"{split} row {i}", dict(row)) for i, row in enumerate(dataset, 1)]


@contextlib.contextmanager
def _cache_only_when_unreachable(datasets: Any) -> Iterator[None]:
    """The hub asked once (`models.hub`): unreachable, `datasets` reads its cache only, instead
    of retrying the network."""
    from huggingface_hub import constants

    from petkit.models.hub import _offline, hub_reachable

    if _offline() or hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _open(name: str, config: str | None) -> Any:
    """The dataset (or dict of splits) behind `name`, every failure a `ConfigError`."""
    require_module("datasets", "'petkit[data]'  (or: pip install datasets)",
                   f"reading the dataset {name!r}")
    import datasets

    datasets.disable_progress_bars()
    folder = Path(name)
    try:
        if folder.is_dir() and any((folder / m).is_file() for m in SAVED_MARKERS):
            return datasets.load_from_disk(str(folder))
        if folder.is_dir():
            return datasets.load_dataset(str(folder), config)
        with _cache_only_when_unreachable(datasets):
            return datasets.load_dataset(name, config)
    except (ConnectionError, FileNotFoundError) as err:
        if folder.is_dir():
            raise ConfigError(f"cannot read the dataset folder {name}: {err}") from err
        from petkit.data.embedded import EMBEDDED_TASKS

        raise ConfigError(
            f"dataset {name!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(err).__name__}); give a local file ({', '.join(SUFFIXES)}), a folder "
            f"saved with Dataset.save_to_disk, or an embedded task "
            f"({', '.join(EMBEDDED_TASKS)})") from err
    except ValueError as err:  # e.g. a config name the dataset lacks
        raise ConfigError(f"dataset {name!r}: {err} (--data-config)") from err
    except Exception as err:  # datasets raises many types for a damaged folder or file
        raise ConfigError(f"cannot read the dataset {name!r}: {type(err).__name__}: {err}") from err


def read_dataset(name: str, split: str = "train", config: str | None = None) -> DatasetRows:
    """Rows of split `split` of the dataset `name` (a folder or a hub id), and its test split."""
    data = _open(name, config)
    if not hasattr(data, "keys"):  # one Dataset: no splits to choose from
        return DatasetRows(name, "train", _rows(data, "train"), None, ("train",))
    splits = tuple(data.keys())
    if split not in splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r} (its splits: "
                          f"{', '.join(splits)}); choose one with --data-split")
    test = _rows(data[TEST_SPLIT], TEST_SPLIT) if TEST_SPLIT in splits and split != TEST_SPLIT \
        else None
    train = _rows(data[split], split)
    if not train:
        raise ConfigError(f"dataset {name!r}: split {split!r} has no rows")
    return DatasetRows(name, split, train, test, splits)
