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

A writer killed before its rename leaves its temporary file or staging folder behind (hidden,
full size). The next write of the same target removes such leftovers once nothing has touched
them for `STALE_AFTER` seconds: a live writer keeps touching its own, so it is never one.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


STALE_AFTER = 3600.0
"""Seconds without a change after which a temporary file or staging folder of a target is a dead
writer's leftover. Writing a state file or building a bundle folder takes seconds."""

# mkstemp and mkdtemp add 8 characters from this alphabet to the prefix (and so does
# _hard_link_backup, so that its leftovers match the same pattern).
_RANDOM_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"
_RANDOM = f"[{_RANDOM_LETTERS}]{{8}}"


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
    """Replace `path` with `data` in one step. The file is created with at most `mode` from the
    start (0o600 for a private key: never readable by others, not even for a moment), under a
    fresh name that no stale or planted file can take over (see write_together for the rest)."""
    write_together({Path(path): (data, mode)})


def write_together(files: dict[Path, tuple[bytes, int]]) -> None:
    """Write several files (path -> (data, mode)) so that a failure while writing (a full disk)
    replaces none of them: every new file is written and flushed under a temporary name first,
    and only then are they renamed into place. For files that belong together, like a key pair.
    Should a rename itself fail part-way, the files already renamed are put back as they were
    (the old file from a hard-link backup, a file that did not exist removed again), so the set
    is never half new; on a file system without hard links that last step is not possible.

    A replaced file keeps what its owner set: its permissions (never wider than `mode`) and, where
    this process may, its owner; a new file gets `mode` less the umask, as open() would give it.
    A path that is a symbolic link is written where the link points (the link stays), and a path
    that is a folder is refused before anything is written.
    """
    targets = {_followed(path): spec for path, spec in files.items()}
    for path in targets:
        if path.is_dir():
            raise IsADirectoryError(f"cannot write {path}: it is a folder")
    written: list[tuple[str, Path]] = []
    backups: dict[Path, str | None] = {}
    existed = {path for path in targets if path.exists()}
    try:
        for path, (data, mode) in targets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
            except PermissionError:
                raise PermissionError(f"cannot write {path}: its folder {path.parent} is not writable") from None
            written.append((tmp, path))
            _take_over_attributes(fd, path, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        if len(written) > 1:
            backups = {path: _hard_link_backup(path) for path in existed}
        _rename_all_or_none(written, existed, backups)
    except BaseException:
        for tmp, _ in written:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                with suppress(FileNotFoundError):
                    os.unlink(backup)
    for folder in {path.parent for path in targets}:
        sync_directory(folder)
    for path in targets:
        remove_stale_leftovers(path)


def _rename_all_or_none(written: list[tuple[str, Path]], existed: set[Path], backups: dict[Path, str | None]) -> None:
    """Rename each temporary file over its target; if one rename fails, undo the ones before it:
    a target that did not exist is removed again, one that did gets its backup back."""
    done: list[Path] = []
    try:
        for tmp, path in written:
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):
            backup = backups.get(path)
            with suppress(OSError):
                if path not in existed:
                    os.unlink(path)
                elif backup is not None:
                    os.replace(backup, path)
        raise


def _hard_link_backup(path: Path) -> str | None:
    """A second name for the file at `path`, to put it back if a later rename of the set fails;
    None where the file system has no hard links. The name has the shape of a temporary file of
    `path`, so one a crash leaves behind is cleared by `remove_stale_leftovers`."""
    for _ in range(100):
        random_part = "".join(secrets.choice(_RANDOM_LETTERS) for _ in range(8))
        backup = os.path.join(path.parent, f"{_temporary_prefix(path)}{random_part}.tmp")
        try:
            os.link(path, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


def remove_stale_leftovers(target: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary files (`.NAME.xxxxxxxx.tmp`) and staging folders
    (`.NAME.incoming-xxxxxxxx`) of `target` that no writer has touched for `STALE_AFTER` seconds;
    returns what was removed. Only names this module makes for exactly this target are matched,
    so another file's leftovers and anything a person put there stay."""
    target = Path(target)
    now = time.time() if now is None else now
    name = re.escape(target.name)
    pattern = re.compile(rf"\.{name}\.(?:{_RANDOM}\.tmp|incoming-{_RANDOM})")
    removed: list[Path] = []
    try:
        candidates = [entry for entry in os.scandir(target.parent) if pattern.fullmatch(entry.name)]
    except OSError:
        return removed
    for entry in candidates:
        path = Path(entry.path)
        with suppress(OSError):
            if now - _last_change(path) < STALE_AFTER:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _last_change(path: Path) -> float:
    """The newest modification time in `path` (a file, or a folder and everything in it): a
    staging folder whose build is still writing a large file has an old folder time but a new
    file time."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, _, names in os.walk(path):
            for item in (folder, *(os.path.join(folder, n) for n in names)):
                with suppress(OSError):
                    newest = max(newest, os.lstat(item).st_mtime)
    return newest


def _followed(path: Path) -> Path:
    """Where a write to `path` should land: the file a symbolic link points to (so a state file an
    administrator moved to another disk and linked back stays there), else `path` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _temporary_prefix(path: Path) -> str:
    """`.NAME.` (mkstemp adds 8 random characters and `.tmp`); a generic one for names so long that
    the temporary name would pass the file system's 255-byte limit that the real name keeps."""
    prefix = f".{path.name}."
    return prefix if len(os.fsencode(prefix)) + 12 <= 255 else ".qana-write."


def current_umask() -> int:
    """The process's umask, read without changing it (Linux /proc) where possible: setting it to
    read it back would, for that moment, change it for every thread of the process."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _take_over_attributes(fd: int, path: Path, mode: int) -> None:
    """Give the new file the permissions (and, where allowed, the owner) the file it replaces has."""
    try:
        old = os.stat(path)
    except FileNotFoundError:
        os.fchmod(fd, mode & ~current_umask())
        return
    os.fchmod(fd, mode & old.st_mode & 0o7777)
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        with suppress(PermissionError):
            os.fchown(fd, old.st_uid, old.st_gid)


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
    the swap, so after a crash `target` holds either the old set or the new one. A `target` that
    is a symbolic link to a folder is swapped where it points (the link stays); one that is a
    file is refused before anything is written.
    """
    target = _followed(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot replace {target} with a folder: it is a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    remove_stale_leftovers(target)
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
