"""A sweep: DomainBed's unit of evidence, trials x strategies x held-out domains, as one resumable command.

    ratatouille-hub sweep --base B --target T --strategy erm ratatouille --trials 3 --output S

Each cell (trial seed, strategy) is an ordinary recipe plan with `--test-domain all` (one plan per held-out
domain). The cells of a trial share one recipe output folder, so a run two strategies have in common (the
same init, hyperparameters and seed: every run from the base of erm and soup, run 0 of ratatouille) is
trained once, exactly as when `recycle` is run once per strategy into the same --output.

    S/
      sweep.yaml                       the SweepConfig, replayable with --config
      results.json                     the table (below): a function of the runs' predictions only
      cost.json                        what the runs cost, as their folders recorded it (measured)
      trial-<seed>/                    the trial's recipe output: cache/, lp/, inits/, runs/<key>/
        strategies/<strategy>/         plan.json (one plan per held-out domain), soups/<domain>/

Spread it like the recipe: `accelerate launch ... sweep` (every process trains runs of every cell), or
`sweep --plan-only`, then `sweep --config S/sweep.yaml --index I` for every I of the flat run list (each
distinct run once), then `sweep --config S/sweep.yaml --assemble`. Rerunning `sweep` trains only what is
missing and assembles only the cells whose soups are missing or stale.

results.json:
    {"trials": [seed, ...], "test_domains": [domain, ...], "strategies": [name, ...],
     "rows": {"<strategy>: <row>": {                 rows as `--test-domain all` names them
         "strategy": name, "row": "soup, uniform" | "best single run (by validation)" | ...,
         "test_accuracy": {"<domain>" | "average": {"mean": m, "stderr": s, "per_trial": [a, ...]}}}}}
    per_trial: held-out accuracy of each trial, in `trials` order; `average` is, per trial, the sum of its
    domains' accuracies divided by their number; mean = statistics.fmean(per_trial), stderr =
    statistics.stdev(per_trial) / sqrt(trials), null with one trial.
cost.json:
    {"<strategy>": {"runs": runs per trial (over every held-out domain), "run_seconds": {mean, stderr,
     per_trial}, "linear_probe_seconds": {mean, stderr, per_trial}}}
    a run two strategies share is counted in full for each.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .artifacts import ProbeRecord, RunRecord, SoupFolder
from .config import RecipeConfig, SweepConfig, TrackingOptions
from .errors import RecipeError
from .io import atomic_write_json, claimed_folder
from .recipe import PINNED_FIELDS, REUSABLE_CHANGES, decode_target, plan_recipe, recipe_differences, train_run
from .recipe.assembly import assemble, check_replaceable_soup
from .recipe.executor import Worker, execute
from .recipe.plan import RecipePlan, RunSpec, load_plans, save_plans
from .results import LeaveOneDomainOut, Results, soup_subfolder
from .safe_text import path_component, terminal_safe
from .strategies import STRATEGIES
from .tracking import UNTRACKED, Tracking

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.yaml"
RESULTS_FILE = "results.json"
COST_FILE = "cost.json"
SWEEP_CHANGES = REUSABLE_CHANGES | {"trials", "seed"}  # each trial has its own folder, named by its seed


@dataclass(frozen=True)
class Cell:
    """One trial seed and strategy: its plans live in `folder`, its runs in the trial's `work` folder."""

    seed: int
    strategy: str
    work: Path
    folder: Path


def cells_of(config: SweepConfig) -> list[Cell]:
    """Every (trial, strategy) of the sweep, trial by trial, in the order the flat run list follows."""
    output = Path(config.output)
    cells = []
    for seed in range(config.seed, config.seed + config.trials):
        work = output / f"trial-{seed}"
        cells += [Cell(seed, name, work, work / "strategies" / path_component(name)) for name in config.strategy]
    return cells


def cell_recipe(config: SweepConfig, cell: Cell) -> RecipeConfig:
    """The recipe of one cell: the sweep's options with its strategy and seed, into the trial's folder."""
    values = {k: v for k, v in config.to_dict().items() if k != "trials"}
    return RecipeConfig.from_dict(values | {"strategy": cell.strategy, "seed": cell.seed, "output": str(cell.work)})


def plan_sweep(
    config: SweepConfig,
    *,
    token: str | bool | None = None,
    echo: Callable[[str], None] = log.info,
    per_cell: Callable[[RecipeConfig], RecipeConfig] | None = None,
) -> list[tuple[Cell, list[RecipePlan]]]:
    """Plan every cell and save the plans (no training). `per_cell` may change each cell's recipe before it
    is planned (benchmarks/pacs.py draws the fine-tunes each trial recycles)."""
    output = Path(config.output)
    check_same_sweep(output, config)
    planned = []
    for cell in cells_of(config):
        recipe = cell_recipe(config, cell)
        if per_cell is not None:
            recipe = per_cell(recipe)
        echo(f"[sweep] trial {cell.seed}, strategy {cell.strategy}")
        plans = plan_recipe(recipe, token=token, echo=echo)
        for plan in plans:  # a soup folder holding someone's files is refused now, not after the training
            check_replaceable_soup(cell.folder / soup_subfolder(plan.target.test_domain))
        planned.append((cell, plans))
    if per_cell is None:  # the sweep.yaml a replay reads pins what every cell's plan read
        config = pinned_sweep(config, [plans[0].config for _, plans in planned])
    with claimed_sweep(output, config):  # every cell planned: only now is anything written
        for cell, plans in planned:
            cell.folder.mkdir(parents=True, exist_ok=True)
            save_plans(plans, cell.folder)
    return planned


def pinned_sweep(config: SweepConfig, recipes: list[RecipeConfig]) -> SweepConfig:
    """`config` with the base, target and fine-tunes at the commits its cells' plans read (all the same ones:
    a Hub that moved while the sweep was planned is said, never mixed into one table)."""
    recycling = [recipe for recipe in recipes if STRATEGIES[recipe.strategy].recycles] or recipes  # they fetch aux
    pins = {tuple(getattr(recipe, name) for name in PINNED_FIELDS) for recipe in recycling}
    if len(pins) > 1:
        raise RecipeError("the Hub changed while the sweep was planned (its cells read other commits); plan it again")
    return config.replace(**dict(zip(PINNED_FIELDS, pins.pop())))


def check_same_sweep(output: Path, config: SweepConfig) -> None:
    """Refuse a folder holding another sweep (other data, steps, ...): its tables would mix two protocols."""
    saved = output / SWEEP_FILE
    if not saved.exists():
        return
    changed = recipe_differences(SweepConfig.load_yaml(saved), config, SWEEP_CHANGES)
    if changed:
        raise RecipeError(
            f"{output} holds another sweep (differs in: {'; '.join(changed)}); use another --output, or replay it "
            f"with --config {saved}"
        )


@contextmanager
def claimed_sweep(output: Path, config: SweepConfig):
    output.mkdir(parents=True, exist_ok=True)
    with claimed_folder(output / SWEEP_FILE, wait=True):
        check_same_sweep(output, config)
        config.replace(rediscover=False).save_yaml(output / SWEEP_FILE)  # --rediscover is a choice, not a recipe
        yield


def load_sweep(output: Path, token=None) -> list[tuple[Cell, list[RecipePlan]]]:
    """The cells of the sweep saved in `output` and their saved plans (what every process executes)."""
    if not (output / SWEEP_FILE).is_file():
        raise RecipeError(f"{output} holds no sweep ({SWEEP_FILE}); make one with: ratatouille-hub sweep --plan-only")
    return [(cell, load_plans(cell.folder, token)) for cell in cells_of(SweepConfig.load_yaml(output / SWEEP_FILE))]


def flat_runs(loaded: list[tuple[Cell, list[RecipePlan]]]) -> list[tuple[Path, RecipePlan, RunSpec]]:
    """(trial folder, plan, run) of every distinct run, in `sweep --index` order: a run shared by several
    strategies of a trial is listed once, where it first appears."""
    seen, runs = set(), []
    for cell, plans in loaded:
        for plan in plans:
            for spec in plan.runs:
                if (cell.work, spec.key) not in seen:
                    seen.add((cell.work, spec.key))
                    runs.append((cell.work, plan, spec))
    return runs


def run_sweep_index(
    output: Path,
    index: int,
    *,
    token=None,
    echo: Callable[[str], None] = log.info,
    tracking: TrackingOptions | None = None,
) -> Path:
    """Train run `index` of the sweep's flat run list (a scheduler's array task); idempotent. `tracking` says
    where it is reported, in the sweep's project."""
    tracked = Tracking.of(tracking, output)
    runs = flat_runs(load_sweep(output, token))
    if not 0 <= index < len(runs):
        raise RecipeError(f"--index {index}: the sweep in {output} has runs 0 to {len(runs) - 1}")
    work, plan, spec = runs[index]
    return train_run(work, plan, spec, token=token, echo=echo, tracking=tracked)


def sweep(
    config: SweepConfig,
    *,
    token: str | bool | None = None,
    echo: Callable[[str], None] = log.info,
    per_cell: Callable[[RecipeConfig], RecipeConfig] | None = None,
    tracking: TrackingOptions | None = None,
) -> SweepTable | None:
    """Plan, train what is missing and assemble every cell, then write and return the table (results.json,
    cost.json; None on processes other than the main one under `accelerate launch`). `tracking` says where
    the probes, runs and soups are reported, every trial in the sweep's project."""
    output = Path(config.output)
    tracked = Tracking.of(tracking, output)
    worker = Worker.of_this_process()
    if worker.is_main:
        plan_sweep(config, token=token, echo=echo, per_cell=per_cell)
    worker.wait_for_everyone_then_part()
    loaded = load_sweep(output, token)
    for work in dict.fromkeys(cell.work for cell, _ in loaded):
        jobs = [
            (plan, decode_target(plan, work, token)) for cell, plans in loaded if cell.work == work for plan in plans
        ]
        execute(jobs, work, echo, worker, tracked)
    return collect(output, loaded, token=token, echo=echo, tracking=tracking) if worker.is_main else None


def collect(
    output: Path,
    loaded=None,
    *,
    token=None,
    echo: Callable[[str], None] = log.info,
    tracking: TrackingOptions | None = None,
) -> SweepTable:
    """Assemble the cells whose soups are missing or stale (reporting their scores to `tracking`), and write
    results.json and cost.json from their results; refuses, naming them, while some runs are missing."""
    tracked = Tracking.of(tracking, output)
    loaded = load_sweep(output, token) if loaded is None else loaded
    missing = [i for i, (work, plan, spec) in enumerate(flat_runs(loaded)) if not plan.is_done(work, spec)]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise RecipeError(
            f"{len(missing)} runs of the sweep in {output} are not done (indices: {shown}); train them with: "
            f"ratatouille-hub sweep --config {output / SWEEP_FILE} --index I"
        )
    tables = {(cell.seed, cell.strategy): assembled_cell(cell, plans, token, echo, tracked) for cell, plans in loaded}
    config = SweepConfig.load_yaml(output / SWEEP_FILE)
    seeds = list(range(config.seed, config.seed + config.trials))
    results = sweep_table(tables, seeds, list(config.strategy))
    table = SweepTable(results, sweep_cost(loaded))
    atomic_write_json(output / RESULTS_FILE, table.results)
    atomic_write_json(output / COST_FILE, table.cost)
    return table


def assembled_cell(
    cell: Cell, plans: list[RecipePlan], token, echo, tracking: Tracking = UNTRACKED
) -> LeaveOneDomainOut:
    """The cell's results per held-out domain: its soups, assembled now unless one of this plan exists."""
    per_domain = {}
    for plan in plans:
        folder = cell.folder / soup_subfolder(plan.target.test_domain)
        results = current_results(folder, plan)
        if results is None:  # assembling claims the soup: two processes collecting together write it in turn
            echo(f"[sweep] trial {cell.seed}, {cell.strategy}: held out {terminal_safe(plan.target.test_domain)}")
            results = assemble(plan, cell.work, decode_target(plan, cell.work, token), echo, folder, tracking)
        per_domain[plan.target.test_domain] = results
    table = LeaveOneDomainOut(per_domain)
    table.save(cell.folder / RESULTS_FILE)
    return table


def current_results(folder: Path, plan: RecipePlan) -> Results | None:
    """The soup's results if it was assembled from exactly this plan's recipe and runs; else None."""
    soup = SoupFolder(folder)
    if not soup.results_file.is_file():
        return None
    results = soup.results()
    same_runs = [run.folder for run in results.runs] == [spec.folder for spec in plan.runs]
    return results if same_runs and results.recipe == plan.config.to_dict() else None


def mean_and_stderr(values: list[float]) -> dict:
    """DomainBed's summary over trials: the mean and the standard error of the mean (null for one trial)."""
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "stderr": stderr, "per_trial": list(values)}


def sweep_table(tables: dict[tuple[int, str], LeaveOneDomainOut], seeds: list[int], strategies: list[str]) -> dict:
    """results.json (module docstring) from every cell's held-out accuracies."""
    domains = list(tables[(seeds[0], strategies[0])].per_domain)
    rows = {}
    for strategy in strategies:
        per_trial = [tables[(seed, strategy)].table() for seed in seeds]
        for row in per_trial[0]:
            cells = {d: mean_and_stderr([trial[row][d] for trial in per_trial]) for d in domains}
            averages = [sum(trial[row][d] for d in domains) / len(domains) for trial in per_trial]
            rows[f"{strategy}: {row}"] = {
                "strategy": strategy,
                "row": row,
                "test_accuracy": cells | {"average": mean_and_stderr(averages)},
            }
    return {"trials": seeds, "test_domains": domains, "strategies": strategies, "rows": rows}


def sweep_cost(loaded: list[tuple[Cell, list[RecipePlan]]]) -> dict:
    """cost.json (module docstring): the seconds each strategy's runs and linear probes took, per trial."""
    per_strategy: dict[str, dict[str, list]] = {}
    for cell, plans in loaded:
        runs = [spec for plan in plans for spec in plan.runs]
        spent = per_strategy.setdefault(cell.strategy, {"runs": [], "run_seconds": [], "linear_probe_seconds": []})
        spent["runs"].append(len(runs))
        spent["run_seconds"].append(sum(RunRecord(cell.work / spec.folder).metrics["seconds"] for spec in runs))
        spent["linear_probe_seconds"].append(
            sum(ProbeRecord(cell.work / plan.lp.folder).metrics["seconds"] for plan in plans)
        )
    return {
        strategy: {
            "runs": spent["runs"][0],
            "run_seconds": mean_and_stderr(spent["run_seconds"]),
            "linear_probe_seconds": mean_and_stderr(spent["linear_probe_seconds"]),
        }
        for strategy, spent in per_strategy.items()
    }


@dataclass(frozen=True)
class SweepTable:
    """What `sweep` collects: results.json and cost.json (module docstring)."""

    results: dict
    cost: dict

    def format(self) -> str:
        """Held-out accuracy (%) mean ± standard error over the trials, then what one trial cost."""
        results = self.results
        columns = [terminal_safe(d) for d in (*results["test_domains"], "average")]
        width = max(13, *(len(c) + 2 for c in columns))
        name_width = max(len(terminal_safe(name)) for name in results["rows"]) + 2
        seeds = ", ".join(map(str, results["trials"]))
        lines = [
            f"held-out accuracy (%), mean ± standard error over {len(results['trials'])} trials (seeds {seeds})",
            f"{'':<{name_width}}" + "".join(f"{c:>{width}}" for c in columns),
        ]
        for name, row in results["rows"].items():
            cells = [_cell_text(row["test_accuracy"][d]) for d in (*results["test_domains"], "average")]
            lines.append(f"{terminal_safe(name):<{name_width}}" + "".join(f"{c:>{width}}" for c in cells))
        lines += ["", "cost per trial, every held-out domain (a run two strategies share is counted in each):"]
        for strategy, spent in self.cost.items():
            lines.append(
                f"  {terminal_safe(strategy)}: {spent['runs']} runs, {spent['run_seconds']['mean']:.0f} run-seconds "
                f"+ {spent['linear_probe_seconds']['mean']:.0f} s of linear probes"
            )
        return "\n".join(lines)


def format_sweep_plan(planned: list[tuple[Cell, list[RecipePlan]]], output: Path) -> str:
    """`sweep --plan-only`: each cell's runs, the flat run list and how to spread it."""
    lines = []
    for cell, plans in planned:
        runs = [(plan, spec) for plan in plans for spec in plan.runs]
        pending = sum(not plan.is_done(cell.work, spec) for plan, spec in runs)
        lines.append(
            f"trial {cell.seed}, {cell.strategy}: {len(runs)} runs over {len(plans)} held-out domains, "
            f"{pending} pending ({cell.folder / 'plan.json'})"
        )
    runs = flat_runs(planned)
    pending = sum(not plan.is_done(work, spec) for work, plan, spec in runs)
    config = output / SWEEP_FILE
    lines += [
        "",
        f"{len(runs)} distinct runs ({pending} pending): train them with "
        f"`ratatouille-hub sweep --config {config} --index I` for I in 0..{len(runs) - 1}, "
        f"then `ratatouille-hub sweep --config {config} --assemble`",
    ]
    return "\n".join(lines)


def _cell_text(stats: dict) -> str:
    text = f"{100 * stats['mean']:.1f}"
    return text if stats["stderr"] is None else f"{text} ± {100 * stats['stderr']:.1f}"
