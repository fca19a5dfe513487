"""`merge` as a peer of mergekit: checkpoints named by Hub id or folder, each pinned at the revision it
resolved to, merged by any registered method, with a card and a `merge.yaml` that replays to the same bytes.

`merge(options)` is the Python API; `ratatouille-hub merge` calls it. The merge engine is reached through one
adapter, `_run_engine`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .config import MergeOptions, PublishOptions
from .fetch import Ingredient
from .safe_text import say

if TYPE_CHECKING:  # publish imports the merge engine: loaded only when a merge pushes
    from .publish import PushResult

log = logging.getLogger(__name__)
MERGE_CONFIG = "merge.yaml"  # beside the merged weights: `merge --config` replays it
CARD_NAME = "README.md"


@dataclass(frozen=True)
class Candidate:
    """One input as resolved: its pinned files, and its name in every line and in the card."""

    ingredient: Ingredient
    name: str  # Hub id@short sha, `run i from X` for a recipe's run, else the folder's name

    @property
    def pin(self) -> str:
        """What merge.yaml records: a Hub input at its commit sha; a folder as it was named."""
        return self.ingredient.source if self.ingredient.is_local else self.ingredient.reference


@dataclass(frozen=True)
class Trial:
    """A greedy step: the validation accuracy of the average with `candidate` added, and whether it stayed."""

    candidate: Candidate
    validation: float
    kept: bool


@dataclass(frozen=True)
class MergeResult:
    output: Path
    method: str
    parameters: tuple[tuple[str, object], ...]  # the method's, as the card records them
    members: tuple[Candidate, ...]  # what was merged, in merge order
    candidates: tuple[Candidate, ...]  # every input
    base: Candidate | None
    trials: tuple[Trial, ...]  # greedy's steps, in the order it tried them (empty for other methods)
    validation: float | None  # the merged model's training-domain validation accuracy, when a target was given
    options: MergeOptions  # as saved in merge.yaml: every Hub reference pinned
    pushed: PushResult | None = None


def merge(
    options: MergeOptions,
    *,
    publish: PublishOptions | None = None,
    token: str | bool | None = None,
    echo: Callable[[str], None] = say,
) -> MergeResult:
    """Resolve every input (folder, Hub id, or id@rev), merge them with `options.method` into
    `options.output` (replaced whole, atomically, with its card and merge.yaml), and push it when asked."""
    from .fetch import resolve_model
    from .io import staged_folder

    output = Path(options.output)
    local = [Path(m) for m in (*options.models, options.base or "") if m and Path(m).is_dir()]
    check_merge_output(output, local)  # before anything is downloaded
    ingredients = [resolve_model(model, token=token, hash_local=False) for model in options.models]
    digests = _ContentDigests(ingredients)  # hashed on a thread while torch loads and the merge runs
    candidates = tuple(_candidate(ingredient) for ingredient in ingredients)
    base = _candidate(resolve_model(options.base, token=token)) if options.base else None
    pinned = options.replace(
        models=tuple(c.pin for c in candidates), base=base.pin if base else None, **_pinned_target(options, token)
    )
    with staged_folder(output) as staging:
        outcome = _run_engine(pinned, candidates, base, staging, digests, token=token, echo=echo)
        named = {id(c): digests.named(k, c) for k, c in enumerate(candidates)}
        candidates = tuple(named.values())
        trials = tuple(dataclasses.replace(t, candidate=named[id(t.candidate)]) for t in outcome.trials)
        result = MergeResult(
            output=output,
            method=options.method,
            parameters=outcome.parameters,
            members=tuple(candidates[i] for i in outcome.members),
            candidates=candidates,
            base=base,
            trials=trials,
            validation=max((t.validation for t in trials if t.kept), default=None),  # greedy's last kept
            options=pinned,
        )
        _write_card(result, staging, repo_id=publish.push_to_hub if publish else None)
        pinned.save_yaml(staging / MERGE_CONFIG)
    echo(f"merged {len(result.members)} models into {output}")
    if publish is not None and publish.push_to_hub:
        from .publish import push_and_say

        result = dataclasses.replace(result, pushed=push_and_say(output, publish.push_to_hub, publish, token, echo))
    return result


def _candidate(ingredient: Ingredient) -> Candidate:
    from .provenance import declared_run, run_name

    if not ingredient.is_local:
        return Candidate(ingredient, f"{ingredient.source}@{ingredient.revision[:8]}")
    declared = declared_run(ingredient.path)
    name = run_name(declared[1], declared[2]) if declared else ingredient.path.resolve().name
    return Candidate(ingredient, name)


class _ContentDigests:
    """sha256 of every input's weight files, hashed by a forked worker process from the moment the inputs are
    resolved, so the hashing overlaps the import of torch and the merge itself instead of adding a pass over
    the inputs (a thread would fight the import for the GIL at every chunk; where fork is unsafe, one is
    used anyway). The merge's record names its ingredients by them; a local input is named by them in the card."""

    def __init__(self, ingredients: Sequence[Ingredient]):
        import multiprocessing
        import sys
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

        from .fetch import weight_file_digests

        if sys.platform == "linux" and "torch" not in sys.modules:  # fork before torch starts its threads
            pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
        else:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._files = [
            pool.submit(weight_file_digests, ingredient.path, downloaded=not ingredient.is_local)
            for ingredient in ingredients
        ]
        pool.shutdown(wait=False)  # the queued digests still run; the worker ends after the last

    def files(self, index: int) -> tuple[str, ...]:
        return self._files[index].result()

    def named(self, index: int, candidate: Candidate) -> Candidate:
        if not candidate.ingredient.is_local:
            return candidate
        return dataclasses.replace(candidate, ingredient=candidate.ingredient.with_digest(self.files(index)))


def _pinned_target(options: MergeOptions, token) -> dict:
    """The greedy target at the commit it is read at (a Hub dataset), so a replay scores on the same data."""
    from .fetch import dataset_revision, resolve_dataset, split_revision

    if not options.target:
        return {}
    target, domain_column, label_column = resolve_dataset(options.target, options.domain_column, options.label_column)
    target, revision = split_revision(target)
    revision = dataset_revision(target, token, revision)
    return {
        "target": f"{target}@{revision}" if revision else target,
        "domain_column": domain_column,
        "label_column": label_column,
    }


@dataclass(frozen=True)
class _EngineOutcome:
    members: tuple[int, ...]  # indices into the candidates, in merge order
    parameters: tuple[tuple[str, object], ...]
    trials: tuple[Trial, ...]


def _classifier_names(base: Path) -> dict[str, str] | None:
    """The base's stored tensor names as its fine-tunes name them (a headless base's take its classifier's
    prefix); None, its own names, where its config builds no image classifier (merge takes any model)."""
    from .discovery import classifier_names, local_signature

    try:
        return classifier_names(base / "config.json", local_signature(base)).names
    except (ValueError, TypeError, ImportError, OSError):  # another kind of model, or no config.json
        return None


def _run_engine(
    options: MergeOptions,
    candidates: Sequence[Candidate],
    base: Candidate | None,
    staging: Path,
    digests: _ContentDigests,
    *,
    token,
    echo: Callable[[str], None],
) -> _EngineOutcome:
    """The one place that calls the merge engine: select (a method that needs validation scores candidate
    averages on the target), then merge the members into `staging`, its weights marked as a merge's."""
    from .merge_engine import WEIGHTS_NAME, merge_model_folders
    from .merge_methods import MERGE_METHODS, MergeInputs
    from .provenance import MERGE_KEY

    method = MERGE_METHODS[options.method]
    folders = [c.ingredient.path for c in candidates]
    inputs = MergeInputs(
        count=len(folders), weights=options.weights or None, alpha=options.alpha, parameters=options.method_parameters
    )
    scored: list[tuple[int, float]] = []  # (candidate tried, validation of the average with it), in order
    if "validation" in method.needs:
        from .recipe.assembly import validation_inputs

        inputs = validation_inputs(folders, options, token=token)
        score = inputs.score

        def recorded(subset: list[int]) -> float:
            scored.append((subset[-1], value := score(subset)))
            return value

        inputs = dataclasses.replace(inputs, score=recorded)
    mixture = method.mix(inputs)
    trials = tuple(Trial(candidates[i], value, i in mixture.members) for i, value in scored)
    for trial in trials:
        echo(
            f"{method.name}: {trial.candidate.name}: validation {100 * trial.validation:.1f}% "
            + ("kept" if trial.kept else "left out (the average lost accuracy)")
        )
    members = [candidates[i] for i in mixture.members]
    plain_mean = mixture.rule is None and mixture.weights is None  # only it can be grown exactly by `update`
    single_files = plain_mean and all((m.ingredient.path / WEIGHTS_NAME).is_file() for m in members)
    anchor = base.ingredient.path if mixture.anchored is not None else None
    unanchored = merge_model_folders(
        [m.ingredient.path for m in members],
        staging,
        mixture.weights,
        {MERGE_KEY: method.name},
        rule=mixture.rule,
        base=anchor,
        base_names=None if anchor is None else _classifier_names(anchor),
        late=_UniformRecord(members, [partial(digests.files, i) for i in mixture.members]) if single_files else None,
    )
    if unanchored:
        log.warning(
            f"{method.name}: {len(unanchored)} tensors the base lacks or shapes otherwise take the plain mean: "
            + ", ".join(unanchored[:4])
            + (", ..." if len(unanchored) > 4 else "")
        )
    parameters = mixture.parameters or ((("weights", list(mixture.weights)),) if mixture.weights is not None else ())
    return _EngineOutcome(mixture.members, parameters, trials)


class _UniformRecord:
    """A plain mean of single-file models records its ingredients, so that `update` can grow it exactly: each
    by the sha256 of its weights, which may still be hashing when the merge starts (merge_engine.LateRecord).
    A Hub ingredient is recorded as id@sha, never as a path in the local cache: the same pins give the same
    bytes."""

    def __init__(self, members: Sequence[Candidate], digests: Sequence[Callable[[], tuple[str, ...]]]):
        from .provenance import RUN_FILE, declared_fingerprint

        folders = [m.ingredient.path for m in members]
        fingerprints = {declared_fingerprint(f / RUN_FILE, str(f)) if (f / RUN_FILE).is_file() else "" for f in folders}
        self._fingerprint = fingerprints.pop() if len(fingerprints) == 1 else ""
        self._sources = [
            str(f.resolve()) if m.ingredient.is_local else m.ingredient.reference for f, m in zip(folders, members)
        ]
        self._digests = digests

    def placeholder(self) -> dict[str, str]:
        return self._record(["0" * 64] * len(self._sources))

    def final(self) -> dict[str, str]:
        return self._record([files()[0] for files in self._digests])

    def _record(self, digests: Sequence[str]) -> dict[str, str]:
        from .provenance import SoupIngredient, SoupRecord

        ingredients = tuple(SoupIngredient(digest, source) for digest, source in zip(digests, self._sources))
        return SoupRecord(ingredients, self._fingerprint).to_metadata()


def _write_card(result: MergeResult, folder: Path, repo_id: str | None) -> None:
    from .card import merge_card

    merge_card(result, repo_id=repo_id).save(folder / CARD_NAME)


# -- the output folder, replaced whole ----------------------------------------------------------------


def merge_output_files() -> tuple[str, ...]:
    """What a previous `merge` writes besides weight shards: an output holding only these may be replaced."""
    from .merge_engine import COPIED_CONFIGS, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    return (*COPIED_CONFIGS, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, CARD_NAME, MERGE_CONFIG)


def check_merge_output(output: Path, inputs: list[Path]) -> None:
    """The output is replaced whole, so it must be new, empty or an earlier merge (only the files a merge
    writes, and weights carrying a merge's record); never an input, nor the base."""
    from .errors import RecipeError
    from .io import foreign_entries

    if output.exists() and not output.is_dir():
        raise RecipeError(f"output {output} exists and is not a folder")
    resolved = output.resolve()
    for model in inputs:
        if resolved == model.resolve() or resolved in model.resolve().parents:
            raise RecipeError(f"output {output} is (or contains) the input {model}; choose another folder")
    if not output.is_dir() or not any(output.iterdir()):
        return
    foreign = foreign_entries(output, merge_output_files())
    if foreign:
        raise RecipeError(
            f"output {output} holds other files ({', '.join(foreign[:3])}); it would be replaced whole - choose an empty folder"
        )
    if not _carries_merge_record(output):
        raise RecipeError(
            f"output {output} holds a model no merge wrote (its weights carry no merge record); it would be "
            "replaced whole - choose an empty folder"
        )


def _carries_merge_record(folder: Path) -> bool:
    """Whether every weights file of `folder` has the metadata a merge writes: its `ratatouille.merge` mark,
    or the ingredients of a uniform soup (what `update --output` and `assemble --from-hub` write)."""
    from .io import WEIGHTS_SHARD
    from .merge_engine import WEIGHTS_NAME, MergeError, read_safetensors_metadata
    from .provenance import INGREDIENTS_KEY, MERGE_KEY

    weights = [p for p in folder.iterdir() if p.name == WEIGHTS_NAME or WEIGHTS_SHARD.fullmatch(p.name)]
    try:
        return bool(weights) and all(
            {MERGE_KEY, INGREDIENTS_KEY} & read_safetensors_metadata(path).keys() for path in weights
        )
    except MergeError:  # not even a safetensors file: nothing a merge wrote
        return False
