"""Writing stored state so that a crash or a power cut never leaves a broken file in place of a good one.

A clinic keeps state it cannot get back from anywhere else (its deployed head, its key pair)
and caches that are slow to rebuild (backbone features, decoded images). Each is written to
a temporary file in the same folder, flushed to disk, and renamed over the old one: readers
see the old version or the new one, never half of each. `os.replace` alone is not enough on a
power cut: without `fsync` the rename can reach the disk before the data, which leaves an
empty file behind.

A *set* of files that must change together (a deployed model and its head) is written as a
new folder and swapped in by `replace_directory`; `recover_directory` puts the previous set
back if a crash fell between the two renames of the swap.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


def file_in_the_way(folder: Path) -> Path | None:
    """The existing file (not a folder) at `folder` or above it, which would stop `folder`
    from being made; None if there is none. Lets callers refuse such a path in one clear
    sentence before they write anything, instead of failing half-way with "File exists"."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def sync_directory(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    """Flush a file some library wrote (e.g. an Akida model's `save`) to disk before it is renamed."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_atomic(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` in one step. The file is created with `mode` from the start
    (0o600 for a private key: never readable by others, not even for a moment), under a fresh
    name that no stale or planted file can take over."""
    write_together({Path(path): (data, mode)})


def write_together(files: dict[Path, tuple[bytes, int]]) -> None:
    """Write several files (path -> (data, mode)) so that a failure while writing (a full disk)
    replaces none of them: every new file is written and flushed under a temporary name first,
    and only then are they renamed into place. For files that belong together, like a key pair."""
    written: list[tuple[str, Path]] = []
    try:
        for path, (data, mode) in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            written.append((tmp, path))
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for folder in {path.parent for path in files}:
        sync_directory(folder)


def try_lock(path: Path, create: bool = True) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, for one writer per folder:
    closing it releases the lock, as the system does if the process dies, so a killed run never
    leaves a stale lock. None when `create` is off and the file does not exist.
    BlockingIOError when another process holds it."""
    if not create and not path.is_file():
        return None
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def replace_atomic(written: Path | str, path: Path | str) -> None:
    """Put a finished temporary file (in the same folder) in place of `path`, durably."""
    sync_file(Path(written))
    os.replace(written, path)
    sync_directory(Path(path).parent)


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def recover_directory(target: Path) -> None:
    """Finish or undo a `replace_directory` that a crash interrupted.

    Between its two renames the folder exists only as `.NAME.previous`: put it back. If both
    exist, the swap completed and only the clean-up was cut short.
    """
    previous = _previous(target)
    if not previous.exists():
        return
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(previous, target)
        sync_directory(target.parent)


def replace_directory(target: Path, build: Callable[[Path], None]) -> None:
    """Write a new version of folder `target` with `build(staging)` and swap it in as a whole.

    If `build` fails, `target` is untouched. Every file `build` wrote is flushed to disk before
    the swap, so after a crash `target` holds either the old set or the new one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.incoming-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # as a plain mkdir would make it, not mkdtemp's 0o700
        build(staging)
        for written in staging.iterdir():
            if written.is_file():
                sync_file(written)
        sync_directory(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = _previous(target)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    sync_directory(target.parent)
    shutil.rmtree(previous, ignore_errors=True)
