"""SuperNode key pairs (`protocols.auth.create_node_keys`): paths refused in one sentence, and a
failed or interrupted overwrite never costs the clinic its registered private key."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from protocols.auth import AuthError, create_node_keys, key_fingerprint, load_private_key, load_public_key


def _pair(private: Path) -> tuple[bytes, bytes]:
    return private.read_bytes(), private.with_name(private.name + ".pub").read_bytes()


def _matches(private: Path) -> bool:
    """The .pub beside a private key is that key's public half."""
    public = private.with_name(private.name + ".pub")
    return key_fingerprint(load_private_key(private).public_key()) == key_fingerprint(load_public_key(public))


def test_a_new_pair_matches_and_only_the_private_key_is_private(tmp_path) -> None:
    private, public = create_node_keys(tmp_path / "clinic" / "node.key")
    assert public == tmp_path / "clinic" / "node.key.pub" and _matches(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    assert sorted(p.name for p in private.parent.iterdir()) == ["node.key", "node.key.pub"]


@pytest.mark.parametrize("given", ["k4/", "k4/."])
def test_a_path_with_a_trailing_slash_is_refused_as_a_folder(tmp_path, given) -> None:
    """`Path("k4/")` is `Path("k4")`: the slash used to be lost and a key file named k4 written."""
    with pytest.raises(AuthError, match="give a file name for the private key, not a folder"):
        create_node_keys(f"{tmp_path}/{given}")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_refused_as_the_key_path(tmp_path) -> None:
    (tmp_path / "k4").mkdir()
    with pytest.raises(AuthError, match="names a folder; give a file name for the private key"):
        create_node_keys(tmp_path / "k4")  # a Path: the CLI's type, which has no trailing slash
    assert list((tmp_path / "k4").iterdir()) == []


def test_a_key_path_under_a_file_names_that_file(tmp_path) -> None:
    """It used to fail with "File exists: f"."""
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(AuthError, match=f"{tmp_path / 'f'} is a file, not a folder"):
        create_node_keys(tmp_path / "f" / "node.key")
    assert (tmp_path / "f").read_text() == "not a folder"


def test_a_full_disk_while_writing_the_second_file_keeps_the_old_pair(tmp_path, monkeypatch) -> None:
    key = tmp_path / "node.key"
    create_node_keys(key)
    old = _pair(key)
    real_fdopen, opened = os.fdopen, []

    def full_on_second_file(fd: int, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        opened.append(fd)
        if len(opened) == 2:
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return handle

    monkeypatch.setattr(os, "fdopen", full_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        create_node_keys(key, overwrite=True)
    monkeypatch.undo()
    assert len(opened) == 2 and _pair(key) == old and _matches(key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.key.pub"]  # no temporary file left


def test_a_failure_between_the_two_renames_keeps_the_old_private_key(tmp_path, monkeypatch) -> None:
    """The private key is renamed last, so the registered identity survives a crash between the
    renames; the public key already renamed is put back too, so the pair still matches."""
    key = tmp_path / "node.key"
    create_node_keys(key)
    old_private, old_public = key.read_bytes(), (tmp_path / "node.key.pub").read_bytes()
    real_replace, renamed = os.replace, []

    def crash_on_second_rename(src, dst) -> None:
        renamed.append(Path(dst).name)
        if len(renamed) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="Input/output error"):
        create_node_keys(key, overwrite=True)
    monkeypatch.undo()
    assert renamed == ["node.key.pub", "node.key", "node.key.pub"]  # the third puts the old one back
    assert key.read_bytes() == old_private and load_private_key(key)
    assert (tmp_path / "node.key.pub").read_bytes() == old_public
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.key.pub"]  # no temporary file left
