"""Content names: run folders, init folders and seeds are derived from a hash of what produced them."""

from __future__ import annotations

import hashlib
import json
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
