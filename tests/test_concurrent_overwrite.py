"""Overwrites that readers never notice: while another process overwrites an adapter, every load
finds one complete version (never "missing", never a mix of two); a save killed at any moment
leaves nothing behind once the next load or save has run; a plain adapter folder of an older
release is replaced by a versioned one without a moment where the path is missing."""
from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

import pytest

import petkit as pk
from petkit.core.durable import resolve_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from durability import ForkedSavers, fresh, saver  # noqa: E402  (the benchmark's savers)
from durability import version as loaded_version  # noqa: E402


def leftovers(folder: Path) -> list[str]:
    """Everything beside `folder` except the folder (link) itself and the version it links to."""
    keep = {folder.name, resolve_folder(folder).name}
    return sorted(p.name for p in folder.parent.iterdir() if p.name not in keep)


def adapter_model():
    return pk.attach(fresh(), pk.LoraConfig(r=2, targets=["0"]), name="a")


def test_a_save_is_a_symlink_swap_onto_a_new_version(tmp_path: Path) -> None:
    model = adapter_model()
    folder = pk.save_adapter(model, tmp_path / "ad", name="a")
    first = resolve_folder(folder)
    pk.save_adapter(model, folder, name="a")
    assert folder.is_symlink() and resolve_folder(folder) != first and not first.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert leftovers(folder) == []


def test_a_plain_folder_of_an_older_release_becomes_versioned(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "ad"
    shutil.copytree(pk.save_adapter(adapter_model(), tmp_path / "src", name="a"), folder)
    assert folder.is_dir() and not folder.is_symlink()
    pk.load_adapter(fresh(), folder)
    pk.save_adapter(adapter_model(), folder, name="a")
    assert folder.is_symlink() and leftovers(folder) == []


def test_the_next_load_cleans_what_a_killed_save_left(tmp_path: Path) -> None:
    folder = pk.save_adapter(adapter_model(), tmp_path / "ad", name="a")
    (tmp_path / ".ad.v7").mkdir()  # a version a killed save was filling
    (tmp_path / ".ad.petkit-tmp-link-123").symlink_to(".ad.v7")  # its link, never swapped in
    pk.load_adapter(fresh(), folder)
    assert leftovers(folder) == []


def test_a_read_that_loses_its_version_reads_the_new_one(tmp_path: Path, monkeypatch) -> None:
    """A save that swaps and removes the version a reader resolved, between its resolve and its
    read: the reader starts again on the new version."""
    from petkit.core import durable

    model = adapter_model()
    folder = pk.save_adapter(model, tmp_path / "ad", name="a")
    real, calls = durable.resolve_folder, []

    def resolve_then_overwrite(final, complete=lambda p: True):
        got = real(final, complete)
        if not calls:
            calls.append(got)
            pk.save_adapter(model, folder, name="a")  # removes `got`
        return got

    monkeypatch.setattr(durable, "clean_if_idle", lambda final: None)
    monkeypatch.setattr(durable, "resolve_folder", resolve_then_overwrite)
    pk.load_adapter(fresh(), folder)
    assert calls and not calls[0].exists()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readers_during_400_overwrites_never_see_missing_or_mixed(tmp_path: Path) -> None:
    folder = tmp_path / "ad"
    writer = saver(folder, 1.0, 400)
    assert writer.stdout is not None
    writer.stdout.readline()  # the first version exists
    loads, failed, mixed, seen = 0, [], 0, set()
    while writer.poll() is None:
        try:
            seen.add(loaded_version(folder))
        except pk.AdapterLoadError as err:  # "does not exist" before versioned saves
            failed.append(str(err))
        except AssertionError:  # `loaded_version`: tensors of two versions
            mixed += 1
        loads += 1
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    print(f"400 overwrites: {loads} loads, {len(seen)} versions seen, {len(failed)} failed, "
          f"{mixed} mixed")
    assert (failed, mixed) == ([], 0)
    assert loads > 50 and len(seen) > 10, (loads, len(seen))
    assert loaded_version(folder) == 400 and leftovers(folder) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_30_kills_during_overwrites_leave_nothing_after_the_next_load(tmp_path: Path) -> None:
    folder, rng = tmp_path / "ad", random.Random(0)
    inside, savers = 0, ForkedSavers()  # forks of one process: no interpreter start per kill
    for _ in range(30):
        child = savers.start(folder, 1.0, 10**9)  # one save of this child is complete
        time.sleep(rng.uniform(0.0, 0.2))
        savers.kill(child)
        inside += bool(leftovers(folder))
        assert loaded_version(folder) >= 1  # a complete adapter, whatever the moment of the kill
        assert leftovers(folder) == []  # ... and that load cleaned what the kill left
    savers.close()
    print(f"30 kills: {inside} landed inside a save; 0 leftovers after the next load")
    assert inside > 0  # some kills did land inside a save


def test_a_version_a_reader_pins_outlives_the_next_save_and_goes_with_the_one_after(
        tmp_path: Path) -> None:
    from petkit.core.durable import _pinned, resolve_folder
    folder = tmp_path / "ad"
    model = pk.attach(fresh(), pk.LoraConfig(r=2, targets=["0"]), name="a")
    pk.save_adapter(model, folder, name="a")
    first = resolve_folder(folder)
    with _pinned(first) as here:
        assert here
        pk.save_adapter(model, folder, name="a")
        assert first.is_dir() and resolve_folder(folder) != first  # kept for its reader
    pk.save_adapter(model, folder, name="a")
    assert not first.exists()
