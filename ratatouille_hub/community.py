"""Soups that grow on the Hub: finished runs contributed as Hub models that carry their recipe fingerprint,
soups assembled from them by people who never saw the target data, and exact updates of published soups.
Only weights travel; the Hub clients are the stock ones.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .artifacts import ProbeRecord, RunRecord
from .card import RUN_TAG, Lineage, base_tag, declared_license, grown_soup_card, run_card
from .discovery import backbone_mismatch, classifier_names, head_names_of
from .errors import RatatouilleError, RecipeError
from .fetch import Ingredient, answered_by_the_hub, is_hub_id, resolve_model
from .merge_engine import COPIED_CONFIGS, WEIGHTS_NAME, merge_model_folders
from .provenance import (
    RUN_FILE,
    ProvenanceError,
    SoupIngredient,
    SoupRecord,
    differences,
    file_sha256,
    fingerprint_id,
    is_hex_digest,
    is_relative_source,
    record_problem,
    run_provenance,
)
from .provenance import recipe_fingerprint as fingerprint_of
from .publish import HeadMovedError, HubError, PushResult, push_folder
from .safe_text import path_component, say, terminal_safe
from .updating import RunFiles, local_run, update_folder, update_local_folder
from .vetting import (
    MAX_DISTANCE_TO_BASE,
    IngredientError,
    _relative_distance,
    check_finite,
    distance_to_base,
    read_config,
    signature_of,
)

log = logging.getLogger(__name__)
RUN_FILES = (WEIGHTS_NAME, *COPIED_CONFIGS, RUN_FILE)  # what a contributed run is made of
UPDATE_TRIES = 3  # pushes of a Hub soup's update, each from the head it read, before giving up


def contribute_runs(
    output: Path, prefix: str, indices: Sequence[int] | None, token=None, echo: Callable[[str], None] = say
) -> list[PushResult]:
    """Push the finished runs of the planned folder `output` (all, or the global `indices`) as Hub models
    `<prefix>-run<i>` (`<prefix>-<domain>-run<i>` with several held-out domains), one commit each."""
    from .recipe import indexed_runs
    from .recipe.plan import load_plans

    plans = load_plans(output, token)
    work = indexed_runs(plans)
    wanted = range(len(work)) if indices is None else indices
    for index in wanted:
        if not 0 <= index < len(work):
            raise ProvenanceError(f"--index {index}: the plan in {output} has runs 0 to {len(work) - 1}")
    records = [_run_record(output, index, *work[index]) for index in wanted]  # all checked before any push
    pushed = []
    for index, (run, provenance) in zip(wanted, records, strict=True):
        domain = f"-{path_component(work[index][0].target.test_domain)}" if len(plans) > 1 else ""
        repo_id = f"{prefix}{domain}-run{index}"
        with tempfile.TemporaryDirectory() as staging:
            staging = Path(staging)
            for name in (WEIGHTS_NAME, *COPIED_CONFIGS):
                if (run.model_folder / name).is_file():
                    shutil.copyfile(run.model_folder / name, staging / name)
            (staging / RUN_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            run_card(provenance, repo_id).save(staging / "README.md")
            result = push_folder(
                staging, repo_id, token=token, commit_message=f"Contribute run {index} (ratatouille-hub)"
            )
        echo(f"[hub] run {index} -> {result.url if result.changed else repo_id + ' (unchanged)'}")
        pushed.append(result)
    return pushed


def _run_record(output: Path, index: int, plan, spec) -> tuple[RunRecord, dict]:
    """(finished run `index`, the `ratatouille.json` to push), checked as `assemble --from-hub` will check
    it: its metrics.json is the output folder's, which others may share."""
    probe = ProbeRecord(output / plan.lp.folder)
    if not probe.head_file.is_file():
        raise ProvenanceError(f"{output}: the linear probe of {plan.target.test_domain} is not trained yet")
    recipe = fingerprint_of(plan, probe.head_file)
    run = RunRecord(output / spec.folder)
    if not run.is_done:
        raise ProvenanceError(f"run {index} ({run.folder}) is not finished: train it first (run --index {index})")
    try:
        metrics = run.metrics
        summary = {key: metrics[key] for key in ("init", "hparams", "best_step", "val_accuracy")}
    except (ValueError, KeyError, TypeError, RecursionError):
        summary = None
    provenance = {
        "fingerprint": fingerprint_id(recipe),
        "recipe": recipe,
        "run": summary and {"index": index, **summary},
        "weights_sha256": file_sha256(run.weights_file),
    }
    problem = record_problem(provenance)
    if problem:
        raise ProvenanceError(f"{run.metrics_file}: not the metrics of a finished run ({problem})")
    return run, provenance


def hub_run(repo_id: str, token=None, revision: str | None = None) -> RunFiles:
    """A contributed run's files at a pinned commit (weights, configs, provenance; never the rest)."""
    from huggingface_hub import HfApi, snapshot_download

    sha = revision or HfApi(token=token).model_info(repo_id, revision=revision, token=token).sha
    folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=list(RUN_FILES), token=token))
    return RunFiles(folder, f"{repo_id}@{sha}", file_sha256(folder / WEIGHTS_NAME))


def any_run(source: str, token=None) -> RunFiles:
    """A run named by a local model folder or a Hub id (`id` or `id@revision`)."""
    if Path(source).is_dir():
        return local_run(source)
    repo_id, _, revision = source.partition("@")
    if not is_hub_id(repo_id):
        raise ProvenanceError(f"{source}: no such run folder (and not a Hub model id)")
    run = hub_run(repo_id, token, revision or None)
    if (run.folder / RUN_FILE).is_file():  # a record is checked whole, and must name these weights
        provenance = run_provenance(run.folder / RUN_FILE, run.source)
        if run.sha256 != provenance["weights_sha256"]:
            raise ProvenanceError(f"{run.source}: its weights are not the ones its {RUN_FILE} names")
    return run


def find_recipe_runs(reference: str, token=None) -> list[RunFiles]:
    """The contributed runs of the recipe of the run `reference`, found by their base's tag, checked by
    fingerprint and verified (`verify_run`): one line for each run of another recipe, or whose files do not
    check out, which is left out; the same weights count once. A run's provenance is read (and checked)
    before its weights. The named run itself must pass: the others are compared with it."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=token)
    sha = api.model_info(reference, token=token).sha
    provenance = run_provenance(Path(hf_hub_download(reference, RUN_FILE, revision=sha, token=token)), reference)
    recipe, fingerprint = provenance["recipe"], provenance["fingerprint"]
    try:
        named_run = _pinned_run(reference, sha, provenance, token)
        named = _checked(_checkpoint(named_run))
        yardstick = recipe_yardstick(recipe, named, token)
        verify_named_run(named, yardstick, recipe)
        verify_run(named.checkpoint, named, yardstick)
    except (RatatouilleError, OSError, ValueError, RecursionError) as error:  # OSError: HfHubHTTPError too
        reason = _first_line(error).removeprefix(f"{reference}: ")
        raise ProvenanceError(f"{reference}: {reason}; name another run of the recipe") from None
    found: dict[str, tuple[int, RunFiles]] = {}
    for model in api.list_models(filter=[RUN_TAG, base_tag(recipe["base"])], token=token):
        if (model.id, model.sha) == (reference, sha):  # the named run: fetched and verified above
            found.setdefault(named_run.sha256, (provenance["run"]["index"], named_run))
            continue
        try:
            other = run_provenance(Path(hf_hub_download(model.id, RUN_FILE, revision=model.sha, token=token)), model.id)
            if other["fingerprint"] != fingerprint:
                log.warning(
                    terminal_safe(
                        f"refused {model.id}: a run of another recipe "
                        f"(differs in: {', '.join(differences(recipe, other['recipe']))})"
                    )
                )
                continue
            run = _pinned_run(model.id, model.sha, other, token)
            verify_run(_checkpoint(run), named, yardstick)  # even a copy of the named run's weights
        except (RatatouilleError, OSError, ValueError, RecursionError) as error:  # one bad repo is refused, not fatal
            log.warning(terminal_safe(f"refused {model.id}: {_first_line(error).removeprefix(f'{model.id}: ')}"))
            continue
        if run.sha256 in found:
            log.info(terminal_safe(f"skipped {model.id}: the same weights as {found[run.sha256][1].source}"))
            continue
        found[run.sha256] = (other["run"]["index"], run)
    if not found:
        raise ProvenanceError(f"{reference}: no run of its recipe found on the Hub (tag {base_tag(recipe['base'])})")
    return [run for _, run in sorted(found.values(), key=lambda item: (item[0], item[1].source))]


def _pinned_run(repo_id: str, sha: str, provenance: dict, token) -> RunFiles:
    """The run's files at commit `sha`, once its weights are the ones its record names."""
    run = hub_run(repo_id, token, sha)
    if run.sha256 != provenance["weights_sha256"]:
        raise ProvenanceError(f"{repo_id}: its weights are not the ones its {RUN_FILE} names")
    return run


def _checkpoint(run: RunFiles) -> Ingredient:
    repo_id, _, sha = run.source.rpartition("@")
    return Ingredient(repo_id, sha, run.folder)


# What a run's config may hold otherwise than its base's: its labels (checked against the recipe instead), and
# what the saving library writes about itself (the tensors' dtypes are compared from their headers).
LABEL_KEYS = ("id2label", "label2id", "label_names")
SAVING_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


@dataclass(frozen=True)
class Checked:
    """A checkpoint read for comparison, no code run: its config as transformers reads it (defaults filled
    in, so files saved by other versions compare), its image processor's config and its tensors' signature."""

    checkpoint: Ingredient
    labels: object  # config.json's id2label, as written
    config: dict
    processor: dict | None
    signature: dict


@dataclass(frozen=True)
class Yardstick:
    """What contributed runs are measured against: the recipe's base when the Hub has it at the commit the
    recipe names, else the run the user named."""

    checked: Checked
    name: str  # for lines: "the base org/name", "the named run org/name"
    head_names: set[str]
    base_names: dict[str, str] | None = None  # a headless base: its stored tensor names -> its classifier's

    @property
    def ignored_config_keys(self) -> tuple[str, ...]:
        """What a run's config may hold otherwise than the yardstick's: a headless base's architectures name
        its base class (ViTModel), the runs' their classifier."""
        return LABEL_KEYS + SAVING_KEYS + (("architectures",) if self.base_names is not None else ())


def _checked(checkpoint: Ingredient) -> Checked:
    from transformers import AutoConfig

    raw = read_config(checkpoint)  # refuses a config asking for custom code before transformers reads it
    try:
        config = AutoConfig.from_pretrained(str(checkpoint.path), trust_remote_code=False).to_dict()
    except Exception as error:  # config classes raise anything on a malformed value (AttributeError, their own)
        raise IngredientError(
            f"{checkpoint.source}: config.json does not read as a model config ({_first_line(error)})"
        ) from None
    processor_file = checkpoint.path / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else None  # JSON: read_config
    return Checked(checkpoint, raw.get("id2label"), config, processor, signature_of(checkpoint))


def recipe_yardstick(recipe: dict, named: Checked, token) -> Yardstick:
    """The recipe's base at the commit its record names, when the Hub has it; else the named run, with a line
    saying so (a local base is on the contributor's disk only)."""
    source, _, revision = recipe["base"].rpartition("@")
    if is_hex_digest(revision, 40):  # a Hub id at a commit: run_provenance checked the id
        try:
            base = _checked(resolve_model(source, revision, token))
            config_file = base.checkpoint.path / "config.json"
            read = classifier_names(config_file, base.signature)
            if not read.headless:
                return Yardstick(base, f"the base {source}", head_names_of(config_file, base.signature))
            base = replace(base, signature=read.renamed(base.signature))  # read as its runs name it
            return Yardstick(base, f"the base {source}", head_names_of(config_file, base.signature), read.names)
        except (RatatouilleError, OSError, ValueError, ImportError) as error:
            why = f"cannot be read ({_first_line(error)})"
    else:
        why = "is not on the Hub"
    log.info(
        terminal_safe(
            f"[verify] the recipe's base {recipe['base']} {why}: runs are measured against the named run "
            f"{named.checkpoint.source}"
        )
    )
    head_names = head_names_of(named.checkpoint.path / "config.json", named.signature)
    return Yardstick(named, f"the named run {named.checkpoint.source}", head_names)


def verify_named_run(named: Checked, yardstick: Yardstick, recipe: dict) -> None:
    """The run the user named must have the recipe's labels and head, and its base's config and tensors: the
    other runs are then held to its own."""
    labels = recipe["labels"]
    if named.labels != labels:
        raise IngredientError(f"{named.checkpoint.source}: its labels (config.json id2label) are not the recipe's")
    for name in sorted(yardstick.head_names):
        if named.signature.get(name, (None, ()))[1][:1] != (len(labels),):
            raise IngredientError(
                f"{named.checkpoint.source}: its head tensor {name} is not sized for the recipe's {len(labels)} labels"
            )
    if yardstick.checked is named:
        return
    differing = _differing(named.config, yardstick.checked.config, yardstick.ignored_config_keys)
    if differing:
        raise IngredientError(
            f"{named.checkpoint.source}: its config.json differs from {yardstick.name}'s in: {differing}"
        )
    problem = backbone_mismatch(yardstick.checked.signature, named.signature, yardstick.head_names)
    if problem:
        raise IngredientError(f"{named.checkpoint.source}: it cannot be averaged with {yardstick.name}: {problem}")


def verify_run(checkpoint: Ingredient, named: Checked, yardstick: Yardstick) -> None:
    """A contributed run joins only if it is what the recipe trains, as far as weights show it: the named
    run's config, image processor and tensors (names, shapes, dtypes), every tensor finite, and its backbone
    near the yardstick's (docs/threat-model.md says what this does not catch)."""
    checked = named if checkpoint == named.checkpoint else _checked(checkpoint)
    source = checkpoint.source
    differing = _differing(checked.config, named.config, SAVING_KEYS)
    if differing:
        raise IngredientError(f"{source}: its config.json differs from the named run's in: {differing}")
    if checked.processor != named.processor:
        raise IngredientError(f"{source}: its preprocessor_config.json differs from the named run's")
    problem = backbone_mismatch(named.signature, checked.signature, set())
    if problem:
        raise IngredientError(f"{source}: it cannot be averaged with the named run: {problem}")
    check_finite(checkpoint, set())
    base, head_names = yardstick.checked.checkpoint, yardstick.head_names
    distances = {
        "backbone weights": distance_to_base(
            base, checkpoint, yardstick.checked.signature, head_names, yardstick.base_names
        ),
        "backbone tensors (BatchNorm statistics and biases too)": _relative_distance(
            base, checkpoint, lambda name, tensor: name not in head_names, yardstick.base_names
        ),
    }
    for what, distance in distances.items():
        if not distance <= MAX_DISTANCE_TO_BASE:
            raise IngredientError(
                f"{source}: its {what} are at relative distance {distance:.2f} from {yardstick.name}'s (runs of "
                f"the recipe stay within {MAX_DISTANCE_TO_BASE:g})"
            )


def _differing(config: dict, other: dict, ignored: tuple[str, ...]) -> str:
    """The config keys whose values differ, comma-separated ("" when none)."""
    return ", ".join(sorted(k for k in (config.keys() | other.keys()) - set(ignored) if config.get(k) != other.get(k)))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def assemble_from_hub(reference: str, destination: Path, token=None, echo: Callable[[str], None] = say) -> SoupRecord:
    """The uniform soup of every contributed run of `reference`'s recipe, in run-index order, into
    `destination`, with its ingredients in the weights' metadata and a card naming them."""
    from .io import staged_folder

    runs = find_recipe_runs(reference, token)
    records = [run_provenance(run.folder / RUN_FILE, run.source) for run in runs]
    fingerprint = records[0]["fingerprint"]
    record = SoupRecord(tuple(SoupIngredient(run.sha256, run.source) for run in runs), fingerprint)
    lineage = Lineage.of_recipe(records[0]["recipe"], [r["run"]["init"] for r in records])
    with staged_folder(destination) as staging:
        merge_model_folders(
            [run.folder for run in runs], staging, metadata={**record.to_metadata(), **lineage.to_metadata()}
        )
        grown_soup_card(record, lineage=lineage).save(staging / "README.md")
    echo(f"[merge] {len(runs)} runs of recipe {fingerprint} -> {destination}")
    return record


def update_soup(
    soup: str,
    add: Sequence[str],
    remove: Sequence[str],
    destination: Path | None,
    token=None,
    echo: Callable[[str], None] = say,
    evaluate: Callable[[Path], float] | None = None,
    dataset: str | None = None,
    revision: str | None = None,
) -> SoupRecord:
    """Update the soup `soup`: a folder (in place under its claim, so concurrent updates all land), or a Hub
    id (only the soup and the named runs are downloaded, and the result is pushed back in one commit on top of
    the revision read, read again when another update landed first; on the branch `revision`, default main),
    unless `destination` is given. The outcome is printed once written or committed, never before."""
    if not Path(soup).is_dir() and not is_hub_id(soup):
        raise ProvenanceError(f"{soup}: no such soup folder (and not a Hub model id)")
    on_hub = not Path(soup).is_dir()
    if revision is not None and not on_hub:
        raise RecipeError(f"--revision {revision}: names a branch of a Hub soup, and {soup} is a folder")
    branch = revision or "main"
    folder = Path(soup)

    def resolve(ingredient: SoupIngredient) -> RunFiles:
        """The ingredient's folder (relative sources are seen from the soup), or its Hub repo. A Hub soup's
        record comes from whoever pushed it: only its Hub sources are followed, never a path."""
        source = ingredient.source
        if on_hub:
            if "@" not in source or Path(source).is_absolute():
                raise ProvenanceError(f"{soup}: ingredient {source!r} is not a Hub id@revision: add it again by hand")
            return any_run(source, token)
        local = folder / source if is_relative_source(source) else Path(source)
        return local_run(local) if local.is_dir() else any_run(source, token)

    def rewrite_card(staging: Path, record: SoupRecord, lineage: Lineage | None) -> None:
        """The card of the updated soup, keeping the license the soup's card declared (copied into `staging`)."""
        validation = evaluate(staging) if evaluate else None
        license = declared_license(staging)
        grown_soup_card(record, validation, dataset, lineage, license).save(staging / "README.md")
        if validation is not None:
            log.info(f"[eval] training-domain validation {100 * validation:.1f}%")

    read = _read_hub_soup(soup, branch, token) if on_hub else None  # a missing branch is refused before any run
    runs_added = [any_run(s, token) for s in add]
    runs_removed = [any_run(s, token) for s in remove]

    def landed(record: SoupRecord, outcome: str) -> SoupRecord:
        """The one line saying the update landed, printed only once it has (the Hub's answers escaped)."""
        echo(
            terminal_safe(
                f"[update] {soup}: {len(record.ingredients)} ingredients (+{len(add)} -{len(remove)}), {outcome}"
            )
        )
        return record

    if not on_hub:
        work = destination or folder
        return landed(
            update_local_folder(folder, runs_added, runs_removed, work, soup, resolve, rewrite_card),
            f"written to {work}",
        )
    for attempt in range(UPDATE_TRIES):
        head, folder = read if attempt == 0 else _read_hub_soup(soup, branch, token)
        with tempfile.TemporaryDirectory() as scratch:  # the update is staged here, kept on no failure
            work = destination or Path(scratch) / "soup"
            record = update_folder(folder, runs_added, runs_removed, work, soup, resolve, rewrite_card, relocate=False)
            if destination is not None:
                return landed(record, f"read at revision {head}, written to {work}")
            message = f"Update soup: +{len(add)} -{len(remove)} runs"
            try:
                result = push_folder(
                    work, soup, revision=branch, token=token, commit_message=message, parent_commit=head
                )
            except HeadMovedError:
                log.info(
                    terminal_safe(f"[update] {soup} moved on since revision {head} was read: updating its new head")
                )
                continue
        return landed(record, f"pushed as commit {result.oid} on {result.revision} ({result.url})")
    raise HubError(
        f"update of {soup} failed: another update landed first {UPDATE_TRIES} times in a row; run the command again"
    )


def _read_hub_soup(soup: str, branch: str, token) -> tuple[str, Path]:
    """The head commit of the Hub soup's branch and its files at that commit (only what an update reads)."""
    from huggingface_hub import HfApi, snapshot_download

    with answered_by_the_hub(soup, branch):
        head = HfApi(token=token).model_info(soup, revision=branch).sha
    patterns = [WEIGHTS_NAME, *COPIED_CONFIGS, "README.md", "recipe.yaml", "results.json"]  # results: lineage
    return head, Path(snapshot_download(soup, revision=head, allow_patterns=patterns, token=token))
