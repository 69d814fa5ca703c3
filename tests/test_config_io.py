"""The one way configs are read from mappings (`core.config_io`) and files measured (`core.disk`)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from petkit.core.config_io import check_keys, dataclass_from_dict
from petkit.core.disk import file_sha256, folder_bytes, format_bytes
from petkit.core.errors import ConfigError
from petkit.fed.config import FedConfig
from petkit.methods.lora import LoraConfig
from petkit.training.config import TrainConfig


@dataclass(frozen=True)
class Inner:
    size: int = 1


@dataclass(frozen=True)
class Outer:
    lr: float = 0.1
    steps: int | None = None
    name: str = "x"
    tags: tuple[str, ...] = ()
    inner: Inner | dict | None = None
    extra: dict[str, int] = field(default_factory=dict)


def test_builds_defaults_from_none_and_accepts_int_for_float_and_list_for_tuple() -> None:
    assert dataclass_from_dict(Outer, None, "outer") == Outer()
    built = dataclass_from_dict(Outer, {"lr": 1, "tags": ["a"], "inner": {"size": 2}}, "outer")
    assert built.lr == 1 and built.tags == ["a"] and built.inner == {"size": 2}


@pytest.mark.parametrize("data,match", [
    ({"lrr": 1.0}, r"outer has no field\(s\) 'lrr' \(did you mean 'lr'\?\)"),
    ({"zzz": 1}, r"'zzz'; fields: \['extra', 'inner', 'lr', 'name', 'steps', 'tags'\]"),
    ({"lr": "1e-3"}, r"outer\.lr must be float, got '1e-3'"),
    ({"steps": True}, r"outer\.steps must be int or None, got True"),
    ({"name": 3}, r"outer\.name must be str"),
    ({"tags": "a"}, r"outer\.tags must be a list"),
    ({"inner": 5}, r"outer\.inner must be Inner or dict or None"),
])
def test_unknown_keys_and_wrong_types_are_config_errors_naming_the_field(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataclass_from_dict(Outer, data, "outer")


def test_not_a_mapping_ignore_and_extra() -> None:
    with pytest.raises(ConfigError, match="outer must be a mapping"):
        dataclass_from_dict(Outer, [1, 2], "outer")
    assert dataclass_from_dict(Outer, {"method": "lora"}, "outer", ignore=("method",)) == Outer()
    with pytest.raises(TypeError):  # `extra` only stops the key check; the class decides
        dataclass_from_dict(Outer, {"legacy": 1}, "outer", extra=("legacy",))
    check_keys({"a.b": 1}, ["a.b", "a.c"], "a")
    with pytest.raises(ConfigError, match=r"'a\.d' \(did you mean 'a\.[bc]' or 'a\.[bc]'\?\)"):
        check_keys({"a.d": 1}, ["a.b", "a.c"], "a")


def test_every_config_reads_through_it() -> None:
    """Method configs, TrainConfig and FedConfig reject typos with the close name."""
    with pytest.raises(ConfigError, match=r"did you mean 'alpha'"):
        LoraConfig.from_dict({"alpah": 16})
    with pytest.raises(ConfigError, match=r"LoraConfig\.r must be int"):
        LoraConfig.from_dict({"r": "8"})
    with pytest.raises(ConfigError, match=r"did you mean 'max_steps'"):
        TrainConfig.from_dict({"max_step": 5})
    with pytest.raises(ConfigError, match=r"did you mean 'rounds'"):
        FedConfig.from_dict({"round": 5})


def test_disk_helpers(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 3000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 100)
    assert folder_bytes(tmp_path) == 3100
    assert file_sha256(tmp_path / "a.bin") == hashlib.sha256(b"x" * 3000).hexdigest()
    assert [format_bytes(n) for n in (None, 100, 3000, 5 * 2**20, 3 * 2**30)] == \
        ["–", "100 B", "2.9 KiB", "5.0 MiB", "3.0 GiB"]
    assert format_bytes(6_118_800, 2) == "5.84 MiB"
