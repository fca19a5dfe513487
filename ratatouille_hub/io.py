"""File writes that land whole or not at all: a crash never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

DONE = "done"  # the marker of a finished run folder: written last, inside the staged folder


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged_folder(final: str | Path):
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    The previous content of `final` stays intact until the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()  # unlike mkdtemp, honours the umask: the result is as readable as any folder
    try:
        yield staging
        if final.exists():
            retired = final.with_name(f".{final.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sweep_staging(folder: str | Path, only: str | None = None) -> None:
    """Clear what a killed writer left in `folder` (of the entry `only`, when given): staging folders and
    temporary files are deleted; a folder retired by `staged_folder` whose replacement never landed is put
    back. Call it only under the lock of what it sweeps.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith(".") or (only is not None and not name.startswith(f".{only}.")):
            continue
        if name.endswith(".partial") and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
        elif name.endswith(".old") and entry.is_dir() and not entry.is_symlink():
            final = entry.with_name(name[1 : -len(".old")])
            if final.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, final)  # the previous version, whole: its replacement never landed


@contextmanager
def claimed_folder(final: str | Path, *, wait: bool):
    """Claim `final` (a folder some process writes whole) for the block, through the lock `.<name>.lock`
    beside it; yields whether this process holds the claim. With `wait=False` a folder claimed by another
    process yields False at once; with `wait=True` the claim waits for it. Once claimed, whatever a killed
    writer of `final` left is cleared. The kernel drops the lock of a dead process, so no claim outlives it.
    """
    from filelock import FileLock, Timeout

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(final.with_name(f".{final.name}.lock"), timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        held = False
    else:
        held = True
    try:
        if held:
            sweep_staging(final.parent, only=final.name)
        yield held
    finally:
        if held:
            lock.release()


class FolderBusyError(OSError):
    """Another process holds the folder's lock."""


@contextmanager
def exclusive_lock(path: str | Path, busy_message: str):
    """Hold an advisory lock on `path` for the block; a second holder fails at once with `busy_message`.

    filelock's lock is the kernel's (flock on POSIX): it drops when the process dies, so a killed run
    never leaves a stale lock.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(busy_message) from None
    try:
        yield
    finally:
        lock.release()
