"""Fetch: turn a model reference (Hub id or local folder) into a pinned, local ingredient.

Only weights in safetensors, configs and processor files are downloaded, at the exact revision
sha seen when the ingredient was resolved, so a recipe replays on the same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "preprocessor_config.json", "README.md")


class FetchError(ValueError):
    """A model reference that cannot be resolved to usable files."""


@dataclass(frozen=True)
class Ingredient:
    """A checkpoint as the recipe uses it: where it came from, which exact bytes, where they are."""

    source: str  # Hub id or the folder the user named
    revision: str  # Hub commit sha, or `sha256:<digest>` of a local weights file
    path: Path

    @property
    def reference(self) -> str:
        return f"{self.source}@{self.revision}"

    @property
    def is_local(self) -> bool:
        return self.revision.startswith("sha256:")


def resolve_model(source: str, revision: str | None = None, token: str | bool | None = None) -> Ingredient:
    """A local transformers folder as it is, or a Hub repo downloaded at a pinned commit."""
    folder = Path(source)
    if folder.is_dir():
        return Ingredient(source, f"sha256:{weights_digest(folder)}", folder)
    if folder.exists():
        raise FetchError(f"{source}: not a model folder")
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi(token=token).model_info(source, revision=revision)
    path = snapshot_download(source, revision=info.sha, allow_patterns=list(WEIGHT_PATTERNS), token=token)
    return Ingredient(source, info.sha, Path(path))


def weights_digest(folder: Path) -> str:
    """sha256 of the folder's safetensors weights: names local checkpoints by content."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FetchError(f"{folder}: no safetensors weights (pickle checkpoints are not loaded)")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
