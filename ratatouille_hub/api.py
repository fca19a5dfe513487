"""The Python API: one function per command, each taking that command's options object (config.py, the same
dataclasses that make its flags) and returning a typed, frozen record that the command prints, as a table or
(`--format json`) as JSON (records.py). Heavy libraries are imported inside the functions, so importing the
package stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import (
    AssembleOptions,
    ContributeOptions,
    DiagnoseOptions,
    DiscoverOptions,
    IntertrainConfig,
    MergeOptions,
    PushOptions,
    RecipeConfig,
    ResultsOptions,
    TrackingOptions,
    UpdateOptions,
)
from .safe_text import say

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .diagnostics import Diagnosis
    from .discovery import Candidate
    from .merging import MergeResult
    from .provenance import SoupIngredient, SoupRecord
    from .publish import PushResult
    from .recipe import RecipePlan
    from .results import LeaveOneDomainOut, Results

Echo = Callable[[str], None]


def recycle(
    config: RecipeConfig,
    *,
    token: str | bool | None = None,
    echo: Echo = log.info,
    tracking: TrackingOptions | None = None,
):
    """Run the whole recipe (`ratatouille-hub recycle`): plan, train what is missing, assemble. Returns the
    `Results` record saved as `<output>/soup/results.json`, or with `test_domain="all"` the
    `LeaveOneDomainOut` table (None on the non-main processes of `accelerate launch`). `tracking` says where
    to report the runs (an experiment tracker), if anywhere."""
    from .recipe import recycle as run

    return run(config, token=token, echo=echo, tracking=tracking or TrackingOptions())


def plan_recipe(config: RecipeConfig, *, token: str | bool | None = None, echo: Echo = log.info) -> list[RecipePlan]:
    """The recipe's plans, one per held-out domain (`recycle --dry-run`): every run's init, hyperparameters,
    seeds and folder, without training or writing anything."""
    from .recipe import plan_recipe as plan

    return plan(config, token=token, echo=echo)


def intertrain(config: IntertrainConfig, **kwargs) -> list[Path]:
    """Fine-tune the base on an auxiliary dataset (`ratatouille-hub intertrain`): the fine-tunes' folders,
    each with a card naming its base and dataset."""
    from .intertraining import intertrain as run

    return run(config, **kwargs)


def merge(options: MergeOptions, **kwargs) -> MergeResult:
    """Merge checkpoints (folders or Hub ids, each pinned) by a registered method into `options.output`, with a
    card and merge.yaml (`ratatouille-hub merge`); `publish=PublishOptions(push_to_hub=...)` pushes it."""
    from .merging import merge as run

    return run(options, **kwargs)


@dataclass(frozen=True)
class Discovery:
    """What `discover` found: every listed fine-tune of the base with its verdict, most downloaded first."""

    base: str
    target: str | None  # the Hub dataset whose fine-tunes were refused as leakage, if one was given
    candidates: tuple[Candidate, ...]


def discover(options: DiscoverOptions, *, token: str | bool | None = None) -> Discovery:
    """List the Hub's fine-tunes of `options.base` and vet each from its metadata and safetensors headers alone,
    no weight downloaded (`ratatouille-hub discover`): which ones `recycle` would recycle, and why not the rest."""
    from .discovery import discover_finetunes
    from .fetch import resolve_dataset, split_revision

    target = split_revision(resolve_dataset(options.target)[0])[0] if options.target else None
    candidates = discover_finetunes(options.base, target=target, limit=options.limit, token=token)
    return Discovery(options.base, target, tuple(candidates))


def diagnose(options: DiagnoseOptions, *, token: str | bool | None = None) -> Diagnosis:
    """Measure docs/method.md's three criteria on the target's training-domain validation
    (`ratatouille-hub diagnose`): each model's accuracy, and for each pair its ratio-error and the accuracy along
    the weight path between them, with its barrier; the paths drawn into `options.plot` when given."""
    from .diagnostics import diagnose_models
    from .figures import plot_paths

    diagnosis = diagnose_models(options.models, options, token=token)
    if options.plot:
        plot_paths(diagnosis, Path(options.plot))
    return diagnosis


def assemble(
    options: AssembleOptions,
    *,
    token: str | bool | None = None,
    echo: Echo | None = None,
    tracking: TrackingOptions | None = None,
) -> Results | LeaveOneDomainOut | SoupRecord:
    """Build the soup of the plan saved in `options.output` from its finished runs (`ratatouille-hub assemble`),
    as `recycle` does at its end: its `Results`, or the `LeaveOneDomainOut` table. With `from_hub`, the uniform
    soup of every run of that run's recipe on the Hub, into `options.output`: the `SoupRecord` of its ingredients."""
    output = Path(options.output)
    if options.from_hub:
        from .community import assemble_from_hub
        from .merging import check_merge_output

        check_merge_output(output, [])  # replaced whole: never a plan folder or anything else
        return assemble_from_hub(options.from_hub, output, token=token, echo=echo or say)
    from .recipe import assemble_output

    return assemble_output(output, token=token, echo=echo or log.info, tracking=tracking or TrackingOptions())


@dataclass(frozen=True)
class Contribution:
    output: Path  # the planned folder the runs were read from
    pushed: tuple[PushResult, ...]  # one commit per run, in the order pushed


def contribute(options: ContributeOptions, *, token: str | bool | None = None, echo: Echo = say) -> Contribution:
    """Push finished runs of the plan saved in `options.output` as Hub models `<to>-run<i>`, each with its
    recipe fingerprint and a card (`ratatouille-hub contribute`), for anyone to average without the data."""
    from .community import contribute_runs

    output = Path(options.output)
    return Contribution(output, tuple(contribute_runs(output, options.to, options.index or None, token, echo)))


@dataclass(frozen=True)
class UpdateResult:
    soup: str  # as named: a folder or a Hub id
    written_to: Path | None  # the folder holding the updated soup; None when it was pushed back to the Hub
    ingredients: tuple[SoupIngredient, ...]  # after the update, in merge order
    fingerprint: str  # the recipe fingerprint its runs share ("" for runs without one)
    validation: float | None  # with a target: the updated soup's training-domain validation accuracy


def update(options: UpdateOptions, *, token: str | bool | None = None, echo: Echo = say) -> UpdateResult:
    """Add runs to a uniform soup or remove them, exactly and without merging again (`ratatouille-hub update`):
    a folder in place (or into `options.output`), a Hub soup pushed back in one commit."""
    from .community import update_soup

    output = Path(options.output) if options.output else None
    if output is not None:
        from .merging import check_merge_output

        check_merge_output(output, [Path(m) for m in (options.soup, *options.add, *options.remove) if Path(m).is_dir()])
    scores: list[float] = []
    evaluate = None
    if options.target:
        from .evaluation import scoring_device
        from .fetch import resolve_model
        from .models import load_classifier
        from .target import prepare_target
        from .train import validation_accuracy

        def evaluate(folder: Path) -> float:
            target = prepare_target(options, resolve_model(str(folder)), token)
            model = load_classifier(folder, target.id2label).to(scoring_device())
            scores.append(validation_accuracy(model, target.data.pooled_val, target.data.normalize))
            return scores[-1]

    record = update_soup(
        options.soup,
        options.add,
        options.remove,
        output,
        token=token,
        echo=echo,
        evaluate=evaluate,
        dataset=options.target,
        revision=options.revision,
    )
    local = Path(options.soup) if Path(options.soup).is_dir() else None
    return UpdateResult(
        options.soup, output or local, record.ingredients, record.fingerprint, scores[-1] if scores else None
    )


def push(options: PushOptions, *, token: str | bool | None = None, echo: Echo = say) -> PushResult:
    """Push a soup folder to the Hub in one commit, its card validated first (`ratatouille-hub push`); a rerun
    with nothing new commits nothing."""
    from .publish import default_push_folder, push_and_say

    folder = Path(options.folder) if options.folder is not None else default_push_folder()
    return push_and_say(folder, options.repo_id, options, token, echo, create_pr=options.create_pr)


def read_results(options: ResultsOptions) -> Results | LeaveOneDomainOut:
    """The results of a finished output folder, or of a soup folder (`ratatouille-hub results`): the
    `Results` record of its results.json, or with every domain held out, each soup's in a `LeaveOneDomainOut`."""
    from .results import load_results

    return load_results(Path(options.output))
