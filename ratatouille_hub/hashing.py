"""Content names: run folders, init folders and seeds are derived from a hash of what produced them."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

HASH_CHUNK = 1 << 20


def stable_hash(payload: dict, length: int = 12) -> str:
    """Short content hash of a JSON-able mapping: names run folders after their arguments."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def stable_int(text: str) -> int:
    """A seed from a name (e.g. `"<trial seed>:<run index>:batches"`): the same in every process."""
    return int(stable_hash({"k": text}, length=15), 16)


def is_hex_digest(value: object, length: int | None = None) -> bool:
    """What `stable_hash` and sha256 write: lowercase hex digits (`length` of them, when given)."""
    return (
        isinstance(value, str)
        and bool(value)
        and (length is None or len(value) == length)
        and all(c in "0123456789abcdef" for c in value)
    )


def check_content_key(key: str) -> None:
    """A folder key must be what `stable_hash` makes (hex digits): a plan file edited by hand, or by someone
    sharing the output folder, cannot name a folder outside it."""
    if not (is_hex_digest(key) and 8 <= len(key) <= 64):
        raise ValueError(f"folder key {key!r} is not a content hash")


def file_sha256(path: Path, chunk: int = HASH_CHUNK) -> str:
    """sha256 (hex) of a file's bytes: how weights are named by content in soup records."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(buffer[:count])
    return digest.hexdigest()


RACY_SECONDS = 2  # a file changed this recently may change again within one timestamp tick: not remembered


def remembered_sha256(path: Path, chunk: int = HASH_CHUNK) -> str:
    """`file_sha256`, remembered under the user's own cache by the file's identity and stat (device, inode,
    size, modification and change times in ns), as git's index remembers what it hashed: merging the same
    local runs again (another method, greedy then uniform, an update) reads their bytes once, not hashed
    again at 1.6 GB/s. Any write changes the change time, which no user can set back, so an edited file is
    hashed again; the entry lives outside the input, so an input never vouches for itself. Only names
    inputs: checks of a soup's own files always hash."""
    before = os.stat(path)
    entry = _digest_cache() / _stat_key(path, before)
    try:
        remembered = entry.read_text().strip()
        if is_hex_digest(remembered, 64):
            return remembered
    except OSError:
        pass
    digest = file_sha256(path, chunk)
    unchanged = _stat_key(path, os.stat(path)) == entry.name
    if unchanged and time.time_ns() - before.st_mtime_ns > RACY_SECONDS * 10**9:
        _remember(entry, digest)
    return digest


def _digest_cache() -> Path:
    """HF_HOME's (as huggingface_hub resolves it: HF_HOME, else XDG_CACHE_HOME/huggingface, else
    ~/.cache/huggingface) ratatouille-hub/sha256 folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")) / "ratatouille-hub" / "sha256"


def _stat_key(path: Path, stat: os.stat_result) -> str:
    identity = [os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def _remember(entry: Path, digest: str) -> None:
    """Best effort (a read-only cache only costs the hashing); written whole, so a reader never sees half."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = entry.with_name(f".{entry.name}.{os.getpid()}")
        staging.write_text(digest + "\n")
        os.replace(staging, entry)
    except OSError:
        pass
