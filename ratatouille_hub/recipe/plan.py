"""The plan of a recipe: the shared linear probe and one frozen spec per run, made before anything trains.

A spec carries everything that decides its run (init checkpoint at its revision, hyperparameters, seeds,
steps, warm-up) and the key its folder is named by, so a plan can be printed (`--dry-run`), checked against
an output folder (done or pending) and handed to any executor. Building a plan reads configs, cards and the
target's columns; it never decodes an image or loads a weight.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..artifacts import Artifact
from ..config import RecipeConfig, RunHParams, draw_hparams
from ..errors import RatatouilleError, RecipeError
from ..evaluation import INFERENCE_BATCH, inference_batch
from ..fetch import Ingredient, resolve_model
from ..hashing import check_content_key, stable_hash
from ..io import atomic_write_json
from ..safe_text import terminal_safe
from ..strategies import STRATEGIES, FusionSpec, Init, InitContext, Strategy
from ..target import TargetSpec


@dataclass(frozen=True)
class LPSpec:
    """The linear probe every run starts from: trained once on the frozen base."""

    steps: int
    lr: float
    batch_size: int
    eval_every: int
    seed: int
    key: str

    def __post_init__(self) -> None:
        check_content_key(self.key)

    @property
    def folder(self) -> str:
        return f"lp/{self.key}"


@dataclass(frozen=True)
class RunSpec:
    """One target fine-tune, fully determined: two runs with the same key are the same run."""

    index: int
    total: int
    init: Init
    recycled: bool  # starts from another checkpoint than the base: its head warms up first
    hparams: RunHParams
    steps: int
    warmup_steps: int
    eval_every: int
    batch_size: int
    augment: bool
    micro_batch: int | None  # images per forward/backward pass (None: the whole step)
    precision: str
    seed: int  # the trial seed; randomness depends on (seed, index) only, never on where the init lives
    key: str

    def __post_init__(self) -> None:
        check_content_key(self.key)

    @property
    def folder(self) -> str:
        return f"runs/{self.key}"

    @property
    def label(self) -> str:
        return f"run {self.index} of {self.total}"  # numbered from 0, as `run --index`, tables and cards number runs

    @property
    def run_seed(self) -> str:
        return f"{self.seed}:{self.index}"


@dataclass(frozen=True)
class RecipePlan:
    config: RecipeConfig
    strategy: Strategy
    base: Ingredient
    recycled: tuple[Ingredient, ...]  # the vetted fine-tunes the strategy was offered
    target: TargetSpec
    lp: LPSpec
    runs: tuple[RunSpec, ...]
    left_out: tuple[tuple[str, str], ...] = ()  # discovered fine-tunes not recycled: (id@sha, why)

    @property
    def ingredients(self) -> list[Ingredient]:
        """The base and every recycled checkpoint some run starts from (directly or in a fusion)."""
        used = {member for spec in self.runs for member in members_of(spec.init)}
        return [self.base, *(i for i in self.recycled if i in used)]

    def is_done(self, output: Path, spec: RunSpec | LPSpec) -> bool:
        return Artifact(output / spec.folder).is_done

    def missing(self, output: Path) -> list[RunSpec]:
        return [spec for spec in self.runs if not self.is_done(output, spec)]


def members_of(init: Init) -> tuple[Ingredient, ...]:
    return init.members if isinstance(init, FusionSpec) else (init,)


def build_plan(
    config: RecipeConfig,
    base: Ingredient,
    recycled: list[Ingredient],
    target: TargetSpec,
    datasets_of,
    left_out: tuple[tuple[str, str], ...] = (),
) -> RecipePlan:
    """Every spec of the recipe; `datasets_of(ingredient)` names the dataset a fine-tune was trained on;
    `left_out` records the discovered fine-tunes not recycled, so a replay can tell why its soup differs."""
    strategy = STRATEGIES[config.strategy]
    feature_passes = inference_batch(config.micro_batch)
    lp_key = stable_hash(
        {
            "base": base.revision,
            "data": target.fingerprint,
            "steps": config.lp_steps,
            "lr": config.lp_lr,
            "batch": config.batch_size,
            "eval_every": config.eval_every,
            "seed": config.seed,
            # features computed in smaller passes may round differently; the default's probes keep their key
            **({"feature_passes": feature_passes} if feature_passes != INFERENCE_BATCH else {}),
        }
    )
    lp = LPSpec(config.lp_steps, config.lp_lr, config.batch_size, config.eval_every, config.seed, lp_key)
    context = InitContext(config.runs, config.seed, base, tuple(recycled), datasets_of, target.id2label)
    runs = tuple(
        _run_spec(config, index, init, base, lp_key, target) for index, init in enumerate(strategy.inits(context))
    )
    return RecipePlan(config, strategy, base, tuple(recycled), target, lp, runs, tuple(left_out))


def _run_spec(config: RecipeConfig, index: int, init: Init, base: Ingredient, lp_key: str, target) -> RunSpec:
    hparams = draw_hparams(config, index)
    recycled = init.revision != base.revision
    warmup = config.warmup_steps if recycled else 0
    step = config.batch_size * len(target.train_domains)
    micro_batch = config.micro_batch if 0 < config.micro_batch < step else None  # else one pass: the same bytes
    key = stable_hash(
        {
            "init": init.revision,
            "head": lp_key,
            "data": target.fingerprint,
            "hparams": asdict(hparams),
            "seed": [config.seed, index],
            "steps": config.steps,
            "warmup": warmup,
            "eval_every": config.eval_every,
            "batch": config.batch_size,
            "augment": config.augment,
            "precision": config.precision,
            # split passes round differently, so they are part of the key; whole-step runs keep theirs
            **({"micro_batch": micro_batch} if micro_batch else {}),
        }
    )
    return RunSpec(
        index=index,
        total=config.runs,
        init=init,
        recycled=recycled,
        hparams=hparams,
        steps=config.steps,
        warmup_steps=warmup,
        eval_every=config.eval_every,
        batch_size=config.batch_size,
        augment=config.augment,
        micro_batch=micro_batch,
        precision=config.precision,
        seed=config.seed,
        key=key,
    )


# -- what a plan costs, and how it reads ------------------------------------------------------------


def run_work(spec: RunSpec, target: TargetSpec) -> tuple[int, int]:
    """(images trained on, images evaluated) by one run: its steps over every training domain, then
    validation at each evaluation and the final predictions on validation and the test domain."""
    trained = (spec.warmup_steps + spec.steps) * spec.batch_size * len(target.train_domains)
    evaluations = spec.steps // spec.eval_every + (1 if spec.steps % spec.eval_every else 0)
    return trained, (evaluations + 1) * target.val_size + target.test_size


def describe_init(init: Init) -> str:
    if isinstance(init, FusionSpec):
        return "fusion of " + " + ".join(f"{w:.2f} x {m.source}" for m, w in zip(init.members, init.weights))
    return init.reference


@dataclass(frozen=True)
class PlannedRun:
    """One run as the dry run reports it."""

    index: int  # as `run --index` numbers it: across every plan of the output folder
    done: bool
    init: str  # the checkpoint it starts from, at its revision (or the fusion of several)
    hparams: RunHParams
    steps: int
    warmup_steps: int  # head-only steps before the fine-tune (a recycled init)
    train_images: int
    eval_images: int
    folder: str  # relative to the output folder


@dataclass(frozen=True)
class ProbeStatus:
    folder: str
    done: bool
    steps: int
    images: int  # whose features it trains and selects on


@dataclass(frozen=True)
class PlanReport:
    """One held-out domain's plan: what `plan` and `recycle --dry-run` print, read off the output folder."""

    strategy: str
    target: str  # id@sha for a Hub dataset, else the path
    train_domains: tuple[str, ...]
    test_domain: str
    image_size: int
    linear_probe: ProbeStatus
    runs: tuple[PlannedRun, ...]
    left_out: tuple[tuple[str, str], ...]  # discovered fine-tunes not recycled: (id@sha, why)


@dataclass(frozen=True)
class PlanSummary:
    output: Path
    plans: tuple[PlanReport, ...]  # one per held-out domain


def plan_summary(plans: list[RecipePlan], output: Path) -> PlanSummary:
    """The plans as the dry run reports them: every run numbered as `run --index` numbers it, done or pending
    in `output`, and what it costs."""
    reports, first = [], 0
    for plan in plans:
        target = plan.target
        runs = []
        for spec in plan.runs:
            trained, evaluated = run_work(spec, target)
            runs.append(
                PlannedRun(
                    index=first + spec.index,
                    done=plan.is_done(output, spec),
                    init=describe_init(spec.init),
                    hparams=spec.hparams,
                    steps=spec.steps,
                    warmup_steps=spec.warmup_steps,
                    train_images=trained,
                    eval_images=evaluated,
                    folder=spec.folder,
                )
            )
        probe = ProbeStatus(
            plan.lp.folder, plan.is_done(output, plan.lp), plan.lp.steps, sum(target.train_sizes) + target.val_size
        )
        reports.append(
            PlanReport(
                plan.strategy.name,
                target.reference,
                tuple(target.train_domains),
                target.test_domain,
                target.image_size,
                probe,
                tuple(runs),
                plan.left_out,
            )
        )
        first += len(plan.runs)
    return PlanSummary(output, tuple(reports))


def format_plans(summary: PlanSummary) -> str:
    """The dry run: every plan's runs, numbered as `run --index` numbers them, and what is pending."""
    parts = [format_plan(report, summary.output) for report in summary.plans]
    if len(summary.plans) > 1:
        runs = [run for report in summary.plans for run in report.runs]
        pending = sum(not run.done for run in runs)
        parts.append(f"in all: {pending} of {len(runs)} runs pending over {len(summary.plans)} held-out domains")
    return "\n\n".join(parts)


def format_plan(report: PlanReport, output: Path) -> str:
    """One plan: every run, its init and hparams, done or pending, and its cost."""
    train = ", ".join(terminal_safe(d) for d in report.train_domains)  # the dataset's names: one line each
    probe = report.linear_probe
    lines = [
        f"plan: {len(report.runs)} runs, strategy {report.strategy}, on {terminal_safe(report.target)} "
        f"(train: {train}; held out: {terminal_safe(report.test_domain)}; {report.image_size} px)",
        f"output: {output}",
        f"linear probe {probe.folder}: {'done' if probe.done else 'pending'}, "
        f"{probe.steps} steps on features of {probe.images} images",
        "",
        f"{'run':>4}  {'status':<7}  {'lr':>8}  {'wd':>8}  {'dropout':>7}  {'steps':>11}  "
        f"{'train imgs':>10}  {'eval imgs':>9}  folder / init",
    ]
    for run in report.runs:
        steps = f"{run.steps}" + (f"+{run.warmup_steps}" if run.warmup_steps else "")
        lines.append(
            f"{run.index:>4}  {'done' if run.done else 'pending':<7}  {run.hparams.lr:>8g}  "
            f"{run.hparams.weight_decay:>8g}  {run.hparams.dropout:>7g}  {steps:>11}  {run.train_images:>10}  "
            f"{run.eval_images:>9}  {run.folder}  from {run.init}"
        )
    if report.left_out:
        lines += ["", *(f"left out: {reference} ({terminal_safe(why)})" for reference, why in report.left_out)]
    pending = [run for run in report.runs if not run.done]
    lines += [
        "",
        f"pending: {len(pending)} of {len(report.runs)} runs, {sum(run.train_images for run in pending)} images to "
        f"train on and {sum(run.eval_images for run in pending)} to evaluate (steps: fine-tune + head warm-up)",
    ]
    return "\n".join(lines)


# -- a plan on disk: what `plan` saves and `run` / `assemble` (or any other process) execute ---------

PLAN_FILE = "plan.json"


def save_plans(plans: list[RecipePlan], output: Path) -> None:
    """Write the plans to `<output>/plan.json`, so every process executes the same runs from the same
    pinned ingredients, without discovering or vetting again."""
    atomic_write_json(output / PLAN_FILE, {"version": 1, "plans": [_plan_to_dict(plan) for plan in plans]})


def load_plans(output: Path, token=None) -> list[RecipePlan]:
    """The plans `save_plans` wrote; an ingredient whose cached path this machine lacks is fetched again at
    its pinned revision. A file that is not such a plan is refused naming it, before anything runs."""
    path = output / PLAN_FILE
    if not path.is_file():
        raise RecipeError(
            f"{output} holds no plan ({PLAN_FILE}); make one with: ratatouille-hub plan ... --output {output}"
        )
    located: dict[tuple[str, str], Ingredient] = {}

    def ingredient(data: dict) -> Ingredient:
        key = (data["source"], data["revision"])
        if key not in located:
            found = Ingredient(data["source"], data["revision"], Path(data["path"]))
            if not found.path.is_dir():
                found = resolve_model(found.source, None if found.is_local else found.revision, token=token)
            located[key] = found
        return located[key]

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        plans = [_plan_from_dict(data, ingredient) for data in saved["plans"]]
    except RatatouilleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSON, shape or field types
        problem = f"{type(error).__name__}: {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise RecipeError(
            f"{path}: not a plan written by ratatouille-hub ({problem}); plan again with: ratatouille-hub plan ..."
        ) from None
    return plans


def _ingredient_to_dict(ingredient: Ingredient) -> dict:
    return {"source": ingredient.source, "revision": ingredient.revision, "path": str(ingredient.path)}


def _init_to_dict(init: Init) -> dict:
    if isinstance(init, FusionSpec):
        return {
            "fusion": {
                "members": [_ingredient_to_dict(m) for m in init.members],
                "weights": list(init.weights),
                "head_seed": init.head_seed,
                "key": init.key,
            }
        }
    return _ingredient_to_dict(init)


def _plan_to_dict(plan: RecipePlan) -> dict:
    target = asdict(plan.target)
    target["id2label"] = {str(k): v for k, v in plan.target.id2label.items()}
    runs = []
    for spec in plan.runs:
        run = {f.name: getattr(spec, f.name) for f in fields(RunSpec)}
        run.update(init=_init_to_dict(spec.init), hparams=asdict(spec.hparams))
        runs.append(run)
    return {
        "config": plan.config.to_dict(),
        "strategy": plan.strategy.name,
        "base": _ingredient_to_dict(plan.base),
        "recycled": [_ingredient_to_dict(i) for i in plan.recycled],
        "target": target,
        "lp": asdict(plan.lp),
        "runs": runs,
        "left_out": [list(entry) for entry in plan.left_out],
    }


def _plan_from_dict(data: dict, ingredient) -> RecipePlan:
    target = dict(data["target"])
    target["id2label"] = {int(k): v for k, v in target["id2label"].items()}
    for name in ("train_domains", "train_sizes"):
        target[name] = tuple(target[name])

    def init(saved: dict) -> Init:
        if "fusion" not in saved:
            return ingredient(saved)
        fusion = saved["fusion"]
        members = tuple(ingredient(m) for m in fusion["members"])
        return FusionSpec(members, tuple(fusion["weights"]), fusion["head_seed"], fusion["key"])

    runs = tuple(
        # micro_batch: None in plans saved before --micro-batch existed (they split no step)
        RunSpec(**{"micro_batch": None, **run, "init": init(run["init"]), "hparams": RunHParams(**run["hparams"])})
        for run in data["runs"]
    )
    return RecipePlan(
        config=RecipeConfig.from_dict(data["config"]),
        strategy=STRATEGIES[data["strategy"]],
        base=ingredient(data["base"]),
        recycled=tuple(ingredient(i) for i in data["recycled"]),
        target=TargetSpec(**target),
        lp=LPSpec(**data["lp"]),
        runs=runs,
        left_out=tuple((str(reference), str(why)) for reference, why in data.get("left_out", ())),
    )
