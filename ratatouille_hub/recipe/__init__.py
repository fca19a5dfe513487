"""The Model Ratatouille recipe (docs/method.md) as plan -> execute -> assemble.

    plan      fetch the base, discover and vet the fine-tunes to recycle, describe the target, and list
              the shared linear probe and every run (init, hparams, seeds, folder key): no training.
              `--test-domain all` makes one plan per held-out domain (leave-one-domain-out).
    execute   train what the plans still miss (the only place training happens), in one process or
              spread over many: accelerate's ranks, scheduler array tasks (`run --index`), or both
    assemble  average, score, diagnose and write the result folder from finished run folders

Every expensive artefact lives in a folder named after a hash of what produced it, written whole or not
at all, with a `done` marker, and claimed by a lock beside it while it is written (artifacts.py): rerunning
an interrupted recipe redoes only what is missing (a run killed mid-way resumes from the progress it saved
at its last evaluation, checkpoint.py), and no two processes ever train the same run.

    output/
      recipe.yaml        the config, replayable with --config
      plan.json          the plans every process executes (pinned ingredients, every run's spec)
      cache/<hash>/      the target decoded once (memory-mapped), shared by every process and rerun
      lp/<hash>/         a shared linear-probe head (one per held-out domain)
      inits/<hash>/      fusing only: one run's starting point, a convex combination of checkpoints
      runs/<hash>/       one target fine-tune: model/, metrics.json, predictions.safetensors, done
      runs/.<hash>.*.partial/   a fine-tune being trained, or killed: progress.safetensors, its last save
      soup/              the result as a transformers model folder (+ README.md, recipe.yaml, results.json):
                         the weight average (ratatouille, soup) or the best run by validation (erm, fusing)
      .soup.done         the soup's done marker: what produced it, and the digest of each of its files
      soups/<domain>/    with --test-domain all: one such folder per held-out domain, and results.json
                         beside recipe.yaml holds the DomainBed table
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..artifacts import RunRecord
from ..config import ALL_DOMAINS, RecipeConfig, TrackingOptions
from ..discovery import discover_finetunes, format_candidates
from ..errors import RecipeError
from ..fetch import FetchError, Ingredient, is_hub_id, resolve_dataset, resolve_model, split_revision
from ..io import claim_is_held, claimed_folder, sweep_staging
from ..models import ArchitectureError, precision_note, refuse_unbuildable
from ..results import LeaveOneDomainOut, Results, soup_subfolder
from ..safe_text import terminal_safe
from ..sources import refuse_output_inside
from ..strategies import STRATEGIES, FusionSpec
from ..target import Target, TargetPreparation, refuse_untakeable_size
from ..tracking import UNTRACKED, Tracking
from ..vetting import vet_ingredients
from .assembly import assemble, check_replaceable_soup
from .executor import RunExecutor, Worker, execute
from .plan import PLAN_FILE, PlanSummary, RecipePlan, build_plan, format_plans, load_plans, plan_summary, save_plans

log = logging.getLogger(__name__)

__all__ = [
    "PINNED_FIELDS",
    "RecipeError",
    "RecipePlan",
    "Results",
    "LeaveOneDomainOut",
    "assemble_output",
    "format_plans",
    "PlanSummary",
    "plan_summary",
    "plan_recipe",
    "plan_output",
    "recipe_differences",
    "recycle",
    "run_index",
]


def recycle(
    config: RecipeConfig,
    *,
    token: str | bool | None = None,
    echo: Callable[[str], None] = log.info,
    tracking: TrackingOptions | None = None,
) -> Results | LeaveOneDomainOut | None:
    """Run the whole recipe: the results written to `<output>/soup/results.json`, or with
    `test_domain="all"` every held-out domain's results and their DomainBed table. `tracking` says where the
    probe, the runs and the soup are reported (TensorBoard, trackio, wandb, mlflow; none by default).

    Under `accelerate launch`, every process calls this: the main one plans, all of them train the runs
    between them (each run by one process) until every run is done, and the main one assembles and
    returns the results; the others return None.
    """
    output = Path(config.output)
    tracked = Tracking.of(tracking, output)
    worker = Worker.of_this_process()
    if worker.is_main:
        plan_output(config, token=token, echo=echo)
    worker.wait_for_everyone_then_part()
    plans = load_plans(output, token)
    jobs = [(plan, decode_target(plan, output, token)) for plan in plans]
    execute(jobs, output, echo, worker, tracked)
    return _assemble(jobs, output, echo, tracked) if worker.is_main else None


def plan_recipe(
    config: RecipeConfig, *, token: str | bool | None = None, echo: Callable[[str], None] = log.info
) -> list[RecipePlan]:
    """The recipe's plans (one per held-out domain), without training and without writing anything
    (`recycle --dry-run`)."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"output {output} exists and is not a folder")
    refuse_output_inside(output, config.target)
    check_same_recipe(output / "recipe.yaml", config)  # read only: refuse another recipe's folder before any work
    base, recycled, left_out = fetch_ingredients(config, token, echo)
    config = replace(config, **ingredient_pins(config, base, recycled))
    echo(f"[data] {config.target}")
    plans = []
    for domain in held_out_domains(config, base, token):
        domain_config = config if domain == config.test_domain else replace(config, test_domain=domain)
        spec = TargetPreparation(domain_config, base, token).spec()
        domains = ", ".join(terminal_safe(d) for d in spec.train_domains)
        echo(
            f"[data] {terminal_safe(spec.reference)}: train domains {domains}; held out: {terminal_safe(spec.test_domain)}"
        )
        plans.append(build_plan(domain_config, base, recycled, spec, trained_on, left_out))
    plans = [replace(plan, config=replace(plan.config, **target_pins(plan))) for plan in plans]
    warn_unrecycled(config, recycled, plans[0])
    for plan in plans:  # a soup folder holding someone's files is refused now, not after the training
        check_replaceable_soup(soup_folder(plans, plan, output))
    return plans


def warn_unrecycled(config: RecipeConfig, recycled: list[Ingredient], plan: RecipePlan) -> None:
    """Say when a recycling strategy recycles less than it was given: none at all (its runs all start from
    the base, as --strategy soup), or, where each run starts from one checkpoint, fine-tunes that start no run
    (ratatouille starts run k from the k-th)."""
    if not STRATEGIES[config.strategy].recycles:
        return
    if not recycled:
        why = (  # none recycled means no --aux: a Hub base was searched, a local one never is
            "no --aux given, and a local base is never searched on the Hub"
            if plan.base.is_local
            else "the Hub has no fine-tune of the base this recipe can use"
        )
        log.warning(
            f"[plan] warning: --strategy {config.strategy} recycles no fine-tune ({why}): every run starts from "
            "the base, as with --strategy soup"
        )
        return
    if any(isinstance(run.init, FusionSpec) for run in plan.runs):
        return  # a fusion draws one fine-tune per dataset at random: leaving some out is its design
    used = {run.init.reference for run in plan.runs}
    unused = [ingredient for ingredient in recycled if ingredient.reference not in used]
    if unused:
        names = ", ".join(terminal_safe(ingredient.source) for ingredient in unused)
        log.warning(
            f"[plan] warning: {len(unused)} of the {len(recycled)} recycled fine-tunes {'starts' if len(unused) == 1 else 'start'} "
            f"no run with --runs {config.runs}: {names}"
        )


def held_out_domains(config: RecipeConfig, base: Ingredient, token) -> list[str | None]:
    """`[config.test_domain]`, or for `all` every domain of the target in sorted order."""
    if config.test_domain != ALL_DOMAINS:
        return [config.test_domain]
    splits = TargetPreparation(replace(config, test_domain=None), base, token).splits
    return sorted([splits.test_domain, *(d.domain for d in splits.train_domains)])


def plan_output(
    config: RecipeConfig, *, token: str | bool | None = None, echo: Callable[[str], None] = log.info
) -> list[RecipePlan]:
    """Plan the recipe and save it in its output folder (recipe.yaml, plan.json), where `run_index` and
    `assemble_output` (any process, any machine that shares the folder) find it."""
    plans = plan_recipe(config, token=token, echo=echo)
    # the recipe with what it read pinned (--rediscover, once checked against the folder, is not saved)
    config = replace(plans[0].config, test_domain=config.test_domain, rediscover=config.rediscover)
    with claimed_output(Path(config.output), config):  # every input checked: only now is anything written
        save_plans(plans, Path(config.output))
    return plans


def decode_target(plan: RecipePlan, output: Path, token=None) -> Target:
    """The plan's target at the revision the plan pinned (never the Hub's current one: a commit pushed between
    `plan` and `run` must not change what an array task trains on), decoded into (or read from) the output
    folder's cache."""
    config = plan.config
    dataset, domain_column, label_column = resolve_dataset(config.target, config.domain_column, config.label_column)
    if "@" in plan.target.reference and split_revision(plan.target.reference)[0] == split_revision(dataset)[0]:
        config = replace(config, target=plan.target.reference, domain_column=domain_column, label_column=label_column)
    preparation = TargetPreparation(config, plan.base, token)
    if preparation.fingerprint != plan.target.fingerprint:
        raise RecipeError(
            f"the target {plan.target.reference} is not the one planned (its rows or preprocessing changed); "
            "plan again into another --output"
        )
    return preparation.decode(cache=output / "cache")


def run_index(
    output: Path,
    index: int,
    *,
    token: str | bool | None = None,
    echo: Callable[[str], None] = log.info,
    tracking: TrackingOptions | None = None,
) -> Path:
    """Train run `index` of the plans saved in `output` (a scheduler's array task): at once done if it is
    done; waits for it if another process holds it (and trains it if that process dies first). `tracking`
    says where it (and the probe, if this task trains it) is reported."""
    tracked = Tracking.of(tracking, output)
    work = indexed_runs(load_plans(output, token))
    if not 0 <= index < len(work):
        raise RecipeError(f"--index {index}: the plan in {output} has runs 0 to {len(work) - 1}")
    return train_run(output, *work[index], token=token, echo=echo, tracking=tracked)


def train_run(
    output: Path,
    plan: RecipePlan,
    spec,
    *,
    token=None,
    echo: Callable[[str], None] = log.info,
    tracking: Tracking = UNTRACKED,
) -> Path:
    """Train one run of `plan` into `output` unless it is done; waits for it if another process holds it
    (and trains it if that process dies first). What `run --index` and `sweep --index` do."""
    executor = RunExecutor(plan.config.precision, output, echo, tracking=tracking)
    executor.run_all([(plan, spec, decode_target(plan, output, token))])
    return output / spec.folder


def assemble_output(
    output: Path,
    *,
    token: str | bool | None = None,
    echo: Callable[[str], None] = log.info,
    tracking: TrackingOptions | None = None,
) -> Results | LeaveOneDomainOut:
    """Build the soup(s) of the plans saved in `output` from their finished runs; refuses, naming them,
    while some runs are missing. `tracking` says where the soups' scores are reported."""
    tracked = Tracking.of(tracking, output)
    plans = load_plans(output, token)
    work = indexed_runs(plans)
    missing = [i for i, (plan, spec) in enumerate(work) if not plan.is_done(output, spec)]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise RecipeError(
            f"{len(missing)} of {len(work)} runs in {output} are not done (indices: {shown}); "
            f"train them with: ratatouille-hub run {output} --index I"
        )
    return _assemble([(plan, decode_target(plan, output, token)) for plan in plans], output, echo, tracked)


def indexed_runs(plans: list[RecipePlan]) -> list:
    """(plan, run) pairs in `run --index` order: the plans' runs one after the other."""
    return [(plan, spec) for plan in plans for spec in plan.runs]


def soup_folder(plans: list[RecipePlan], plan: RecipePlan, output: Path) -> Path:
    """`soup/` for one held-out domain; `soups/<domain>/` for each, with several (a safe name for it)."""
    return output / "soup" if len(plans) == 1 else output / soup_subfolder(plan.target.test_domain)


def _assemble(
    jobs: list[tuple[RecipePlan, Target]], output: Path, echo, tracking: Tracking = UNTRACKED
) -> Results | LeaveOneDomainOut:
    plans = [plan for plan, _ in jobs]
    per_domain = {}
    for plan, target in jobs:
        folder = soup_folder(plans, plan, output)
        per_domain[plan.target.test_domain] = assemble(plan, output, target, echo, folder, tracking)
    if len(plans) == 1:
        return per_domain[plans[0].target.test_domain]
    table = LeaveOneDomainOut(per_domain)
    table.save(output / "results.json")
    return table


def fetch_ingredients(
    config: RecipeConfig, token, echo
) -> tuple[Ingredient, list[Ingredient], tuple[tuple[str, str], ...]]:
    """The base, the vetted fine-tunes to recycle (each pinned to the revision seen now), and the discovered
    fine-tunes left out with why. A discovered fine-tune that fails fetching or vetting is refused in the log
    and left out (anyone can tag a repo with the base); one the user named with --aux fails the recipe."""
    echo(f"[fetch] base {terminal_safe(config.base)}")
    base = resolve_model(config.base, token=token)
    refuse_unbuildable(base.path, base.source)  # once, at planning: every process trusts the plan's base after
    refuse_untakeable_size(base, config.image_size)  # now, not once the linear probe meets it
    if note := precision_note(base.path):
        echo(f"[fetch] {note}")
    discovered = discovers(config)
    recycled = []
    sources, left_out = recycled_sources(config, token, echo)
    named: dict[str, str] = {}  # a fine-tune's identity -> the name it was first given by
    for source in sources:
        try:
            ingredient = resolve_model(source, token=token)
        except FetchError as error:
            if not discovered:
                raise
            log.warning(f"[fetch] refused: {terminal_safe(str(error))}")
            left_out.append((source, f"refused: {error}"))
            continue
        identity = str(ingredient.path.resolve()) if ingredient.is_local else ingredient.reference  # one folder
        if identity in named:  # it would start two runs and count twice in the soup, unannounced
            raise RecipeError(
                f"--aux names one fine-tune twice: {named[identity]} and {source} ({ingredient.revision}); "
                "name each fine-tune once"
            )
        named[identity] = source
        echo(f"[fetch] recycled {terminal_safe(ingredient.reference)}")
        recycled.append(ingredient)
    refused = []

    def refuse(ingredient: Ingredient, error: Exception) -> None:
        log.warning(f"[vet] refused: {terminal_safe(str(error))}")
        refused.append(ingredient)
        left_out.append((ingredient.reference, f"refused: {error}"))

    for vetted in vet_ingredients(base, recycled, refuse if discovered else None):
        echo(f"[vet] {terminal_safe(vetted.describe())}")
        for warning in vetted.warnings:
            log.warning(f"[vet]   warning: {warning}; runs from it may not average with the others")
    for ingredient in (i for i in recycled if i not in refused):  # headers vetted: does its config fit them?
        try:
            refuse_unbuildable(ingredient.path, ingredient.source)  # now, not once a run loads it
        except ArchitectureError as error:
            if not discovered:
                raise
            refuse(ingredient, error)
    recycled = [ingredient for ingredient in recycled if ingredient not in refused]
    if STRATEGIES[config.strategy].needs_recycled and not recycled:
        raise RecipeError(
            f"--strategy {config.strategy} needs recycled fine-tunes (--aux, or a Hub base to discover them)"
        )
    return base, recycled, tuple(left_out)


def recycled_sources(config: RecipeConfig, token, echo) -> tuple[list[str], list[tuple[str, str]]]:
    """The --aux list, or (Hub base, no --aux) the fine-tunes discovery accepts, pinned as id@sha; and the
    candidates it did not accept, with why (the plan records them). A fine-tune the Hub did not answer about
    is named in a warning: the soup must not silently be another."""
    if not STRATEGIES[config.strategy].recycles:
        return [], []
    base = split_revision(config.base)[0]  # fine-tunes name the base without a revision; vetting uses the pin
    if not discovers(config):
        return list(config.aux or config.discovered), []
    echo(f"[discover] fine-tunes of {base} on the Hub")
    target_id = split_revision(resolve_dataset(config.target, config.domain_column, config.label_column)[0])[0]
    candidates = discover_finetunes(base, target=target_id, limit=config.aux_limit, token=token)
    echo(format_candidates(candidates))
    for unread in (c for c in candidates if not c.readable):
        log.warning(
            f"[discover] warning: {unread.repo_id} could not be read ({unread.reason}); this recipe recycles the "
            "others only: rerun it to judge that one too"
        )
    left_out = [(f"{c.repo_id}@{c.revision}", f"{c.verdict}: {c.reason}") for c in candidates if not c.accepted]
    return [f"{c.repo_id}@{c.revision}" for c in candidates if c.accepted], left_out


def discovers(config: RecipeConfig) -> bool:
    """Whether this recipe asks the Hub for the base's fine-tunes: a Hub base, no --aux, and no list a
    previous plan froze (unless --rediscover). A frozen list is replayed as if named: one that fails fails."""
    if config.aux or not is_hub_id(split_revision(config.base)[0]):
        return False
    return config.rediscover or not config.discovered


def ingredient_pins(config: RecipeConfig, base: Ingredient, recycled: list[Ingredient]) -> dict:
    """The recipe's ingredients as the plan pinned them: a Hub base and every Hub fine-tune at its commit
    sha, and the fine-tunes discovery chose frozen, so a replay of the saved recipe trains the same runs
    whatever was pushed since."""

    def pinned(ingredient: Ingredient, named: str) -> str:
        return named if ingredient.is_local else ingredient.reference

    chosen = tuple(ingredient.reference for ingredient in recycled)
    fetched = dict(zip(config.aux, recycled))  # empty for a strategy that recycles nothing: --aux kept as typed
    return {
        "base": pinned(base, config.base),
        "aux": tuple(pinned(fetched[named], named) if named in fetched else named for named in config.aux),
        "discovered": () if config.aux else chosen,
        "rediscover": False,
    }


def target_pins(plan: RecipePlan) -> dict:
    """The target as the plan read it: a Hub dataset (or an alias of one) at its commit sha, with the columns
    the alias stands for."""
    config = plan.config
    dataset, domain_column, label_column = resolve_dataset(config.target, config.domain_column, config.label_column)
    if not is_hub_id(split_revision(dataset)[0]):
        return {}
    return {"target": plan.target.reference, "domain_column": domain_column, "label_column": label_column}


def trained_on(ingredient: Ingredient) -> str:
    """The dataset(s) a fine-tune's card names (its own reference when it names none): fusing groups by it."""
    from huggingface_hub import ModelCard

    card = ingredient.path / "README.md"
    try:
        datasets = ModelCard.load(card).data.datasets if card.is_file() else None
    except Exception:  # a card we cannot parse names no dataset
        datasets = None
    if isinstance(datasets, str):
        datasets = [datasets]
    return ",".join(sorted(str(d) for d in datasets)) if datasets else ingredient.reference


@contextmanager
def claimed_output(output: Path, config: RecipeConfig):
    """Hold the output folder's recipe for the block, after checking it is this recipe, and save
    recipe.yaml. Taken only once every input has been checked, so a command that fails on bad input leaves
    the output folder as it found it. Held only while the plan is written: runs are claimed one by one."""
    output.mkdir(parents=True, exist_ok=True)
    with claimed_folder(output / "recipe.yaml", wait=True):
        check_same_recipe(output / "recipe.yaml", config)
        sweep_staging(output, only=PLAN_FILE)
        replace(config, rediscover=False).save_yaml(output / "recipe.yaml")
        yield


# A changed value of these keeps every finished run valid (a run's folder is named after its own
# init, so strategy and aux only choose which runs exist; base_model and license only what the card
# says; the cache budget only whether the same pixels come from the cache or from the files); any
# other change is another recipe. What discovery chose changes only by --rediscover: a Hub that
# changed under a rerun is said, never followed.
REUSABLE_CHANGES = frozenset(
    {
        "runs",
        "method",
        "bn_policy",
        "output",
        "strategy",
        "aux",
        "aux_limit",
        "rediscover",
        "base_model",
        "license",
        "cache_budget_gb",
    }
)
PINNED = ("base", "target")  # saved as id@sha: a command naming them without a revision means the same ones
PINNED_FIELDS = ("base", "target", "domain_column", "label_column", "aux", "discovered")  # what a plan pins


def check_same_recipe(saved: Path, config: RecipeConfig) -> None:
    """Refuse an output folder that holds another recipe's runs (mixing them would mislead), naming each
    difference. A folder whose recipe finished nothing and trains nothing now (a command that failed after
    planning, say on an image that does not decode) is no one's work: the corrected command takes it over."""
    if not saved.exists():
        return
    previous = RecipeConfig.load_yaml(saved)
    changed = recipe_differences(previous, config)
    if changed and holds_work(saved.parent):
        raise RecipeError(
            f"{saved.parent} holds the runs of another recipe (differs in: {'; '.join(changed)}); replay it exactly with "
            f"--config {saved}, or use another --output"
            + ("; --rediscover plans the fine-tunes the Hub lists now into it" if "discovered" in changed[0] else "")
        )


def recipe_differences(
    previous: RecipeConfig, config: RecipeConfig, reusable: frozenset[str] = REUSABLE_CHANGES
) -> list[str]:
    """`name: before -> now` for each option that makes `config` another recipe than `previous` (a pinned
    base or target matches the same id named without a revision; the discovered list is compared only once
    both recipes have discovered, and not under --rediscover or --aux); a change of a `reusable` option is
    none."""
    before, now = previous.to_dict(), config.to_dict()
    skip = set(reusable)
    unplanned = not config.discovered or not previous.discovered  # either side has not discovered (yet)
    if unplanned or config.rediscover or config.aux or not discovers(replace(config, discovered=())):
        skip.add("discovered")
    changed = []
    for name, value in now.items():
        old = before.get(name)
        if name in skip or old == value or (name in PINNED and _same_unpinned(name, old, value, config)):
            continue
        if name == "discovered":
            added = [terminal_safe(v) for v in value if v not in old]
            gone = [terminal_safe(v) for v in old if v not in value]
            changed.insert(0, f"discovered fine-tunes: + {', '.join(added) or 'none'}; - {', '.join(gone) or 'none'}")
        else:
            changed.append(f"{name}: {terminal_safe(str(old))} -> {terminal_safe(str(value))}")
    return changed


def _same_unpinned(name: str, old, value, config: RecipeConfig) -> bool:
    """Whether a base or target named with and without a revision (an alias: by the dataset it stands for)
    is the same one."""

    def identity(reference: str) -> tuple[str, str | None]:
        if name == "target":
            reference = resolve_dataset(reference, config.domain_column, config.label_column)[0]
        return split_revision(reference)

    (old_id, old_revision), (new_id, new_revision) = identity(str(old)), identity(str(value))
    return old_id == new_id and (old_revision is None or new_revision is None)


WORK_FOLDERS = ("lp", "inits", "runs")  # what a plan's execution makes, each entry claimed while it is made


def holds_work(output: Path) -> bool:
    """Whether `output` holds a finished run or soup of its recipe, or an artefact a live process is making
    now (its claim is held). A finished probe or fusion is not the recipe's own: it is named by its content
    and serves any recipe that needs the same one."""
    finished = (RunRecord(folder).is_done for folder in (output / "runs").glob("*"))
    if (output / "soup").exists() or (output / "soups").exists() or any(finished):
        return True
    return any(claim_is_held(lock) for kind in WORK_FOLDERS for lock in (output / kind).glob(".*.lock"))
