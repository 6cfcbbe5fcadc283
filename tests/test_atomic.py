"""qana.atomic: stored state is replaced whole or not at all, and private files are never readable by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qana import atomic
from qana.atomic import recover_directory, replace_directory, write_atomic


def test_write_atomic_replaces_the_file_with_its_mode_from_the_start(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    (tmp_path / ".node.key.tmp").write_bytes(b"stale temporary file, world-readable")
    os.chmod(tmp_path / ".node.key.tmp", 0o644)
    write_atomic(key, b"secret", mode=0o600)
    assert key.read_bytes() == b"secret" and stat.S_IMODE(key.stat().st_mode) == 0o600
    write_atomic(key, b"newer", mode=0o600)
    assert key.read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".node.key.tmp", "node.key"]  # nothing of ours left over


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_replace_directory_swaps_the_whole_set_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "deployed" / "bundle"

    def write(version: str):
        def build(folder: Path) -> None:
            (folder / "model.fbz").write_text(f"model {version}")
            (folder / "head.npz").write_text(f"head {version}")

        return build

    replace_directory(target, write("1"))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.fbz": "model 1", "head.npz": "head 1"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o755

    def crash(folder: Path) -> None:
        (folder / "model.fbz").write_text("model 2")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_directory(target, crash)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.fbz": "model 1", "head.npz": "head 1"}
    assert [p.name for p in target.parent.iterdir()] == ["bundle"]

    replace_directory(target, write("2"))
    assert (target / "head.npz").read_text() == "head 2" and [p.name for p in target.parent.iterdir()] == ["bundle"]


def test_recover_directory_undoes_a_swap_cut_between_its_renames(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    previous = tmp_path / ".bundle.previous"
    previous.mkdir()
    (previous / "head.npz").write_text("old head")
    recover_directory(target)  # only the old set exists: it is put back
    assert (target / "head.npz").read_text() == "old head" and not previous.exists()
    previous.mkdir()
    (previous / "head.npz").write_text("older head")
    recover_directory(target)  # both exist: the swap finished, only the clean-up was cut short
    assert (target / "head.npz").read_text() == "old head" and not previous.exists()
    recover_directory(target)  # nothing to do
    assert (target / "head.npz").read_text() == "old head"
