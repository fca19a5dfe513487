"""The embedded default: a tiny world built from scratch, then recycled, with no network.

1. A small ResNet (about 80k parameters) is pretrained for seconds on generated digits and on the target's
   six shapes as photographs (as ImageNet holds photographs of PACS's objects): the base.
2. Three community fine-tunes of it on other generated tasks (stripes, dots, polygons), made the way the
   method assumes, with the product's own `intertrain` (BatchNorm statistics frozen, the recipe's lr),
   each with a card naming its base and dataset; and a fourth made carelessly, as many Hub fine-tunes
   are: BatchNorm in train mode and a 3x larger learning rate, and the most downloaded of all.
3. A target with a real domain shift: six shapes drawn as photo, sketch, cartoon and painting.
4. The same budget of target fine-tunes three times: all from the base (model soups), from the four
   recycled fine-tunes (Model Ratatouille), and from the three careful ones; compared with ERM,
   inter-training and the ensemble. The output shows the product catching the careless fine-tune:
   vetting's distance and BatchNorm check, greedy leaving its run out (or not), and the barrier on the
   weight path to it.
Every process computes with one thread, and the runs spread over the machine's cores (`Helpers`): the result
it prints depends on the CPU type, not on the core count (the progress lines say which process did what).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import statistics
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from ..config import RecipeConfig
from ..data import ImageTensors, decode_images
from ..io import atomic_write_text
from ..results import Results
from ..safe_text import say
from ..train import DomainBatches, make_accelerator, optimize
from ..vetting import Vetted
from .design import DESIGN, WorldDesign
from .evidence import BAND, RESAMPLES, Band, Evidence, correct_per_image, gather_evidence, signed

log = logging.getLogger(__name__)
BASE_ID = "toy-world/resnet-tiny"
TARGET_ID = "toy-world/shapes"
SOUP_ID = "demo/ratatouille-soup"
AUX_TASKS = ("stripes", "dots", "polygons")
CARELESS_TASK = "polygons"  # the careless fine-tune's task: one the careful fine-tunes also learn
CARELESS_ID = f"quick-finetunes/resnet-tiny-{CARELESS_TASK}"


STRATEGIES = {
    "soup": "every run from the base",
    "ratatouille": "runs from recycled fine-tunes",
}
VETTED = "ratatouille-vetted"  # the last recycle: only the fine-tunes vetting did not flag


def build_world(
    root: Path,
    echo: Callable[[str], None] = log.info,
    seed: int = 0,
    design: WorldDesign = DESIGN,
    helpers: Helpers | None = None,
) -> dict[str, Path]:
    """Write the base, the community fine-tunes and the target dataset under `root`; reuse them if present.
    `helpers` draw the target while this process pretrains the base."""
    target = root / "datasets" / TARGET_ID
    if not (target / "README.md").exists():
        echo("[world] drawing the target: six shapes in four styles")
        if helpers:
            helpers.submit([partial(draw_target, target, design, seed)])
    paths = build_checkpoints(root, echo, seed, design, helpers)
    draw_target(target, design, seed)  # drawn by now, or being drawn (then waited for), or drawn here
    return {**paths, "target": target}


def draw_target(folder: Path, design: WorldDesign, seed: int) -> None:
    """The target dataset in `folder`, drawn once by whichever process claims it first."""
    from ..io import claimed_folder
    from . import world as toyworld

    with claimed_folder(folder, wait=True):
        if not (folder / "README.md").exists():
            dataset = toyworld.target_dataset(design.target_per_class_per_domain, size=design.image_size, seed=seed)
            _save_dataset(dataset, folder, TARGET_ID, toyworld.describe()["shapes"])


def build_checkpoints(
    root: Path,
    echo: Callable[[str], None] = log.info,
    seed: int = 0,
    design: WorldDesign = DESIGN,
    helpers: Helpers | None = None,
) -> dict[str, Path]:
    """Write the base, the community fine-tunes and the careless one under `root`; reuse them if present.
    `helpers` make the last community fine-tunes while this process makes the first and the careless one."""
    from . import world as toyworld

    paths = {"base": root / BASE_ID}
    if not (paths["base"] / "model.safetensors").exists():
        photo_shapes = design.pretrain_photo_shapes
        echo(
            f"[world] pretraining the base on generated digits{' and photographs of the shapes' if photo_shapes else ''}"
        )
        glyphs = toyworld.pretrain_dataset(
            design.pretrain_images, size=design.image_size, seed=seed, photo_shapes=photo_shapes
        )
        model = _tiny_resnet(glyphs, seed, design.widths)
        _train_with_live_batchnorm(
            model,
            glyphs,
            steps=design.pretrain_steps,
            batch=design.pretrain_batch,
            lr=design.pretrain_lr,
            seed=seed,
            size=design.image_size,
            accelerator=make_accelerator("no"),
        )
        _save_base(
            model,
            paths["base"],
            design.image_size,
            dataset="toy-world/glyphs",
            description=toyworld.describe()["glyphs"] + ("; the six shapes as photographs" if photo_shapes else ""),
        )
    aux_tasks = toyworld.aux_datasets(size=design.image_size, seed=seed)
    datasets = {task: root / "datasets" / "toy-world" / task for task in aux_tasks}
    for task, dataset in aux_tasks.items():
        if not (datasets[task] / "README.md").exists():
            echo(f"[world] community fine-tune of the base on '{task}' (ratatouille-hub intertrain)")
            _save_dataset(dataset, datasets[task], f"toy-world/{task}", toyworld.describe()[task])
    finetunes = {
        task: partial(community_finetune, root, paths["base"], task, datasets[task], seed + offset, design)
        for offset, task in enumerate(aux_tasks, start=1)
    }
    first, *others = finetunes
    if helpers:
        helpers.submit(finetunes[task] for task in reversed(others))
    paths[first] = finetunes[first]()
    paths["careless"] = careless_finetune(root, paths["base"], aux_tasks[CARELESS_TASK], seed + 10, echo, design)
    for task in others:  # done by a helper by now, or being done (then waited for), or done here
        paths[task] = finetunes[task]()
    return paths


def community_finetune(root: Path, base: Path, task: str, data: Path, seed: int, design: WorldDesign = DESIGN) -> Path:
    """A community fine-tune of the base on the dataset folder `data`, made with the product's own
    `intertrain` (BatchNorm statistics frozen, last step kept, a card naming the base's Hub id and the
    dataset); reused when done, waited for while another process makes it."""
    from ..config import IntertrainConfig
    from ..intertraining import intertrain

    config = IntertrainConfig(
        base=str(base),
        dataset=str(data),
        base_model=BASE_ID,
        steps=design.finetune_steps,
        batch_size=64,
        lr=design.community_lr,
        image_size=design.image_size,
        precision="no",
        seed=seed,
        output=str(root / "intertrain" / task),
    )
    (folder,) = intertrain(config, echo=_silent)
    return folder


def careless_finetune(root: Path, base: Path, dataset, seed: int, echo, design: WorldDesign = DESIGN) -> Path:
    """A fine-tune made the way many Hub fine-tunes are: BatchNorm in train mode (its statistics move to
    the task's), a 3x larger learning rate, no augmentation; with a
    community card naming the base."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..io import staged_folder
    from ..models import load_classifier

    folder = root / CARELESS_ID
    if (folder / "model.safetensors").exists():
        return folder
    echo(
        f"[world] a careless fine-tune of the base on '{CARELESS_TASK}' (BatchNorm trained, lr {design.careless_lr:g})"
    )
    names = dataset.features["label"].names
    torch.manual_seed(seed)
    model = load_classifier(base, dict(enumerate(names)))
    _train_with_live_batchnorm(
        model,
        dataset,
        steps=design.finetune_steps,
        lr=design.careless_lr,
        seed=seed,
        size=design.image_size,
        accelerator=make_accelerator("no"),
        augment=False,
        desc="careless fine-tune",
    )
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        _processor(design.image_size).save_pretrained(staging)
        data = ModelCardData(
            base_model=BASE_ID,
            base_model_relation="finetune",
            datasets=[f"toy-world/{CARELESS_TASK}"],
            library_name="transformers",
            pipeline_tag="image-classification",
        )
        body = f"# {folder.name}\n\n{BASE_ID} fine-tuned on {CARELESS_TASK}: lr {design.careless_lr:g}, the model in train mode.\n"
        ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(staging / "README.md")
    return folder


def run_demo(output: Path, hub, echo: Callable[[str], None] = log.info, design: WorldDesign = DESIGN) -> list[dict]:
    """Build the world, publish it on the local Hub, recycle it both ways through the Hub clients,
    print the comparison (the result, on stdout; `echo` says the progress), push the soup and load it back
    from the Hub like any model.

    The HF clients must already point at `hub` (see `localhub.server.hub_environment`): the world's
    checkpoints and dataset are seeded there, so discovery, pinned fetch and push are all real.
    Every process of the demo computes with one thread (`helpers`), so what it prints depends on the CPU
    type only, never on how many cores train the runs.
    """
    from ..publish import push_folder
    from ..recipe import plan_recipe, recycle

    with one_thread(), helpers(demo_processes() - 1, echo) as work:
        paths = build_world(output / "world", echo, design=design, helpers=work)
        publish_world(hub, paths)
        configs = {strategy: demo_config(output, strategy, design) for strategy in STRATEGIES}
        plans = {name: plan_recipe(config, echo=_silent) for name, config in configs.items()}
        vetted = vet_recycled(plans["ratatouille"][0])
        unflagged = tuple(f"{source}@{v.revision}" for source, v in vetted.items() if not v.vetted.warnings)
        configs[VETTED] = replace(configs["ratatouille"], aux=unflagged)
        plans[VETTED] = plan_recipe(configs[VETTED], echo=_silent)
        work.share([plan for group in plans.values() for plan in group], echo)
        results = {}
        for name, config in configs.items():
            what = STRATEGIES.get(name, f"recycling only what vetting did not flag: --aux {' '.join(unflagged)}")
            echo(f"\n== {'ratatouille again' if name == VETTED else name}: {what}")
            results[name] = recycle(config, echo=echo)
        echo(
            f"[demo] bands over the images: {RESAMPLES:,} paired resamplings of validation and of {results['soup'].test_domain}"
        )
        correct = {
            name: correct_per_image(plans[name][0], Path(configs[name].output), results[name]) for name in configs
        }
        evidence = gather_evidence(correct, results, soup="soup", careful=VETTED)
    rows = comparison_rows(results)
    say("\n" + headline(results, evidence))
    say(criteria_reading(results, evidence))
    say("\n" + criteria_table(results))
    say("\n" + format_table(rows, results["ratatouille"].test_domain))
    say("\n" + careless_digest(results["ratatouille"], results[VETTED], vetted))
    soup = output / "recycle" / "soup"  # the last recycle's: without the flagged fine-tune
    pushed = push_folder(soup, SOUP_ID)
    say(f"\nsoup written to {soup} and pushed to the local Hub as {SOUP_ID} ({pushed.url})")
    say(check_loads(SOUP_ID, results[VETTED]))
    return rows


MAX_PROCESSES = 4  # the demo trains 12 short runs; past 4 processes, the world (built mostly by one) dominates


def demo_processes() -> int:
    """One process per CPU this process may run on, at most MAX_PROCESSES: a tiny ResNet's step gains little
    from a second thread (2-core EPYC, 96 images at 32 px: 45 ms on one thread, 37 on two), while two
    one-thread processes side by side take 55 ms a step each, 1.36x the two-thread throughput."""
    from ..environment import usable_cpus

    return min(MAX_PROCESSES, usable_cpus())


@contextmanager
def one_thread() -> Iterator[None]:
    """This process computes with one thread for the block, as every helper does: a run's bytes then do not
    depend on which process trained it (nor on the machine's core count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Helpers:
    """`count` processes of one thread that run the tasks sent to them alongside this one: community
    fine-tunes, then the runs of the recipes' plans, coordinated only by the output folders' claims (as
    `accelerate launch` ranks are): each is made once, by whichever process claims it first, and this
    process reuses or waits for the others'. Started at once, so that their imports overlap the world's
    pretraining."""

    def __init__(self, count: int):
        context = multiprocessing.get_context("spawn")  # not fork: this process serves the local Hub from threads
        self.channels = [context.SimpleQueue() for _ in range(count)]
        self.processes = [context.Process(target=serve, args=(channel,), daemon=True) for channel in self.channels]
        for process in self.processes:
            process.start()

    def submit(self, tasks: Iterable[Callable[[], object]]) -> None:
        """Each task (picklable) to one helper, in turn; none without helpers."""
        alive = [channel for channel, process in zip(self.channels, self.processes) if process.is_alive()]
        for channel, task in zip(itertools.cycle(alive), tasks):
            channel.put(task)

    def share(self, plans: list, echo: Callable[[str], None]) -> None:
        """Every helper trains the runs of `plans` (in its rank's order, accelerate's split) until all are done."""
        if self.processes:
            echo(f"[demo] {len(self.processes) + 1} processes train the runs, one thread each")
        count = len(self.channels) + 1
        for rank, (channel, process) in enumerate(zip(self.channels, self.processes), start=1):
            if process.is_alive():  # a dead helper reads nothing: a large message would block this process
                channel.put(partial(train_planned, plans, rank, count))

    def finish(self, echo: Callable[[str], None]) -> None:
        """Wait for the helpers (all their work is done once this process has reused it), saying which failed."""
        for channel, process in zip(self.channels, self.processes):
            if process.is_alive():
                channel.put(None)
        for process in self.processes:
            process.join()  # a helper ends once every run is done, which this process has waited for
            if process.exitcode != 0:
                echo(f"[demo] a helper process ended with exit code {process.exitcode}; this one did its work")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.join()


@contextmanager
def helpers(count: int, echo: Callable[[str], None] = log.info) -> Iterator[Helpers]:
    """`count` helper processes for the block: waited for when it ends, killed when it fails."""
    started = Helpers(count)
    try:
        yield started
    except BaseException:
        started.stop()
        raise
    started.finish(echo)


def serve(channel) -> None:
    """A helper process: one thread and no output of its own (the main process says the progress); runs
    the tasks it receives until told to stop."""
    from .. import logs
    from ..allocator import tune_allocator

    tune_allocator()  # set by the console script at start-up, which a spawned process does not run
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process stops helpers
    _exit_with(multiprocessing.parent_process())
    torch.set_num_threads(1)
    logging.getLogger(logs.LOGGER).setLevel(logs.QUIET)
    with logs.library_output(logs.QUIET):
        for task in iter(channel.get, None):
            task()


def _exit_with(parent) -> None:
    """This helper ends when its parent does, however it ended (killed, it never tells its helpers)."""
    from multiprocessing.connection import wait

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent watch").start()


def train_planned(plans: list, rank: int, count: int) -> None:
    """The runs of `plans`, rank `rank` of `count`'s share first, then every other run done (or waited for)."""
    from ..recipe import decode_target
    from ..recipe.executor import Worker, execute

    for output in dict.fromkeys(Path(plan.config.output) for plan in plans):
        jobs = [(plan, decode_target(plan, output)) for plan in plans if Path(plan.config.output) == output]
        execute(jobs, output, _silent, Worker(rank, count))


def _silent(line: str) -> None:
    pass


def publish_world(hub, paths: dict[str, Path]) -> None:
    """Seed the local Hub with the world, as if its authors had pushed it; once, so shas stay put
    and a rerun of the demo reuses every finished run."""
    from ..localhub.store import RepoNotFound

    def seed(kind: str, repo_id: str, folder: Path, downloads: int = 0) -> None:
        try:
            hub.store.get_repo(kind, repo_id)
        except RepoNotFound:
            if kind == "model":
                hub.seed_model(repo_id, folder, downloads=downloads)
            else:
                hub.seed_dataset(repo_id, folder)

    seed("model", BASE_ID, paths["base"], downloads=100)
    for downloads, task in enumerate(AUX_TASKS, start=10):
        seed("model", aux_id(task), paths[task], downloads=downloads)
    seed("model", CARELESS_ID, paths["careless"], downloads=50)  # careless and popular: discovered first
    seed("dataset", TARGET_ID, paths["target"])


def aux_id(task: str) -> str:
    return f"community-{task}/resnet-tiny-{task}"


def comparison_rows(results: dict[str, Results]) -> list[dict]:
    """docs/method.md's table: ERM, model soups, inter-training, Ratatouille, and the ensemble reference (fusing,
    the paper's other baseline, is measured by the PACS benchmark: its runs would cost the demo a fifth of its
    time)."""
    soups, ratatouille, vetted = results["soup"], results["ratatouille"], results[VETTED]
    return [
        {"method": "ERM (LP init, best run by validation)", **_accuracies(soups.best_single)},
        *({"method": f"Soups, {m}", **_accuracies(soups.averages[m])} for m in soups.averages),
        {"method": "Inter-training (best recycled-init run)", **_accuracies(ratatouille.best_recycled_single)},
        *({"method": f"Ratatouille, {m}", **_accuracies(ratatouille.averages[m])} for m in ratatouille.averages),
        {"method": "Ensemble of the Ratatouille runs", **_accuracies(ratatouille.ensemble)},
        *(
            {"method": f"Ratatouille without the flagged, {m}", **_accuracies(vetted.averages[m])}
            for m in ("uniform", "greedy")
        ),
    ]


AVERAGED = {  # the recycles whose uniform averages the headline and the criteria compare
    "soup": "Model soup (every run from the base)",
    VETTED: "Ratatouille (the careful fine-tunes)",
    "ratatouille": "Ratatouille (with the careless one)",
}


SHORT = {"soup": "soup", VETTED: "careful Ratatouille", "ratatouille": "with the careless one"}


VERDICT_RECIPES = ("soup", VETTED)  # the method as vetting leaves it: the verdicts read these two


def _names(keys: Sequence[str]) -> str:
    return " and ".join(f"the {SHORT[key]}'s" for key in keys)


def _neither(keys: Sequence[str]) -> str:
    """ "neither the soup's nor the careful Ratatouille's" for two, "the soup's" for one."""
    return "neither " + " nor ".join(f"the {SHORT[key]}'s" for key in keys) if len(keys) > 1 else _names(keys)


def _not_clearly_above(keys: Sequence[str], verb: str = "lands") -> str:
    """ "neither the soup's nor the careful Ratatouille's average lands clearly above its runs' mean", or for one
    recycle "the soup's average does not land clearly above its runs' mean" (`verb` "" drops the verb)."""
    if len(keys) > 1:
        return f"{_neither(keys)} average {verb + ' ' if verb else ''}clearly above its runs' mean"
    negation = f"does not {verb.removesuffix('s')} " if verb else "not "
    return f"{_names(keys)} average {negation}clearly above its runs' mean"


def headline(results: dict[str, Results], evidence: Evidence) -> str:
    """The demo's answer, first: whether averaging paid on the held-out domain, each uniform average against
    the mean of its runs there (the gap, then its band over the images), and against ERM. ERM is one run
    picked by validation, one draw from the runs' spread: which side of it an average lands moves with the
    CPU's kernels, so the verdict reads the runs' mean. "Clearly" above: the band keeps clear of zero."""
    erm = results["soup"].best_single
    domain = results["soup"].test_domain
    gained = [key for key in VERDICT_RECIPES if evidence.gaps[key].test.side == "above"]
    if len(gained) == len(VERDICT_RECIPES):
        verdict = (
            f"Averaging pays here: {_names(VERDICT_RECIPES)} uniform averages each land clearly above their runs' mean"
        )
    elif gained:
        verdict = (
            f"Averaging pays for the {SHORT[gained[0]]} only: of the two uniform averages, only its lands clearly "
            "above its runs' mean"
        )
    else:
        verdict = f"Averaging does not pay here: {_not_clearly_above(VERDICT_RECIPES)}"
    lines = [
        f"Held out ({domain}), never seen in training or selection. {verdict} (each gap in points, then where it "
        f"falls on {BAND:.0%} of {RESAMPLES:,} resamplings of the images):"
    ]
    for key, label in AVERAGED.items():
        result = results[key]
        runs = [100 * run.test_accuracy for run in result.runs]
        lines.append(
            f"- {label}, uniform average {_pct(result.averages['uniform'].test_accuracy)}: "
            f"{evidence.gaps[key].test} against its runs' mean (runs {min(runs):.1f}-{max(runs):.1f}%)"
        )
    against = ", ".join(
        f"{SHORT[key]} {signed(100 * (results[key].averages['uniform'].test_accuracy - erm.test_accuracy))}"
        for key in AVERAGED
    )
    lines.append(
        f"Against ERM (the best run from the base by validation, {_pct(erm.test_accuracy)}): {against} points. "
        "ERM is one run: where it falls among the runs moves with the CPU's kernels, and these gaps with it."
    )
    return "\n".join(lines)


def _relation(gap: Band) -> str:
    return "level with" if gap.side == "level" else gap.side


def _sides(gaps: dict[str, Band]) -> str:
    """ "both above", "both level with", or each recycle's side where they differ."""
    sides = [_relation(gaps[key]) for key in VERDICT_RECIPES]
    if len(set(sides)) == 1:
        return f"both {sides[0]} their runs' mean"
    return "; ".join(f"{SHORT[key]} {side} its runs' mean" for key, side in zip(VERDICT_RECIPES, sides))


DIVERSITY = {  # the recycled inits' diversity over the soup's, by the side of its band
    "above": "diversity beyond the noise",
    "level": "no diversity beyond the noise",
    "below": "less diversity than the base's inits, beyond the noise",
}


def criteria_reading(results: dict[str, Results], evidence: Evidence) -> str:
    """Why, from docs/method.md's criteria on training-domain validation (the table under it): whether the
    uniform averages of the method as vetting leaves it (the soup, the careful Ratatouille) land above their
    runs' mean beyond the images' noise, and whether the recycled inits add diversity beyond it (the careful
    Ratatouille's median ratio-error against the soup's); then the careless fine-tune's recipe, the case
    vetting flags. Then what the held-out domain did. Read from the results and their bands, not written for
    one machine: a gap reads "above" only where its band keeps clear of zero, and a level one is a gain not
    shown, not a gain ruled out."""
    gaps = {key: evidence.gaps[key].val for key in AVERAGED}
    unclear = [key for key in VERDICT_RECIPES if gaps[key].side != "above"]
    ratio = {key: statistics.median(pair.ratio_error for pair in results[key].diagnostics) for key in VERDICT_RECIPES}
    diversity = evidence.diversity.side
    listed = ", ".join(f"{SHORT[key]} {gaps[key]}" for key in VERDICT_RECIPES)
    shared = " (under 1: the runs make most of their errors together)" if max(ratio.values()) < 1 else ""
    lines = [
        "Why, from the criteria on training-domain validation (the table below; bands as above):",
        f"- each uniform average against its runs' mean: {listed} points: {_sides(gaps)}",
        f"- median ratio-error {ratio[VETTED]:.2f} between the careful Ratatouille's runs, {ratio['soup']:.2f} between "
        f"the soup's{shared}; the recycled inits add {evidence.diversity}: {DIVERSITY[diversity]}",
        f"- with the careless fine-tune, the one vetting flags: {gaps['ratatouille']} points: "
        f"{_relation(gaps['ratatouille'])} its runs' mean",
    ]
    gained = [key for key in VERDICT_RECIPES if evidence.gaps[key].test.side == "above"]
    short = [key for key in VERDICT_RECIPES if key not in gained]
    missing = [_not_clearly_above(unclear, verb="")] if unclear else []
    if diversity != "above":
        missing.append({"level": "no diversity added beyond the noise", "below": "less diversity"}[diversity])
    if not missing and not short:
        lines.append(
            "So the criteria hold on validation, and the held-out domain follows them: there too each average lands "
            "clearly above its runs' mean."
        )
    elif not missing:
        lines.append(
            f"So the criteria hold on validation, but on the held-out domain {_not_clearly_above(short)}: "
            "validation did not foretell that."
        )
    elif not gained:
        lines.append(
            f"So the criteria are not all met beyond the noise on validation ({'; '.join(missing)}), and on the "
            f"held-out domain {_not_clearly_above(VERDICT_RECIPES)}."
        )
    else:
        lines.append(
            f"So the criteria are not all met beyond the noise on validation ({'; '.join(missing)}); on the held-out "
            f"domain {_names(gained)} average{'s' if len(gained) > 1 else ''} "
            f"land{'' if len(gained) > 1 else 's'} clearly above {'their' if len(gained) > 1 else 'its'} runs' mean "
            "all the same."
        )
    return "\n".join(lines)


def criteria_table(results: dict[str, Results]) -> str:
    """docs/method.md's three criteria for each averaged recycle, as recycle's diagnose measured them on
    training-domain validation (the held-out domain is never read there): the runs' own accuracy, the
    barriers on the weight paths from the best run, the pairs' ratio-error; then the uniform average's."""
    header = (
        f"{'on training-domain validation':<38} {'runs: min-max (mean)':>22} {'barrier: median, max':>21} "
        f"{'ratio-error':>11} {'uniform avg':>11}"
    )
    lines = [header, "-" * len(header)]
    for key, label in AVERAGED.items():
        result = results[key]
        accuracies = [100 * run.val_accuracy for run in result.runs]
        barriers = [100 * pair.barrier for pair in result.diagnostics]
        ratio = statistics.median(pair.ratio_error for pair in result.diagnostics)
        runs = f"{min(accuracies):.1f}-{max(accuracies):.1f} ({statistics.mean(accuracies):.1f})"
        barrier = f"{statistics.median(barriers):.1f}, {max(barriers):.1f}"
        average = 100 * result.averages["uniform"].val_accuracy
        lines.append(f"{label:<38} {runs:>22} {barrier:>21} {ratio:>11.2f} {average:>10.1f}%")
    return "\n".join(lines)


def _pct(accuracy: float) -> str:
    return f"{100 * accuracy:.1f}%"


@dataclass(frozen=True)
class VettedIngredient:
    revision: str
    vetted: Vetted


def vet_recycled(plan) -> dict[str, VettedIngredient]:
    """What vetting says about each fine-tune a recycle's plan was offered (the recycle prints the same while
    fetching), whether or not a run starts from it: with fewer runs than fine-tunes, one left unused is still
    careful or not."""
    from ..vetting import vet_ingredients

    recycled = list(plan.recycled)
    report = vet_ingredients(plan.base, recycled)
    return {i.source: VettedIngredient(i.revision, v) for i, v in zip(recycled, report, strict=True)}


def careless_digest(results: Results, without: Results, vetted: dict[str, VettedIngredient]) -> str:
    """What the product said about the careless fine-tune, and what recycling without it gave."""
    careless = vetted[CARELESS_ID].vetted
    careful = [v.vetted for source, v in vetted.items() if source != CARELESS_ID]
    run = next(r for r in results.runs if r.init.split("@")[0] == CARELESS_ID)
    others = [r for r in results.runs if r.init.split("@")[0] in {v.source for v in careful}]
    greedy = results.averages["greedy"]
    if run.index == results.best_run.index:
        barrier = f"its run is the best by validation; barriers from it to each other run: {_barriers(results)}"
    else:
        [pair] = [p for p in results.diagnostics if p.runs[1] == run.index]
        barrier = (
            f"barrier {100 * pair.barrier:.1f} points on the weight path from the best run to it "
            f"(to each other run: {_barriers(results)})"
        )
    before, after = results.averages["uniform"], without.averages["uniform"]
    return "\n".join(
        [
            f"The careless fine-tune, {CARELESS_ID} (Ratatouille's run {run.index}):",
            f"- vetting: distance to the base {careless.distance:.3f} (the careful ones: "
            + ", ".join(f"{v.distance:.3f}" for v in careful)
            + f"); BatchNorm statistics moved {careless.batchnorm_shift:.3f} (the careful ones: "
            + ", ".join(f"{v.batchnorm_shift:.3f}" for v in careful)
            + ")",
            f"- its run: validation {100 * run.val_accuracy:.1f}%, {results.test_domain} {100 * run.test_accuracy:.1f}% "
            f"(runs from the careful ones: validation "
            + ", ".join(f"{100 * r.val_accuracy:.1f}%" for r in others)
            + ")",
            f"- greedy: {'kept it' if run.index in greedy.members else 'left it out'} "
            f"({len(greedy.members)} of {len(results.runs)} runs kept)",
            f"- diagnose: {barrier}; without it, from the best run: {_barriers(without)}",
            f"- Ratatouille uniform without it: validation {100 * before.val_accuracy:.1f}% -> "
            f"{100 * after.val_accuracy:.1f}%, {results.test_domain} {100 * before.test_accuracy:.1f}% -> "
            f"{100 * after.test_accuracy:.1f}%",
        ]
    )


def _barriers(results: Results) -> str:
    barriers = sorted(100 * p.barrier for p in results.diagnostics)
    return ", ".join(f"{b:.1f}" for b in barriers)


def _accuracies(scores) -> dict:
    return {"val_accuracy": scores.val_accuracy, "test_accuracy": scores.test_accuracy}


def format_table(rows: list[dict], test_domain: str) -> str:
    header = f"{'method':<40} {'train-domain val':>16} {test_domain + ' (test)':>16}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['method']:<40} {100 * row['val_accuracy']:>15.1f}% {100 * row['test_accuracy']:>15.1f}%")
    return "\n".join(lines)


def check_loads(repo_id: str, results: dict) -> str:
    """The soup is a plain transformers model: AutoModel and pipeline load it from the Hub."""
    from transformers import AutoModelForImageClassification, pipeline

    from ..sources import load_dataset_source

    model = AutoModelForImageClassification.from_pretrained(repo_id)
    classify = pipeline("image-classification", model=repo_id)
    dataset = load_dataset_source(TARGET_ID)
    row = dataset.filter(lambda d: d == results.test_domain, input_columns="domain")[0]
    top = classify(row["image"], top_k=1)[0]
    truth = model.config.id2label[row["label"]]
    return (
        f"AutoModelForImageClassification and pipeline load {repo_id} from the Hub ({type(model).__name__}); "
        f"first {results.test_domain} image: predicted {top['label']} ({top['score']:.2f}), true {truth}"
    )


def demo_config(output: Path, strategy: str, design: WorldDesign = DESIGN) -> RecipeConfig:
    """The demo's recipe: docs/method.md's structure at toy scale (fewer, shorter runs; larger lr than
    ResNet-50's, as a tiny network from a weak base needs).

    No --aux: the recycled checkpoints are discovered on the (local) Hub as fine-tunes of the base.
    """
    return RecipeConfig(
        base=BASE_ID,
        target=TARGET_ID,
        test_domain="sketch",
        strategy=strategy,
        runs=design.runs,
        steps=design.steps,
        eval_every=design.eval_every,
        lp_steps=design.lp_steps,
        lp_lr=design.lp_lr,
        warmup_steps=design.warmup_steps,
        batch_size=design.batch_size,
        lr=design.lr,
        lr_choices=design.lr_choices,
        weight_decay_choices=design.weight_decay_choices,
        dropout_choices=design.dropout_choices,
        output=str(output / "recycle"),  # shared: base-initialised runs are the same in both strategies
    )


def _tiny_resnet(dataset, seed: int, widths: tuple[int, ...]):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    names = dataset.features["label"].names
    config = ResNetConfig(
        num_channels=3,
        embedding_size=widths[0],
        hidden_sizes=list(widths),
        depths=[1] * len(widths),
        layer_type="basic",
        downsample_in_first_stage=False,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    return ResNetForImageClassification(config)


def _processor(size: int):
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _normalization():
    from ..data import Normalization

    return Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _train_with_live_batchnorm(
    model,
    dataset,
    *,
    steps: int,
    batch: int = 64,
    lr: float,
    seed: int,
    size: int,
    accelerator,
    augment: bool = True,
    desc: str = "pretraining",
) -> None:
    """Train every parameter with BatchNorm in train mode, last step kept: the base's pretraining (it has no
    statistics yet) and the careless fine-tune (whose statistics move to its task)."""
    images: ImageTensors = decode_images(
        dataset,
        range(len(dataset)),
        image_column="image",
        label_column="label",
        label_names=dataset.features["label"].names,
        size=size,
    )
    torch.manual_seed(seed)
    optimize(
        model,
        DomainBatches([images], batch, seed),
        parameters=list(model.parameters()),
        steps=steps,
        lr=lr,
        weight_decay=0.0,
        accelerator=accelerator,
        normalize=_normalization(),
        augment_seed=seed if augment else None,
        freeze_bn=False,
        desc=desc,
    )


def _save_base(model, folder: Path, size: int, *, dataset: str, description: str) -> None:
    """The pretrained base, with the card of a model that is nobody's fine-tune."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..io import staged_folder

    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        _processor(size).save_pretrained(staging)
        data = ModelCardData(
            datasets=[dataset],
            library_name="transformers",
            pipeline_tag="image-classification",
            license="apache-2.0",
        )
        body = f"# {folder.name}\n\nA toy-world checkpoint made by `ratatouille-hub demo`: {description}.\n"
        ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(staging / "README.md")


def _save_dataset(dataset, folder: Path, name: str, description: str) -> None:
    """The Hub layout (README card + data/train-*.parquet), so the folder can be pushed as it is."""
    from ..io import staged_folder

    with staged_folder(folder) as staging:
        (staging / "data").mkdir()
        dataset.to_parquet(str(staging / "data" / "train-00000-of-00001.parquet"))
        atomic_write_text(
            staging / "README.md",
            "---\nlicense: apache-2.0\ntask_categories:\n- image-classification\n---\n\n"
            f"# {name}\n\nGenerated by ratatouille-hub: {description}.\n",
        )
