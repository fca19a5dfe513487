"""Exact updates of a uniform soup: add or remove runs without merging everything again.

The soup's metadata (provenance.py) holds its ingredient count n and each ingredient's content hash. With
S the stored soup, the new mean is (n S - sum(removed) + sum(added)) / n', computed per tensor in float64
and stored in the soup's dtype. Against a fresh float32 merge of the same runs it differs only by rounding:
the stored S carries one rounding (half an ulp) and the fresh merge n float32 additions, so the two agree
within (n + 2) float32 epsilons of the largest weight, a bound the tests assert. Integer tensors follow the
rule of `merge`: they are the first ingredient's.

A local soup is updated under its claim (io.claimed_folder), and its record is read under it: two updates at
once run one after the other, the second from the soup the first wrote, so neither run is lost.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .card import Lineage
from .io import claimed_folder, match_umask, staged_folder
from .merge_engine import (
    COPIED_CONFIGS,
    WEIGHTS_NAME,
    MergeError,
    checked_headers,
    read_safetensors_metadata,
)
from .provenance import (
    RUN_FILE,
    ProvenanceError,
    SoupIngredient,
    SoupRecord,
    declared_fingerprint,
    file_sha256,
    is_relative_source,
    relative_source,
    run_provenance,
)
from .recipe.assembly import DIAGNOSTICS_PLOT, SCORES_PLOT
from .results import Results

log = logging.getLogger(__name__)
STALE_FILES = ("results.json", DIAGNOSTICS_PLOT, SCORES_PLOT)  # a recycle soup's evaluation of its old ingredients
COPIED_FILES = (*COPIED_CONFIGS, "README.md", "recipe.yaml")  # kept beside the new weights (the card rewritten)


@dataclass(frozen=True)
class RunFiles:
    """A run as an update reads it: its model folder, where it came from, its content hash."""

    folder: Path
    source: str
    sha256: str

    @property
    def fingerprint(self) -> str | None:
        """The recipe fingerprint its `ratatouille.json` declares (None without one), checked."""
        path = self.folder / RUN_FILE
        return declared_fingerprint(path, self.source) if path.is_file() else None


def local_run(folder: str | Path) -> RunFiles:
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise MergeError(f"{folder}: no {WEIGHTS_NAME} (an update reads single-file runs)")
    return RunFiles(folder, str(folder.resolve()), file_sha256(folder / WEIGHTS_NAME))


def updated_record(
    record: SoupRecord, add: Sequence[RunFiles], remove: Sequence[RunFiles], where: str
) -> tuple[SoupRecord, bool]:
    """The soup's ingredients after the update, and whether its first ingredient changes; every refusal
    is one line naming the run."""
    hashes = [i.sha256 for i in record.ingredients]
    seen: set[str] = set()
    for run in add:
        if run.sha256 in seen:
            raise ProvenanceError(f"{run.source}: named twice in --add")
        if run.sha256 in hashes:
            raise ProvenanceError(
                f"{run.source}: already in {where} (ingredient {hashes.index(run.sha256)} has the same weights)"
            )
        seen.add(run.sha256)
        if record.fingerprint and run.fingerprint is None:
            raise ProvenanceError(
                f"{run.source}: carries no recipe fingerprint ({RUN_FILE}), so nothing says it is a run of {where}'s "
                "recipe; add runs that recycle, run or contribute wrote"
            )
        if record.fingerprint and run.fingerprint != record.fingerprint:
            raise ProvenanceError(
                f"{run.source}: a run of another recipe (fingerprint {run.fingerprint}, {where} has "
                f"{record.fingerprint}): runs of one soup share target, split, labels, base and head"
            )
    kept = list(record.ingredients)
    named: set[str] = set()
    for run in remove:
        if run.sha256 in named:
            raise ProvenanceError(f"{run.source}: named twice in --remove")
        named.add(run.sha256)
        entry = next((i for i in kept if i.sha256 == run.sha256), None)
        if entry is None:
            raise ProvenanceError(f"{run.source}: not an ingredient of {where}")
        kept.remove(entry)  # one entry per run named: a soup may hold the same weights twice
    ingredients = (*kept, *(SoupIngredient(run.sha256, run.source) for run in add))
    if not ingredients:
        raise ProvenanceError(f"{where}: removing every ingredient leaves no soup")
    return SoupRecord(ingredients, record.fingerprint), ingredients[0].sha256 != hashes[0]


def incremental_mean(
    soup: dict[str, torch.Tensor],
    count: int,
    add: Sequence[Path],
    remove: Sequence[Path],
    first: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """(count x soup - sum(removed) + sum(added)) / count' per floating tensor, in float64, stored in each
    tensor's dtype; the runs' weight files are loaded one at a time. Integer tensors stay the soup's unless
    `first` (the new first ingredient) is given."""
    total = count + len(add) - len(remove)
    for name, tensor in soup.items():
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            # n x S would scale the soup's own rounding by n: exact only from a soup stored in 32 bits or more
            raise MergeError(f"tensor {name!r} is stored in {tensor.dtype}: an exact update needs float32; merge again")
    sums = {name: t.double() * count for name, t in soup.items() if t.is_floating_point()}
    for files, sign in ((add, 1.0), (remove, -1.0)):
        for file in files:
            run = load_file(file)
            for name, acc in sums.items():
                tensor = run[name]
                if not torch.isfinite(tensor).all():
                    raise MergeError(f"{file}: tensor {name!r} contains NaN or Inf")
                acc.add_(tensor.double(), alpha=sign)
            del run
    integers = {name: t for name, t in (first() if first else soup).items() if not t.is_floating_point()}
    return {
        name: (sums[name] / total).to(tensor.dtype) if name in sums else integers[name] for name, tensor in soup.items()
    }


def _relocated(record: SoupRecord, soup_folder: Path, destination: Path) -> SoupRecord:
    """Relative sources re-expressed from `destination`, where the updated soup will live."""
    moved = tuple(
        SoupIngredient(i.sha256, relative_source(soup_folder / i.source, destination))
        if is_relative_source(i.source)
        else i
        for i in record.ingredients
    )
    return SoupRecord(moved, record.fingerprint)


def checked_update(
    soup_folder: Path, add: Sequence[RunFiles], remove: Sequence[RunFiles], where: str
) -> tuple[SoupRecord, SoupRecord, bool]:
    """The soup's record as it is now, its record after the update and whether its first ingredient changes,
    once every run's config and tensors match the soup's."""
    record = SoupRecord.from_metadata(read_safetensors_metadata(soup_folder / WEIGHTS_NAME), where)
    for run in [*add, *remove]:
        checked_headers([soup_folder, run.folder])
    return (record, *updated_record(record, add, remove, where))


def update_local_folder(
    soup_folder: Path,
    add: Sequence[RunFiles],
    remove: Sequence[RunFiles],
    destination: Path,
    where: str,
    resolve_ingredient: Callable[[SoupIngredient], RunFiles],
    rewrite_card: Callable[[Path, SoupRecord, Lineage | None], None],
) -> SoupRecord:
    """`update_folder` under the soup's claim, waiting for any other update of it: the record is read again
    under the claim, so an update that landed meanwhile is kept. Bad input is refused before the claim,
    whose lock file would otherwise be left beside the soup by a refused command."""
    checked_update(soup_folder, add, remove, where)
    with claimed_folder(soup_folder, wait=True):
        return update_folder(soup_folder, add, remove, destination, where, resolve_ingredient, rewrite_card)


def soup_lineage(soup_folder: Path, add: Sequence[RunFiles]) -> Lineage | None:
    """The soup's lineage, with the inits of the runs added: what its weights carry, else (a recycled soup) what
    its results.json says, else what the added runs' records say (None when nothing says it)."""
    lineage = Lineage.from_metadata(read_safetensors_metadata(soup_folder / WEIGHTS_NAME))
    if lineage is None and (soup_folder / "results.json").is_file():
        try:
            lineage = Lineage.of_results(Results.load(soup_folder / "results.json"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # another's file
            lineage = None
    records = []
    for run in add:
        try:
            records.append(run_provenance(run.folder / RUN_FILE, run.source))
        except ProvenanceError:  # a local run's record holds its fingerprint alone
            continue
    if lineage is None and records:
        return Lineage.of_recipe(records[0]["recipe"], [r["run"]["init"] for r in records])
    return lineage and lineage.with_inits([r["run"]["init"] for r in records])


def update_folder(
    soup_folder: Path,
    add: Sequence[RunFiles],
    remove: Sequence[RunFiles],
    destination: Path,
    where: str,
    resolve_ingredient: Callable[[SoupIngredient], RunFiles],
    rewrite_card: Callable[[Path, SoupRecord, Lineage | None], None],
    relocate: bool = True,
) -> SoupRecord:
    """Write the updated soup folder `destination` (in one rename; it may be `soup_folder` itself). With
    `relocate`, relative sources are re-expressed from `destination` (a local soup's runs stay where they are)."""
    weights = soup_folder / WEIGHTS_NAME
    record, new_record, first_changes = checked_update(soup_folder, add, remove, where)
    first = None
    if first_changes:
        successor = new_record.ingredients[0]
        found = next((run for run in add if run.sha256 == successor.sha256), None) or resolve_ingredient(successor)
        if found.sha256 != successor.sha256:  # its integer tensors are the new soup's: they must be that run's
            raise ProvenanceError(f"{found.source}: its weights changed since it joined {where}")
        first = lambda: load_file(found.folder / WEIGHTS_NAME)  # noqa: E731
    if relocate:
        new_record = _relocated(new_record, soup_folder, destination)
    state = incremental_mean(
        load_file(weights),
        len(record.ingredients),
        [run.folder / WEIGHTS_NAME for run in add],
        [run.folder / WEIGHTS_NAME for run in remove],
        first,
    )
    lineage = soup_lineage(soup_folder, add)
    with staged_folder(destination) as staging:
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            staging / WEIGHTS_NAME,
            metadata={"format": "pt", **new_record.to_metadata(), **(lineage.to_metadata() if lineage else {})},
        )
        match_umask([staging / WEIGHTS_NAME])
        for name in COPIED_FILES:
            if (soup_folder / name).is_file():
                shutil.copyfile(soup_folder / name, staging / name)
        # the update replaces a local soup whole: the user's files in it (notes, images) are carried over as they
        # are (a Hub soup's folder is a cache snapshot of what was asked for, its links pointing into the cache)
        for entry in soup_folder.iterdir() if relocate else ():
            if entry.name in (WEIGHTS_NAME, *COPIED_FILES, *STALE_FILES):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, staging / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, staging / entry.name, follow_symlinks=False)
        stale = [name for name in STALE_FILES if (soup_folder / name).is_file()]
        if stale:
            log.info(f"[update] not carried over, they describe the soup before the update: {', '.join(stale)}")
        rewrite_card(staging, new_record, lineage)
    return new_record
