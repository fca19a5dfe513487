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

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .artifacts import RUN_FILE, ProbeRecord
from .errors import RatatouilleError
from .hashing import check_content_key, file_sha256, is_hex_digest, stable_hash

INGREDIENTS_KEY = "ratatouille.ingredients"  # JSON list of {"sha256", "source"}, in merge order
MERGE_KEY = "ratatouille.merge"  # the method of a `merge` command's output: marks a folder a merge may replace
FINGERPRINT_KEY = "ratatouille.fingerprint"  # the recipe fingerprint its runs share ("" if unknown)
FINGERPRINT_LENGTH = 16  # hex digits of a recipe fingerprint
SHA256_LENGTH = 64


class ProvenanceError(RatatouilleError, ValueError):
    """Runs or soups whose recorded provenance does not allow what was asked."""


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


def plan_fingerprint(plan, output: Path) -> str:
    """The fingerprint of a plan executed in `output` (its shared probe's head is part of it)."""
    return fingerprint_id(recipe_fingerprint(plan, ProbeRecord(output / plan.lp.folder).head_file))


def fingerprint_id(recipe: dict) -> str:
    return stable_hash(recipe, length=FINGERPRINT_LENGTH)


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
            ingredients = tuple(SoupIngredient(e["sha256"], e["source"]) for e in entries)
        except (ValueError, KeyError, TypeError, RecursionError):
            ingredients = None
        if ingredients is None or not all(
            is_hex_digest(i.sha256, SHA256_LENGTH) and isinstance(i.source, str) for i in ingredients
        ):
            raise ProvenanceError(f"{where}: malformed {INGREDIENTS_KEY} metadata (a list of sha256 and source)")
        if not ingredients:
            raise ProvenanceError(f"{where}: its record lists no ingredients")
        fingerprint = metadata.get(FINGERPRINT_KEY, "")
        if fingerprint != "" and not is_hex_digest(fingerprint, FINGERPRINT_LENGTH):
            raise ProvenanceError(f"{where}: malformed {FINGERPRINT_KEY} metadata (not a recipe fingerprint)")
        return cls(ingredients, fingerprint)


def run_provenance(path: Path, where: str) -> dict:
    """A contributed run's `ratatouille.json`, checked before anything is read from it: it comes from
    whoever pushed the run, and its fields reach lines, tags and cards."""
    try:
        provenance = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):  # a UnicodeDecodeError is a ValueError
        provenance = None
    problem = record_problem(provenance)
    if problem:
        raise ProvenanceError(f"{where}: no valid {RUN_FILE}: {problem}")
    return provenance


def run_name(index: int, init: str) -> str:
    """A run as every line, table and figure names it: its index in the plan and the checkpoint it started
    from (`run 2 from aux-1`)."""
    return f"run {index} from {Path(init.split('@')[0]).name}"


def declared_run(folder: Path) -> tuple[str, int, str] | None:
    """(fingerprint, index, init) a recipe's run folder declares in its `ratatouille.json`; None for any
    other model folder, or a record that does not hold all three well formed."""
    try:
        record = json.loads((Path(folder) / RUN_FILE).read_text())
        fingerprint, index, init = record["fingerprint"], record["index"], record["init"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if not is_hex_digest(fingerprint, FINGERPRINT_LENGTH) or type(index) is not int or index < 0:
        return None
    return (fingerprint, index, init) if isinstance(init, str) else None


def declared_fingerprint(path: Path, where: str) -> str:
    """The fingerprint a run folder's record declares, all that `merge` keeps of it (for `update`); checked,
    since it reaches the soup's metadata and card."""
    try:
        fingerprint = json.loads(Path(path).read_text()).get("fingerprint")
    except (OSError, ValueError, RecursionError, AttributeError):  # unreadable, not JSON, not an object
        fingerprint = None
    if not is_hex_digest(fingerprint, FINGERPRINT_LENGTH):
        raise ProvenanceError(
            f"{where}: no valid {RUN_FILE}: fingerprint is not a {FINGERPRINT_LENGTH}-digit hex digest"
        )
    return fingerprint


def record_problem(provenance: object) -> str | None:
    """What is wrong with a run record (None: nothing). A fingerprint must be its recipe's hash, so a run
    cannot claim a recipe it does not state."""
    if not isinstance(provenance, dict):
        return "not a JSON object"
    if not is_hex_digest(provenance.get("fingerprint"), FINGERPRINT_LENGTH):
        return f"fingerprint is not a {FINGERPRINT_LENGTH}-digit hex digest"
    if not is_hex_digest(provenance.get("weights_sha256"), SHA256_LENGTH):
        return "weights_sha256 is not a sha256 hex digest"
    problem = _fields_problem("recipe", provenance.get("recipe"), RECIPE_FIELDS, exact=True) or _fields_problem(
        "run", provenance.get("run"), RUN_FIELDS, exact=False
    )
    if problem:
        return problem
    if fingerprint_id(provenance["recipe"]) != provenance["fingerprint"]:
        return "its fingerprint is not the hash of its recipe"
    return None


def _fields_problem(name: str, value: object, fields: dict, exact: bool) -> str | None:
    """The first field of the object `value` that is missing or fails its check (with `exact`, an unknown
    field is one too)."""
    if not isinstance(value, dict):
        return f"{name} is not an object"
    if exact and value.keys() - fields.keys():
        return f"{name} has fields other than {', '.join(fields)}"
    for field, (check, expected) in fields.items():
        if field not in value or not check(value[field]):
            return f"{name}.{field} is not {expected}"
    return None


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_reference(value: object, fused: bool = False) -> bool:
    """`source@revision` as a recipe writes it: a Hub id at a commit, a folder at the sha256 of its weights,
    or (for a run's init, with `fused`) a fusion of checkpoints."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str):
        return False
    source, _, revision = value.rpartition("@")
    if is_hex_digest(revision, 40):
        try:
            validate_repo_id(source)
        except HFValidationError:
            return False
        return True
    if revision.startswith("sha256:"):
        return _is_text(source) and is_hex_digest(revision.removeprefix("sha256:"), FINGERPRINT_LENGTH)
    key = revision.removeprefix("fused:")
    if not fused or revision == key or source != f"fusion:{key}":
        return False
    try:
        check_content_key(key)
    except ValueError:
        return False
    return True


RECIPE_FIELDS = {  # what `recipe_fingerprint` writes: field -> (check, what it must be)
    "target": (_is_text, "a dataset name"),
    "train_domains": (lambda v: isinstance(v, list) and v != [] and all(map(_is_text, v)), "a list of domains"),
    "test_domain": (_is_text, "a domain"),
    "split": (
        lambda v: (
            isinstance(v, dict)
            and v.keys() == {"seed", "holdout_fraction"}
            and type(v["seed"]) is int
            and _is_number(v["holdout_fraction"])
        ),
        "a seed and a holdout fraction",
    ),
    "image_size": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "labels": (
        lambda v: isinstance(v, dict) and v != {} and all(_is_text(k) and isinstance(x, str) for k, x in v.items()),
        "an id -> label mapping",
    ),
    "base": (_is_reference, "a Hub id@commit or a folder@sha256:digest"),
    "head_sha256": (lambda v: is_hex_digest(v, SHA256_LENGTH), "a sha256 hex digest"),
}
RUN_FIELDS = {  # what `contribute` writes about the run itself
    "index": (_is_count, "a run index"),
    "init": (lambda v: _is_reference(v, fused=True), "a Hub id@commit, a folder@sha256:digest or a fusion"),
    "hparams": (
        lambda v: isinstance(v, dict) and all(_is_text(k) and _is_number(x) for k, x in v.items()),
        "a mapping of hyperparameters to finite numbers",
    ),
    "best_step": (_is_count, "a step count"),
    "val_accuracy": (lambda v: _is_number(v) and 0 <= v <= 1, "an accuracy between 0 and 1"),
}
