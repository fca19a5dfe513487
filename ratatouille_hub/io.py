"""File writes that land whole or not at all: a crash never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterable
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from huggingface_hub import constants

WEIGHTS_SHARD = re.compile(  # `model-00001-of-00002.safetensors`, as transformers and huggingface_hub name shards
    r"-\d{5}-of-\d{5}".join(map(re.escape, constants.SAFETENSORS_WEIGHTS_FILE_PATTERN.split("{suffix}")))
)
WRITER_LOCK = ".writer.lock"  # inside a staging folder: held by its writer, so a sweep knows it is alive
# Inside a staging folder: what its build had done when it last saved (a fine-tune's checkpoint). A dead writer's
# staging folder holding it is kept by sweeps while its final folder is missing, and the next writer of that
# folder adopts it (`staged_folder`) instead of starting afresh; it never lands in the final folder.
PROGRESS = "progress.safetensors"


def hidden_sibling_stem(name: str) -> str:
    """`.<name>`, the prefix of what is written beside `name` (staging folders, temporary files, locks, the
    retired copy); a long name is cut and a hash of it added, so those longer names stay legal (255 bytes)."""
    if len(name.encode()) <= 180:
        return f".{name}"
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f".{name.encode('utf-8', 'surrogateescape')[:120].decode('utf-8', 'ignore')}-{digest}"


def foreign_entries(folder: Path, written: Collection[str]) -> list[str]:
    """The entries of `folder` that are neither a file named in `written` nor a weights shard, sorted: what
    a command that replaces the folder whole did not write, and so must never delete."""
    return sorted(
        entry.name
        for entry in Path(folder).iterdir()
        if not (entry.is_file() and (entry.name in written or WEIGHTS_SHARD.fullmatch(entry.name)))
    )


@cache
def process_umask() -> int:
    """The process's umask, read once. Linux reports it in /proc/self/status; elsewhere it is read by setting
    it and putting it back, which another thread creating a file at that instant would see, so only once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


@contextmanager
def replaced_atomically(path: str | Path):
    """Yield a temporary path beside `path` for the block to write; once it has, the file gets the permissions
    `open` would give it (mkstemp makes it 0600, and a recipe or results file others on a shared filesystem
    cannot read breaks their jobs), is synced to disk and renamed onto `path` (for writers that want a path
    rather than bytes, such as safetensors')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{hidden_sibling_stem(path.name)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~process_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `path` whole or not at all, with the permissions `open` would give it."""
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data)


def match_umask(files: Iterable[str | Path]) -> None:
    """Give `files` the permissions `open` would have given them: safetensors writes through a private
    temporary file (so `save_file`, and transformers' `save_pretrained`, leave weights 0600)."""
    for file in files:
        os.chmod(file, 0o666 & ~process_umask())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged_folder(final: str | Path):
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    The previous content of `final` stays intact until the new folder is complete. What a killed writer of
    `final` left (its staging folder, or `final` retired and never replaced) is cleared first: a staging
    folder holds its writer's lock, so only the dead writers' are swept. A dead writer's staging folder that
    holds saved `PROGRESS` is adopted instead, emptied of all but that file, so the build resumes from it; a
    build that fails keeps its progress for the next one, and the file is deleted before the rename.
    """
    from filelock import FileLock

    final = Path(os.path.abspath(final))  # `.` has no name to stage beside
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(final.parent, only=final.name)
    stem = hidden_sibling_stem(final.name)
    writer, staging = _adopted_staging(final)
    if staging is None:
        staging = final.with_name(f"{stem}.{uuid.uuid4().hex[:8]}.partial")
        staging.mkdir()  # unlike mkdtemp, honours the umask: the result is as readable as any folder
        writer = FileLock(staging / WRITER_LOCK, timeout=0)
        writer.acquire()
    try:
        yield staging
        (staging / PROGRESS).unlink(missing_ok=True)
        (staging / WRITER_LOCK).unlink()  # still held: gone before the folder is renamed into place
        if final.exists():
            retired = final.with_name(f"{stem}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        if not (staging / PROGRESS).is_file():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        writer.release()


def _adopted_staging(final: Path):
    """(its writer lock, now held; the folder) for a dead writer's staging folder of `final` that holds saved
    `PROGRESS` (the latest saved, if several do), emptied of everything else; (None, None) when there is none."""
    from filelock import FileLock, Timeout

    pattern = re.compile(re.escape(hidden_sibling_stem(final.name)) + r"\.[0-9a-f]{8}\.partial")
    candidates = [
        entry
        for entry in final.parent.iterdir()
        if pattern.fullmatch(entry.name) and not entry.is_symlink() and (entry / PROGRESS).is_file()
    ]
    for staging in sorted(candidates, key=lambda entry: (entry / PROGRESS).stat().st_mtime_ns, reverse=True):
        writer = FileLock(staging / WRITER_LOCK, timeout=0)
        try:
            writer.acquire()
        except Timeout:  # its writer is alive
            continue
        for entry in staging.iterdir():  # what the build wrote after its last save is written again
            if entry.name in (PROGRESS, WRITER_LOCK):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return writer, staging  # any other is swept once `final` lands
    return None, None


def claim_is_held(lock_file: Path) -> bool:
    """Whether a live process holds the lock `lock_file` (the kernel drops a dead one's)."""
    from filelock import FileLock, Timeout

    if not lock_file.is_file():
        return False
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def sweep_staging(folder: str | Path, only: str | None = None) -> None:
    """Clear what a killed writer left in `folder` (of the entry `only`, when given): staging folders whose
    writer is dead are deleted (unless they hold saved `PROGRESS` and their final folder is missing: the next
    writer resumes from it), and so are temporary files (call it under the lock of what it sweeps when files
    are written there); a folder retired by `staged_folder` whose replacement never landed is put back.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    stem = r"\..+" if only is None else re.escape(hidden_sibling_stem(only))
    leftover = re.compile(stem.join(("(", r")\.(?:[0-9a-f]{8}\.partial|old|[^.]*\.tmp)")))
    for entry in sorted(folder.iterdir()):
        match = leftover.fullmatch(entry.name)
        if match is None or entry.is_symlink():
            continue
        if entry.name.endswith(".partial") and entry.is_dir():
            final = folder / (only if only is not None else match.group(1)[1:])
            resumable = (entry / PROGRESS).is_file() and not final.exists()
            if not resumable and not claim_is_held(entry / WRITER_LOCK):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
        elif entry.name.endswith(".old") and entry.is_dir():
            final = folder / only if only is not None else folder / match.group(1)[1:]
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

    final = Path(os.path.abspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(final.with_name(f"{hidden_sibling_stem(final.name)}.lock"), timeout=-1 if wait else 0)
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
