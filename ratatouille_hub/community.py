"""Soups that grow on the Hub: finished runs contributed as Hub models that carry their recipe fingerprint,
soups assembled from them by people who never saw the target data, and exact updates of published soups.
Only weights travel; the Hub clients are the stock ones.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .card import RUN_TAG, base_tag, grown_soup_card, run_card
from .fetch import is_hub_id
from .merge import COPIED_CONFIGS, WEIGHTS_NAME, merge_model_folders
from .provenance import (
    RUN_FILE,
    ProvenanceError,
    SoupIngredient,
    SoupRecord,
    differences,
    file_sha256,
    fingerprint_id,
    is_relative_source,
    run_provenance,
)
from .provenance import recipe_fingerprint as fingerprint_of
from .publish import PushResult, push_folder
from .update import RunFiles, local_run, update_folder

RUN_FILES = (WEIGHTS_NAME, *COPIED_CONFIGS, RUN_FILE)  # what a contributed run is made of


def contribute_runs(
    output: Path, prefix: str, indices: Sequence[int] | None, token=None, echo: Callable[[str], None] = print
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
    pushed = []
    for index in wanted:
        plan, spec = work[index]
        head_file = output / plan.lp.folder / "head.safetensors"
        if not head_file.is_file():
            raise ProvenanceError(f"{output}: the linear probe of {plan.target.test_domain} is not trained yet")
        recipe = fingerprint_of(plan, head_file)
        fingerprint = fingerprint_id(recipe)
        folder = output / spec.folder
        if not (folder / "done").is_file():
            raise ProvenanceError(f"run {index} ({folder}) is not finished: train it first (run --index {index})")
        metrics = json.loads((folder / "metrics.json").read_text())
        provenance = {
            "fingerprint": fingerprint,
            "recipe": recipe,
            "run": {
                "index": index,
                "init": metrics["init"],
                "hparams": metrics["hparams"],
                "best_step": metrics["best_step"],
                "val_accuracy": metrics["val_accuracy"],
            },
            "weights_sha256": file_sha256(folder / "model" / WEIGHTS_NAME),
        }
        domain = f"-{plan.target.test_domain}" if len(plans) > 1 else ""
        repo_id = f"{prefix}{domain}-run{index}"
        with tempfile.TemporaryDirectory() as staging:
            staging = Path(staging)
            for name in (WEIGHTS_NAME, *COPIED_CONFIGS):
                if (folder / "model" / name).is_file():
                    shutil.copyfile(folder / "model" / name, staging / name)
            (staging / RUN_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            run_card(provenance, repo_id).save(staging / "README.md")
            result = push_folder(
                staging, repo_id, token=token, commit_message=f"Contribute run {index} (ratatouille-hub)"
            )
        echo(f"[hub] run {index} -> {result.url if result.changed else repo_id + ' (unchanged)'}")
        pushed.append(result)
    return pushed


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
    return hub_run(repo_id, token, revision or None)


def find_recipe_runs(reference: str, token=None, echo: Callable[[str], None] = print) -> list[RunFiles]:
    """The contributed runs of the recipe of the run `reference`, found by their base's tag and checked by
    fingerprint: one line for each run of another recipe, or whose files do not check out, which is left
    out; the same weights count once. A run's provenance is read (and checked) before its weights."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    provenance = run_provenance(Path(hf_hub_download(reference, RUN_FILE, token=token)), reference)
    recipe, fingerprint = provenance["recipe"], provenance["fingerprint"]
    found: dict[str, tuple[int, RunFiles]] = {}
    for model in api.list_models(filter=[RUN_TAG, base_tag(str(recipe.get("base", "")))], token=token):
        try:
            other = run_provenance(Path(hf_hub_download(model.id, RUN_FILE, revision=model.sha, token=token)), model.id)
            if other["fingerprint"] != fingerprint:
                echo(
                    f"refused {model.id}: a run of another recipe (differs in: {', '.join(differences(recipe, other['recipe']))})"
                )
                continue
            run = hub_run(model.id, token, model.sha)
            if run.sha256 != other["weights_sha256"]:
                raise ProvenanceError(f"{model.id}: its weights are not the ones its {RUN_FILE} names")
        except (ProvenanceError, OSError, ValueError, HfHubHTTPError) as error:  # one bad repo is refused, not fatal
            echo(f"refused {model.id}: {str(error).splitlines()[0].removeprefix(f'{model.id}: ')}")
            continue
        if run.sha256 in found:
            echo(f"skipped {model.id}: the same weights as {found[run.sha256][1].source}")
            continue
        found[run.sha256] = (other["run"]["index"], run)
    if not found:
        raise ProvenanceError(
            f"{reference}: no run of its recipe found on the Hub (tag {base_tag(str(recipe.get('base', '')))})"
        )
    return [run for _, run in sorted(found.values(), key=lambda item: (item[0], item[1].source))]


def assemble_from_hub(reference: str, destination: Path, token=None, echo: Callable[[str], None] = print) -> SoupRecord:
    """The uniform soup of every contributed run of `reference`'s recipe, in run-index order, into
    `destination`, with its ingredients in the weights' metadata and a card naming them."""
    from .io import staged_folder

    runs = find_recipe_runs(reference, token, echo)
    fingerprint = run_provenance(runs[0].folder / RUN_FILE, runs[0].source)["fingerprint"]
    record = SoupRecord(tuple(SoupIngredient(run.sha256, run.source) for run in runs), fingerprint)
    with staged_folder(destination) as staging:
        merge_model_folders([run.folder for run in runs], staging, metadata=record.to_metadata())
        grown_soup_card(record).save(staging / "README.md")
    echo(f"[merge] {len(runs)} runs of recipe {fingerprint} -> {destination}")
    return record


def update_soup(
    soup: str,
    add: Sequence[str],
    remove: Sequence[str],
    destination: Path | None,
    token=None,
    echo: Callable[[str], None] = print,
    evaluate: Callable[[Path], float] | None = None,
    dataset: str | None = None,
) -> SoupRecord:
    """Update the soup `soup` (a folder, or a Hub id: then only the soup and the named runs are downloaded,
    and the result is pushed back in one commit unless `destination` is given)."""
    on_hub = not Path(soup).is_dir()
    if on_hub:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                soup, allow_patterns=[WEIGHTS_NAME, *COPIED_CONFIGS, "README.md", "recipe.yaml"], token=token
            )
        )
    else:
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

    def rewrite_card(staging: Path, record: SoupRecord) -> None:
        validation = evaluate(staging) if evaluate else None
        grown_soup_card(record, validation, dataset).save(staging / "README.md")
        if validation is not None:
            echo(f"[eval] training-domain validation {100 * validation:.1f}%")

    runs_added = [any_run(s, token) for s in add]
    runs_removed = [any_run(s, token) for s in remove]
    with tempfile.TemporaryDirectory() as scratch:  # a Hub soup's update is staged here, kept on no failure
        work = destination or (Path(scratch) / "soup" if on_hub else folder)
        record = update_folder(
            folder, runs_added, runs_removed, work, soup, resolve, rewrite_card, relocate=not on_hub, echo=echo
        )
        echo(f"[update] {soup}: {len(record.ingredients)} ingredients (+{len(add)} -{len(remove)})")
        if on_hub and destination is None:
            message = f"Update soup: +{len(add)} -{len(remove)} runs"
            result = push_folder(work, soup, token=token, commit_message=message)
            echo(f"[hub] pushed {result.url}")
    return record
