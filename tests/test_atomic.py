"""qana.atomic: stored state is replaced whole or not at all, and private files are never readable by others."""

from __future__ import annotations

import os
import stat
import time
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


def test_a_replaced_file_keeps_its_permissions_and_a_new_one_follows_the_umask(tmp_path: Path) -> None:
    """write_atomic set every file to 0644: a state file an administrator had made 0600 became
    readable by everyone at its next write, and a umask of 077 was ignored."""
    private = tmp_path / "seen.json"
    private.write_bytes(b"old")
    os.chmod(private, 0o600)
    write_atomic(private, b"new")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    old_mask = os.umask(0o077)
    try:
        write_atomic(tmp_path / "fresh.json", b"{}")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "fresh.json").stat().st_mode) == 0o600
    key = tmp_path / "node.key"
    key.write_bytes(b"x")
    os.chmod(key, 0o644)
    write_atomic(key, b"secret", mode=0o600)  # never wider than asked, whatever was there
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_symlinked_state_file_is_written_where_it_points(tmp_path: Path) -> None:
    real = tmp_path / "disk2" / "state.json"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "state.json"
    link.symlink_to(real)
    write_atomic(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_writing_files_together_checks_every_path_before_replacing_any(tmp_path: Path) -> None:
    first, second = tmp_path / "node.key", tmp_path / "node.pub"
    first.write_bytes(b"old key")
    second.mkdir()
    with pytest.raises(IsADirectoryError, match="node.pub: it is a folder"):
        atomic.write_together({first: (b"new key", 0o600), second: (b"new pub", 0o644)})
    assert first.read_bytes() == b"old key"  # the pair was not split
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.pub"]


def test_a_read_only_folder_is_named(tmp_path: Path, monkeypatch) -> None:
    """The error named a random temporary file (".status.json.qz9kf6a0.tmp: Permission denied")."""

    def denied(*args, **kwargs):  # what mkstemp raises in a read-only folder (root is never denied)
        raise PermissionError(13, "Permission denied", str(tmp_path / ".status.json.qz9kf6a0.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=r"cannot write .*status.json: its folder .* is not writable"):
        write_atomic(tmp_path / "status.json", b"{}")


def test_a_name_near_the_file_system_limit_can_be_written(tmp_path: Path) -> None:
    """The temporary name added 14 bytes, so a valid 250-byte name failed with "File name too long"."""
    long = tmp_path / ("r" * 250 + ".json")
    write_atomic(long, b"{}")
    assert long.read_bytes() == b"{}"


def test_replace_directory_refuses_a_file_and_follows_a_link(tmp_path: Path) -> None:
    """A file as target was hidden as .NAME.previous and every later write failed; a link to a folder
    was replaced by a folder while the folder it pointed to kept the old set."""
    a_file = tmp_path / "bundle"
    a_file.write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        replace_directory(a_file, lambda staging: (staging / "x").write_bytes(b"x"))
    assert a_file.read_bytes() == b"not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    real = tmp_path / "disk2" / "out"
    real.mkdir(parents=True)
    (real / "old").write_bytes(b"old")
    link = tmp_path / "out"
    link.symlink_to(real)
    replace_directory(link, lambda staging: (staging / "new").write_bytes(b"new"))
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == ["new"]


def _age(path: Path, seconds: float) -> None:
    """Make `path` (and, for a folder, everything in it) look untouched for `seconds`."""
    then = time.time() - seconds
    for item in [path, *path.rglob("*")]:
        os.utime(item, (then, then), follow_symlinks=False)


def test_a_killed_writers_leftovers_go_with_the_next_write_once_stale(tmp_path: Path) -> None:
    state = tmp_path / "status.json"
    dead = tmp_path / ".status.json.5lht_ks5.tmp"  # a writer killed before its rename
    dead.write_bytes(b"x" * 1000)
    _age(dead, atomic.STALE_AFTER + 60)
    live = tmp_path / ".status.json.abcdefgh.tmp"  # another writer, still writing
    live.write_bytes(b"y")
    other = tmp_path / ".other.json.5lht_ks5.tmp"  # another target's: not ours to judge
    other.write_bytes(b"z")
    _age(other, atomic.STALE_AFTER + 60)
    kept_by_hand = tmp_path / ".status.json.backup.tmp"  # not a name mkstemp makes
    kept_by_hand.write_bytes(b"w")
    _age(kept_by_hand, atomic.STALE_AFTER + 60)
    write_atomic(state, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [state.name, live.name, other.name, kept_by_hand.name]
    )


def test_a_killed_builds_staging_folder_goes_with_the_next_swap_once_stale(tmp_path: Path) -> None:
    target = tmp_path / "deployed" / "bundle"
    replace_directory(target, lambda staging: (staging / "model.fbz").write_bytes(b"v1"))
    dead = target.parent / ".bundle.incoming-a3rmtedh"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.fbz").write_bytes(b"half")
    _age(dead, atomic.STALE_AFTER + 60)
    busy = target.parent / ".bundle.incoming-qwertyui"  # old folder, but a file still being written
    busy.mkdir()
    (busy / "model.fbz").write_bytes(b"growing")
    _age(busy, atomic.STALE_AFTER + 60)
    os.utime(busy / "model.fbz")
    replace_directory(target, lambda staging: (staging / "model.fbz").write_bytes(b"v2"))
    assert (target / "model.fbz").read_bytes() == b"v2"
    assert sorted(p.name for p in target.parent.iterdir()) == [busy.name, "bundle"]


@pytest.mark.parametrize("second_existed", [True, False])
def test_a_failed_rename_part_way_leaves_the_set_as_it_was(tmp_path: Path, monkeypatch, second_existed: bool) -> None:
    """A rename that failed after the first had been done left a new key beside an old one."""
    first, second = tmp_path / "node.key", tmp_path / "node.pub"
    if second_existed:
        second.write_bytes(b"old pub")
    first_existed = not second_existed
    if first_existed:
        first.write_bytes(b"old key")
    real_replace = os.replace
    calls: list[str] = []

    def second_rename_fails(src, dst):
        calls.append(str(dst))
        if len(calls) == 2 and str(src).endswith(".tmp") and Path(dst) == second:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        atomic.write_together({first: (b"new key", 0o600), second: (b"new pub", 0o644)})
    assert (first.read_bytes() == b"old key") if first_existed else not first.exists()
    assert (second.read_bytes() == b"old pub") if second_existed else not second.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(p.name for p in (first, second) if p.exists())  # no temporary files or backups


def test_files_written_together_leave_no_backups(tmp_path: Path) -> None:
    first, second = tmp_path / "node.key", tmp_path / "node.pub"
    first.write_bytes(b"old key")
    second.write_bytes(b"old pub")
    atomic.write_together({first: (b"new key", 0o600), second: (b"new pub", 0o644)})
    assert (first.read_bytes(), second.read_bytes()) == (b"new key", b"new pub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.pub"]
    assert first.stat().st_nlink == 1
