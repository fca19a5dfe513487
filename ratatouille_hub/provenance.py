"""Provenance that travels with the weights: which recipe a run belongs to, and which runs a soup holds.

A run's recipe fingerprint says which runs may be averaged together: the target at its revision, the
domains and the split, the labels, the base and the shared linear-probe head every run started from. It
is written beside the weights as `ratatouille.json` when a run is contributed.

A uniform soup records its ingredients in its safetensors metadata (readable remotely with
`huggingface_hub.get_safetensors_metadata`, without downloading the weights): the content hash of each
ingredient's weights file, in merge order, and where it came from. That makes the soup updatable: the count
and the hashes are all an exact incremental mean needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RatatouilleError
from .hashing import stable_hash

RUN_FILE = "ratatouille.json"
INGREDIENTS_KEY = "ratatouille.ingredients"  # JSON list of {"sha256", "source"}, in merge order
FINGERPRINT_KEY = "ratatouille.fingerprint"  # the recipe fingerprint its runs share ("" if unknown)
HASH_CHUNK = 1 << 20


class ProvenanceError(RatatouilleError, ValueError):
    """Runs or soups whose recorded provenance does not allow what was asked."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def relative_source(folder: Path, soup: Path) -> str:
    """Where an ingredient folder is, seen from the soup folder (POSIX): valid wherever both move together."""
    return Path(os.path.relpath(folder.resolve(), soup.resolve())).as_posix()


def is_relative_source(source: str) -> bool:
    """A source `relative_source` wrote (a Hub id@revision or an absolute folder is not)."""
    return source.startswith("..") or (not Path(source).is_absolute() and "@" not in source)


def recipe_fingerprint(plan, head_file: Path) -> dict:
    """What makes runs of a plan compatible, as plain data; its `stable_hash` is the fingerprint."""
    config, target = plan.config, plan.target
    return {
        "target": target.reference,
        "train_domains": list(target.train_domains),
        "test_domain": target.test_domain,
        "split": {"seed": config.seed, "holdout_fraction": config.holdout_fraction},
        "image_size": target.image_size,
        "labels": {str(k): v for k, v in target.id2label.items()},
        "base": plan.base.reference,
        "head_sha256": file_sha256(head_file),
    }


def fingerprint_id(recipe: dict) -> str:
    return stable_hash(recipe, length=16)


def differences(a: dict, b: dict) -> list[str]:
    """The fingerprint parts in which two recipes differ."""
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


@dataclass(frozen=True)
class SoupIngredient:
    sha256: str  # of the ingredient's model.safetensors
    source: str  # Hub id@revision or the folder it was read from


@dataclass(frozen=True)
class SoupRecord:
    """What a uniform soup's metadata says about it."""

    ingredients: tuple[SoupIngredient, ...]
    fingerprint: str

    def to_metadata(self) -> dict[str, str]:
        entries = [{"sha256": i.sha256, "source": i.source} for i in self.ingredients]
        return {INGREDIENTS_KEY: json.dumps(entries, separators=(",", ":")), FINGERPRINT_KEY: self.fingerprint}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, where: str) -> SoupRecord:
        if not metadata or INGREDIENTS_KEY not in metadata:
            raise ProvenanceError(
                f"{where}: its weights record no ingredients (not a uniform soup made by ratatouille-hub): "
                "it cannot be updated exactly; merge its runs again"
            )
        try:
            entries = json.loads(metadata[INGREDIENTS_KEY])
            ingredients = tuple(SoupIngredient(str(e["sha256"]), str(e["source"])) for e in entries)
        except (ValueError, KeyError, TypeError):
            raise ProvenanceError(f"{where}: malformed {INGREDIENTS_KEY} metadata") from None
        if not ingredients:
            raise ProvenanceError(f"{where}: its record lists no ingredients")
        return cls(ingredients, metadata.get(FINGERPRINT_KEY, ""))


def run_provenance(path: Path, where: str) -> dict:
    """A contributed run's `ratatouille.json`, checked before anything is read from it: it comes from
    whoever pushed the run."""
    try:
        provenance = json.loads(Path(path).read_text())
        ok = (
            isinstance(provenance, dict)
            and isinstance(provenance.get("fingerprint"), str)
            and isinstance(provenance.get("recipe"), dict)
            and isinstance(provenance.get("run"), dict)
            and type(provenance["run"].get("index")) is int
            and isinstance(provenance.get("weights_sha256"), str)
        )
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ProvenanceError(f"{where}: no valid {RUN_FILE} (fingerprint, recipe, run index, weights_sha256)")
    return provenance
