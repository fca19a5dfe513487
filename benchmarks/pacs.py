"""PACS benchmark: every method of docs/method.md side by side, on real images, through the local Hub.

    python benchmarks/pacs.py [--trials 0 1 2]

One command runs the whole table from scratch, and resumes where it stopped:
1. a local Hub (benchmarks/scratch/pacs/hub) is seeded with the real base (EfficientNet-Lite0, ImageNet)
   and PACS as `flwrlabs/pacs`, both read from ../shared (never copied into the repository);
2. the ingredients, made once and reused by every trial: `intertrain` fine-tunes the base 4 times on each
   auxiliary dataset (caltech101, clothing, cifar10), and transformers' Trainer once per dataset (the
   way most Hub fine-tunes are made); all are pushed to the Hub with community-style cards;
3. per trial and held-out domain, the product's `sweep` (ratatouille_hub/sweep.py) runs every strategy
   (erm, soup, ratatouille, fusing) over fine-tunes it downloads from the Hub at pinned revisions, sharing
   the linear probe and the runs between strategies, and each cell is kept as soon as its own runs are
   done (a session that stops loses at most one cell's runs); in one trial (EXPERIMENT_TRIAL) a further
   `recycle` recycles the Trainer group too, with either BatchNorm policy;
4. the tables go to benchmarks/results/pacs.json and pacs.md, with diagnose figures for one domain.

Each stage is a folder with a `done` marker (the project's own run folders), so a rerun skips finished
work. What the sweep's options cannot say is here: making the ingredients, the fine-tunes each trial draws
(`draw_finetunes`), the Trainer group's experiment, the diagnosis, and the report's PACS-specific sections. The command applies the malloc settings of ../shared/STACK.md itself (ratatouille_hub/allocator.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # imported where used: it imports huggingface_hub, which reads HF_ENDPOINT once, at import
    from ratatouille_hub.results import Results

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
# Every stage at one resolution (--image-size); each resolution keeps its own folders, so the 64 px trials
# stay beside the 128 px ones. `configure` sets these four from it.
WORK = SWEEP = RESULTS = DURABLE = Path()
HUB_STYLE_TRIALS: tuple[int, ...] = ()
BASE_FOLDER = SHARED / "models" / "efficientnet-lite0-imagenet"
BASE_ID = "bench/efficientnet-lite0-imagenet"
PACS_FOLDER = SHARED / "data" / "pacs"
AUX_DATASETS = ("caltech101", "clothing", "cifar10")
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
DIAGNOSED_DOMAIN = "art_painting"
TRIALS = (0, 1, 2)
# The trial whose Ratatouille runs are diagnosed and extended by the Trainer group. At 128 px trial 2: the run
# folders of trials 0 and 1 went with the sessions that made them (a Xeon's, then an EPYC's), and retraining them
# would cost a cell's runs for other bytes than the cells'; trial 2's art_painting runs are diagnosed in the
# session that makes them.
EXPERIMENT_TRIAL = {64: 0, 128: 2}

# The scaled-down protocol (written at the top of pacs.md; see protocol() below).
IMAGE_SIZE = 128  # PACS as stored in ../shared (its own resolution); 64 px was the earlier, cheaper protocol


def configure(
    image_size: int, *, shared: Path = ROOT.parent / "shared", work: Path | None = None, results: Path | None = None
) -> None:
    """Point the benchmark at one resolution's folders: run folders and the local Hub (WORK, rebuilt in each
    session), the sweeps' output (SWEEP: <domain>/trial-<seed>/ holds every strategy's runs of that trial
    with that domain held out), the report
    (RESULTS) and what a finished cell leaves (DURABLE: committed, so a later session resumes from it); and at
    the base and datasets (`shared`: models/ and data/ as ../shared lays them out). benchmarks/gpu.py passes
    folders of its own."""
    global IMAGE_SIZE, WORK, SWEEP, RESULTS, DURABLE, SHARED, BASE_FOLDER, PACS_FOLDER, HUB_STYLE_TRIALS
    IMAGE_SIZE = image_size
    HUB_STYLE_TRIALS = (EXPERIMENT_TRIAL.get(image_size, TRIALS[0]),)  # the Trainer group's: 3 more runs per domain
    WORK = work or ROOT / "benchmarks" / "scratch" / f"pacs-{image_size}px"
    SWEEP = WORK / "sweep"
    RESULTS = results or ROOT / "benchmarks" / "results" / f"pacs-{image_size}px"
    DURABLE = RESULTS / "cells"
    SHARED = shared
    BASE_FOLDER = SHARED / "models" / "efficientnet-lite0-imagenet"
    PACS_FOLDER = SHARED / "data" / "pacs"


configure(IMAGE_SIZE)
AUX_RUNS, AUX_STEPS, AUX_BATCH = 4, 500, 32  # the paper's 4 per dataset
AUX_PER_TRIAL = 1  # fine-tunes of each auxiliary dataset a trial recycles, drawn by the trial's seed
RUNS = 1 + AUX_PER_TRIAL * len(AUX_DATASETS)  # Ratatouille: one run from the base, one per drawn fine-tune
STEPS, EVAL_EVERY, WARMUP, BATCH = 120, 40, 40, 16
LP_STEPS = 5001
TRAINER_LR, TRAINER_STEPS, TRAINER_BATCH = 3e-4, AUX_STEPS, AUX_BATCH  # 6x the recipe's lr, AdamW, BN training


def scale_protocol(
    *,
    aux_runs: int,
    aux_steps: int,
    aux_per_trial: int,
    steps: int,
    eval_every: int,
    warmup: int,
    batch: int,
    lp_steps: int,
) -> None:
    """The same stages at another budget (benchmarks/gpu.py's cell): the sizes the ingredients and the sweep read."""
    global AUX_RUNS, AUX_STEPS, AUX_PER_TRIAL, RUNS, STEPS, EVAL_EVERY, WARMUP, BATCH, LP_STEPS
    AUX_RUNS, AUX_STEPS, AUX_PER_TRIAL = aux_runs, aux_steps, aux_per_trial
    RUNS = 1 + AUX_PER_TRIAL * len(AUX_DATASETS)
    STEPS, EVAL_EVERY, WARMUP, BATCH, LP_STEPS = steps, eval_every, warmup, batch, lp_steps


STRATEGIES = ("erm", "soup", "ratatouille", "fusing")  # the sweep's; each one's results: <domain>-<strategy>.json


@dataclass(frozen=True)
class HubStyleCell:
    """A Ratatouille of the drawn fine-tunes and the Trainer group, with one BN policy."""

    name: str  # results/<domain>-<name>.json
    bn_policy: str


HUB_STYLE_CELLS = (HubStyleCell("hub-style", "average"), HubStyleCell("hub-style-reestimate", "reestimate"))


class Row(NamedTuple):
    """One row of the table: the cell whose results hold it, and its scores in that results record."""

    name: str
    cell: str
    scores_of: Callable[[Results], object]
    recycled_only: bool = False  # it needs only the cell's runs from recycled inits: its cost counts no other


ROWS = (
    Row("ERM (LP init)", "erm", lambda r: r.soup),
    Row("Soups, uniform", "soup", lambda r: r.averages["uniform"]),
    Row("Soups, greedy", "soup", lambda r: r.averages["greedy"]),
    Row("Soups runs, Model Stock", "soup", lambda r: r.averages["model-stock"]),
    Row("Soups runs, interpolated to the base (alpha 0.5)", "soup", lambda r: r.averages["interpolate"]),
    Row("Inter-training", "ratatouille", lambda r: r.best_recycled_run, recycled_only=True),  # best recycled run
    Row("Fusing", "fusing", lambda r: r.soup),
    Row("Ratatouille, uniform", "ratatouille", lambda r: r.averages["uniform"]),
    Row("Ratatouille, greedy", "ratatouille", lambda r: r.averages["greedy"]),
    Row("Ratatouille runs, Model Stock", "ratatouille", lambda r: r.averages["model-stock"]),
    Row("Ratatouille runs, interpolated to the base (alpha 0.5)", "ratatouille", lambda r: r.averages["interpolate"]),
    Row("Ensemble (of the Ratatouille runs)", "ratatouille", lambda r: r.ensemble),
)
# The rows that are one run or a chosen subset of their cell's runs: the report names those runs.
CHOSEN_RUN_ROWS = ("ERM (LP init)", "Inter-training", "Fusing", "Soups, greedy", "Ratatouille, greedy")


def protocol() -> str:
    return f"""\
Protocol (what is scaled down from docs/method.md, and why). docs/method.md's budget is 20 runs x 5001 steps of 32
images per domain at 224 px, per strategy and test domain, on GPUs. Here the budget is 2 CPU cores and
working sessions of at most 3 hours, keeping only what is committed: each finished cell is committed
(cells/: its results and what its runs cost), so a stopped benchmark resumes in a later session after
rebuilding the ingredients from their seeds (their sha256 must match the build made on the same kind of CPU;
another kind rounds floats otherwise, and its rebuild is described beside the first). Measured on the
Intel Xeon (2 threads, channels-last fp32, EfficientNet-Lite0; an AMD EPYC with AVX2 only takes 4.2-4.8x as
long for a 128 px run, probe or fine-tune): one training step of 48 images costs 0.50 s at 128 px,
0.36 s at 96 px and 0.23 s at 64 px; a trial of 4 test domains with 4 runs per strategy (11 distinct runs
per domain) of {STEPS} steps took 27-29 minutes at 64 px (the three trials: 1,600-1,723 s) and 126 at 128 px
(trial 0: 7,559 s, the cores shared with other work at times), and the ingredients about 13 minutes at 64 px
and at 128 px 730 and 747 s for clothing's and cifar10's four (caltech101's 9,499 s, under heavy contention).
This run is at {IMAGE_SIZE} px. The three 64 px trials (results/pacs-64px/) cut resolution
before the number of runs or steps; at 128 px, PACS's stored resolution, the backbone sees the objects, and
everything else is kept as at 64 px ({STEPS} steps, {RUNS} runs per strategy), so that the two tables differ
by resolution alone; more steps per run would multiply a budget that already spans many sessions (the wall
times at the end; on the EPYC 4.2-4.8x the Xeon's). Nothing below was chosen by looking at a test domain.
Kept as in docs/method.md: DomainBed leave-one-domain-out, 80/20 train/validation split per training domain
(seeded by trial), model selection on training-domain validation only, the shared linear probe
({LP_STEPS} steps, lr 5e-5, on frozen features), a head-only warm-up then a fresh Adam for runs from
recycled or fused inits, frozen BatchNorm statistics (BN policy `average`), feature dropout, per-run
hparams drawn from {{1e-5, 3e-5, 5e-5}} x {{1e-4, 1e-6}} x {{0, 0.1, 0.5}} (run 0: defaults), best step by
validation, uniform and greedy averaging, DomainBed augmentation. Scaled down:
- backbone: EfficientNet-Lite0 (ImageNet, 4.7M parameters), the only real ImageNet backbone offline
  here, instead of ResNet-50; so absolute numbers are not comparable with the paper's, only orderings;
- resolution {IMAGE_SIZE} px (PACS is stored at 128) instead of 224, for every stage, ingredients included;
- ingredients, rebuilt in each session (the ones its trials draw) and recycled by every trial (their cost
  is the community's, not the user's): {AUX_RUNS} fine-tunes per auxiliary dataset (the paper's count) of {AUX_STEPS} steps x {AUX_BATCH} images
  (docs/method.md: 5001), hparams drawn as for target runs, on caltech101 (PACS-overlapping classes removed),
  clothing and cifar10 (upsampled from 32 px) instead of the other DomainBed datasets;
- {RUNS} runs per strategy instead of 20. Ratatouille = 1 run from the base + 1 from each of
  {AUX_PER_TRIAL * len(AUX_DATASETS)} fine-tunes ({AUX_PER_TRIAL} per auxiliary dataset, drawn per trial from its {AUX_RUNS}, so the
  datasets weigh equally and the three trials recycle different fine-tunes; paper: 4 + 16);
  Fusing mixes the base with the same drawn fine-tunes (one per dataset, as docs/method.md);
- {STEPS} steps per run instead of 5001, {BATCH} images per training domain per step instead of 32,
  validation every {EVAL_EVERY} steps, head-only warm-up {WARMUP} steps instead of 200;
- channels-last memory layout (1.4-2x faster on CPU; equal up to float rounding); fp32 throughout.
The Trainer group (one fine-tune per auxiliary dataset made with transformers' Trainer: AdamW at lr
{TRAINER_LR:g}, linear decay, BatchNorm in train mode, no augmentation, {TRAINER_STEPS} steps x {TRAINER_BATCH}) is recycled in
trial {", ".join(map(str, HUB_STYLE_TRIALS))} only, after the three trials (its {DIAGNOSED_DOMAIN} runs are diagnosed as soon as that domain's cells are made), by a further Ratatouille of {RUNS + len(AUX_DATASETS)} runs whose first {RUNS} are the
Ratatouille cell's own, once with each BatchNorm policy (`average`, `reestimate`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", type=int, nargs="+", default=list(TRIALS), help="trial seeds: splits, drawn fine-tunes, runs"
    )
    parser.add_argument("--report-only", action="store_true", help="rebuild pacs.json/pacs.md from finished results")
    parser.add_argument(
        "--ingredients-only", action="store_true", help="make and push the auxiliary fine-tunes, then stop"
    )
    parser.add_argument(
        "--image-size", type=int, default=IMAGE_SIZE, help=f"pixels per side, every stage (default {IMAGE_SIZE})"
    )
    args = parser.parse_args()
    configure(args.image_size)
    os.chdir(ROOT)  # run folders are named relative to the repository, so committed results name no machine
    from ratatouille_hub.allocator import tune_allocator

    tune_allocator()  # what the command does at start-up: PyTorch on CPU is 2-5x slower without it
    if not args.report_only:
        run_trials(args.trials, ingredients_only=args.ingredients_only)
    if not args.ingredients_only:
        report()


def run_trials(trials: list[int], ingredients_only: bool = False) -> None:
    from ratatouille_hub.localhub.server import LocalHub, hub_environment

    WORK.mkdir(parents=True, exist_ok=True)
    with LocalHub(WORK / "hub") as hub:
        # Before any HF library is imported: they read these once, at import time.
        os.environ.update(hub_environment(hub.url, WORK / "hf-home"))
        os.environ.pop("HF_TOKEN", None)
        import torch

        from ratatouille_hub import logs

        torch.set_num_threads(os.cpu_count() or 1)
        with logs.library_output(logs.DEFAULT):  # as the command: the libraries' bars would bury the log
            seed_hub(hub)
            timings = load_json(DURABLE / "timings.json", {})
            made = intertrain_auxiliaries(timings, drawn_runs(None if ingredients_only else trials))
            describe_ingredients(made)
            # The main table first, trial by trial, so that a stopped session leaves complete trials behind,
            # each diagnosed once complete where it is the experiment's; then the Trainer group's experiment,
            # which no row of the table needs.
            if not ingredients_only:
                for trial in trials:
                    if trial in HUB_STYLE_TRIALS:  # while its runs are on disk: a later session would retrain them
                        run_trial(trial, timings, (DIAGNOSED_DOMAIN,))
                        diagnose_domain(trial, DIAGNOSED_DOMAIN)
                    run_trial(trial, timings)
        hub_style = [t for t in trials if t in HUB_STYLE_TRIALS]
        if ingredients_only or any(
            not cell_path(t, d, c.name).exists() for t in hub_style for d in DOMAINS for c in HUB_STYLE_CELLS
        ):
            describe_ingredients(trainer_finetunes(timings))
        if not ingredients_only:
            for trial in hub_style:
                for cell in HUB_STYLE_CELLS:
                    run_hub_style(trial, cell, timings)


def seed_hub(hub) -> None:
    """The base and PACS, stored once in the local Hub as if they had always been there."""
    from huggingface_hub import HfApi

    api = HfApi()
    if not api.repo_exists(BASE_ID):
        print(f"[hub] seeding {BASE_ID} from {BASE_FOLDER}")
        hub.seed_model(BASE_ID, BASE_FOLDER, downloads=1000)
    if not api.repo_exists("flwrlabs/pacs", repo_type="dataset"):
        print(f"[hub] seeding flwrlabs/pacs from {PACS_FOLDER}")
        hub.seed_dataset("flwrlabs/pacs", PACS_FOLDER)


def intertrain_auxiliaries(timings: dict, runs_of: dict[str, list[int]]) -> dict[str, Path]:
    """The fine-tunes `runs_of` names (dataset: run indices, of AUX_RUNS made with one recipe) of the base on
    each auxiliary dataset, each pushed to the Hub as a community checkpoint; returns {repo id: local folder}.
    A run's bytes do not depend on which others are made (its key and seeds are its index's)."""
    from ratatouille_hub.config import IntertrainConfig
    from ratatouille_hub.intertraining import intertrain
    from ratatouille_hub.publish import push_folder

    made = {}
    for name in AUX_DATASETS:
        config = IntertrainConfig(
            base=BASE_ID,
            dataset=str(SHARED / "data" / name),
            runs=AUX_RUNS,
            steps=AUX_STEPS,
            batch_size=AUX_BATCH,
            image_size=IMAGE_SIZE,
            output=str(WORK / "intertrain" / name),
        )
        for run in runs_of[name]:
            started = time.time()
            (folder,) = intertrain(config, index=run)  # resumable: a finished fine-tune is reused
            key = f"intertrain/{name}-{run}x{AUX_STEPS}"
            if key not in timings:
                timings[key] = round(time.time() - started, 1)
                save_json(DURABLE / "timings.json", timings)
            repo_id = recipe_finetune_id(name, run)
            push_folder(folder, repo_id)
            made[repo_id] = Path(folder)
    return made


def drawn_runs(trials: list[int] | None) -> dict[str, list[int]]:
    """The intertrain runs of each auxiliary dataset that `trials` recycle (every run: None): a session
    rebuilds only those, since a trial draws AUX_PER_TRIAL of AUX_RUNS per dataset."""
    if trials is None:
        return {name: list(range(AUX_RUNS)) for name in AUX_DATASETS}
    drawn = {recipe_finetune_id(name, run): (name, run) for name in AUX_DATASETS for run in range(AUX_RUNS)}
    runs_of: dict[str, set[int]] = {name: set() for name in AUX_DATASETS}
    for trial in trials:
        for repo_id in recycled_in(trial, "recipe"):
            name, run = drawn[repo_id]
            runs_of[name].add(run)
    return {name: sorted(runs) for name, runs in runs_of.items()}


def recipe_finetune_id(dataset: str, run: int) -> str:
    return f"bench/efficientnet-lite0-{dataset}-{run}"


def trainer_finetune_id(dataset: str) -> str:
    return f"community/efficientnet-lite0-{dataset}-trainer"


def recycled_in(trial: int, group: str) -> tuple[str, ...]:
    """The fine-tunes a cell recycles: AUX_PER_TRIAL per auxiliary dataset, drawn by the trial's seed and
    taken dataset by dataset in turn (so any prefix is balanced); the hub-style group adds the Trainer's."""
    draw = random.Random(f"pacs-trial-{trial}")
    drawn = {name: sorted(draw.sample(range(AUX_RUNS), AUX_PER_TRIAL)) for name in AUX_DATASETS}
    recipe = tuple(recipe_finetune_id(name, drawn[name][k]) for k in range(AUX_PER_TRIAL) for name in AUX_DATASETS)
    return recipe + tuple(trainer_finetune_id(name) for name in AUX_DATASETS) if group == "hub-style" else recipe


class ImageExamples:
    """Decoded images as the Trainer's map-style dataset: normalised pixel_values and labels, one at a time."""

    def __init__(self, images, normalize):
        self.images, self.normalize = images, normalize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {
            "pixel_values": self.normalize.from_uint8(self.images.pixels[i : i + 1])[0],
            "labels": self.images.labels[i],
        }


def trainer_finetunes(timings: dict) -> dict[str, Path]:
    """One fine-tune per auxiliary dataset made the way most Hub fine-tunes are: transformers' Trainer with
    its defaults (AdamW, linear decay, the model in train mode, so BatchNorm statistics move), a larger
    learning rate, no augmentation; pushed under another user with a community card (base_model: finetune)."""
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import Trainer, TrainingArguments

    from ratatouille_hub.artifacts import DONE
    from ratatouille_hub.data import decode_images, evenly_spaced, label_names_of, normalization_of, resolution_of
    from ratatouille_hub.evaluation import accuracy, predict_logits
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.io import atomic_write_json, staged_folder
    from ratatouille_hub.models import load_classifier, load_processor, serving_processor
    from ratatouille_hub.publish import push_folder
    from ratatouille_hub.sources import load_dataset_source

    base = resolve_model(BASE_ID)
    processor = load_processor(base.path, base.source)
    size, normalize = resolution_of(processor, IMAGE_SIZE), normalization_of(processor)
    made = {}
    for name in AUX_DATASETS:
        repo_id = trainer_finetune_id(name)
        folder = WORK / "trainer" / name
        if not (folder / DONE).is_file():
            started = time.time()
            dataset = load_dataset_source(str(SHARED / "data" / name))
            labels = label_names_of(dataset, "label")
            images = decode_images(
                dataset, range(len(dataset)), image_column="image", label_column="label", label_names=labels, size=size
            )
            model = load_classifier(base.path, dict(enumerate(labels)))

            arguments = TrainingArguments(
                output_dir=str(WORK / "trainer" / f".{name}-checkpoints"),
                max_steps=TRAINER_STEPS,
                per_device_train_batch_size=TRAINER_BATCH,
                learning_rate=TRAINER_LR,
                save_strategy="no",
                report_to=[],
                logging_steps=100,
                use_cpu=True,
                seed=0,
                dataloader_num_workers=0,
            )
            Trainer(model=model, args=arguments, train_dataset=ImageExamples(images, normalize)).train()
            sample = evenly_spaced(images, 1000)  # as intertrain measures its own fine-tunes
            results = {"train_accuracy": accuracy(predict_logits(model, sample, normalize), sample.labels)}
            card = ModelCard(
                f"---\n{ModelCardData(base_model=BASE_ID, base_model_relation='finetune', datasets=[name], pipeline_tag='image-classification', library_name='transformers').to_yaml()}\n---\n"
                f"# {BASE_ID} fine-tuned on {name}\n\nTrainer, lr {TRAINER_LR}, {TRAINER_STEPS} steps of {TRAINER_BATCH}.\n"
            )
            processor = serving_processor(model, size, normalize)  # before saving: it may set the config
            with staged_folder(folder) as staging:
                model.save_pretrained(staging)
                if processor is not None:  # None where the config serves itself (timm: its pretrained_cfg)
                    processor.save_pretrained(staging)
                card.save(staging / "README.md")
                atomic_write_json(staging / "results.json", results)
                (staging / DONE).touch()
            timings[f"trainer/{name}x{TRAINER_STEPS}"] = round(time.time() - started, 1)
            save_json(DURABLE / "timings.json", timings)
        push_folder(folder, repo_id)
        made[repo_id] = folder
    return made


def describe_ingredients(made: dict[str, Path]) -> None:
    """Each fine-tune's distance to the base (vetting's measure) and its accuracy on 1000 of its own
    training images, once, with the sha256 of its weights and the CPU that made them: a later session
    rebuilds the ingredients from their seeds and must get the same bytes on the same kind of CPU to resume
    (DURABLE/ingredients.json). Another kind of CPU rounds floats otherwise (other kernels: an AMD EPYC
    rebuilds the Intel Xeon's fine-tunes with other bytes from the same seeds and code), so its rebuild is
    described beside the first build, under `rebuilt_on`, and checked in turn by the sessions on that kind."""
    from ratatouille_hub.discovery import head_names_of, local_signature
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.vetting import distance_to_base

    path, cpu = DURABLE / "ingredients.json", cpu_kind()
    described = load_json(path, {})
    pending = undescribed_builds(described, made, cpu)
    if not pending:
        return
    base = resolve_model(BASE_ID)
    signature, heads = local_signature(base.path), head_names_of(base.path / "config.json")
    for repo_id, folder in pending.items():
        own = json.loads((folder / "results.json").read_text())
        build = {
            "distance_to_base": distance_to_base(base, resolve_model(repo_id), signature, heads),
            "train_accuracy": own["train_accuracy"],
            "sha256": weights_sha256(folder),
        }
        hparams = own.get("hparams", {"lr": TRAINER_LR, "optimizer": "AdamW (Trainer)"})
        add_build(described, repo_id, build, hparams, cpu)
    save_json(path, described)


def undescribed_builds(described: dict, made: dict[str, Path], cpu: str) -> dict[str, Path]:
    """The fine-tunes of `made` that ingredients.json does not describe a build of on `cpu`; stops when one
    it does describe was rebuilt with other bytes on the same kind of CPU (its kept cells recycled others)."""
    for repo_id, folder in made.items():
        build = built_on(described.get(repo_id), cpu)
        if build is not None and build["sha256"] != weights_sha256(folder):
            raise SystemExit(
                f"{repo_id} was rebuilt on {cpu} with other weights than the finished cells recycled "
                f"({build['sha256'][:12]}...); move {DURABLE} aside to start over"
            )
    return {r: f for r, f in made.items() if built_on(described.get(r), cpu) is None}


def add_build(described: dict, repo_id: str, build: dict, hparams: dict, cpu: str) -> None:
    """A fine-tune's first build, or its rebuild on another kind of CPU beside the first."""
    if repo_id in described:
        described[repo_id].setdefault("rebuilt_on", {})[cpu] = build
    else:
        described[repo_id] = build | {"hparams": hparams, "cpu": cpu}


# Cells and ingredients made before they recorded their CPU ran on the project's Intel Xeon (the sessions'
# closing notes name it for every 64 px trial and 128 px trial 0).
UNRECORDED_CPU = "Intel Xeon"


def built_on(entry: dict | None, cpu: str) -> dict | None:
    """The build of an ingredients.json entry made on `cpu`, if any."""
    if entry is None:
        return None
    if entry.get("cpu", UNRECORDED_CPU) == cpu:
        return entry
    return entry.get("rebuilt_on", {}).get(cpu)


def cpu_kind() -> str:
    """The kind of CPU this runs on, as far as it decides float rounding: vendor and line, from /proc/cpuinfo."""
    names = [line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")]
    name = names[0] if names else platform.processor() or platform.machine()
    for kind in ("Intel Xeon", "AMD EPYC"):
        if all(word in name for word in kind.split()):
            return kind
    return " ".join(name.replace("(R)", "").replace("(TM)", "").split())


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def cell_path(trial: int, domain: str, cell: str) -> Path:
    return DURABLE / f"trial{trial}" / f"{domain}-{cell}.json"


def sweep_config(trial: int, domain: str, strategies: tuple[str, ...] = STRATEGIES):
    """The table's protocol for one trial with one domain held out, as the product's sweep: every strategy (or
    `strategies`: benchmarks/gpu.py's cell, or run_trial's one cell at a time). Not `--test-domain all`,
    because a sweep keeps its soups only once all its runs are trained. A domain's plan is the same either way (its runs' seeds and keys read the held-out domain, never
    the other plans), so the committed 64 px and 128 px trial 0 cells stay valid (tests/test_sweep.py)."""
    from ratatouille_hub.config import SweepConfig

    output = SWEEP / domain  # DOMAINS: this script's names, not a dataset's
    return SweepConfig(
        base=BASE_ID,
        target="PACS",
        test_domain=domain,
        strategy=strategies,
        seed=trial,
        trials=1,
        runs=RUNS,
        steps=STEPS,
        eval_every=EVAL_EVERY,
        lp_steps=LP_STEPS,
        warmup_steps=WARMUP,
        batch_size=BATCH,
        image_size=IMAGE_SIZE,
        output=str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output),
    )


def draw_finetunes(recipe):
    """The sweep's `per_cell`: a recycling strategy recycles the fine-tunes its trial draws (a sweep's options
    name one --aux list for every trial; PACS draws one per auxiliary dataset and trial)."""
    recycles = recipe.strategy in ("ratatouille", "fusing")
    return replace(recipe, aux=recycled_in(recipe.seed, "recipe") if recycles else ())


def run_trial(
    trial: int, timings: dict, domains: tuple[str, ...] = DOMAINS, strategies: tuple[str, ...] = STRATEGIES
) -> None:
    """One trial of the table, held-out domain by domain and strategy by strategy, each cell one sweep into its
    domain's folder (runs two cells share are trained once: the folder keeps them by key), so each cell's
    results and costs are kept in DURABLE as soon as its own runs are done; a kept cell is skipped."""
    from ratatouille_hub.recipe.plan import load_plans
    from ratatouille_hub.results import Results, soup_subfolder
    from ratatouille_hub.sweep import cells_of, sweep

    for domain in domains:
        for strategy in strategies:
            destination = cell_path(trial, domain, strategy)
            if destination.exists():  # a kept cell stays as it was committed
                continue
            print(f"\n== trial {trial}, {domain} held out: {strategy}", flush=True)
            config, started = sweep_config(trial, domain, (strategy,)), time.time()
            sweep(config, echo=lambda line: print(line, flush=True), per_cell=draw_finetunes)
            timings[f"trial{trial}/{domain}/{strategy}"] = round(time.time() - started, 1)
            save_json(DURABLE / "timings.json", timings)
            (cell,) = cells_of(config)
            (plan,) = load_plans(cell.folder)
            save_json(destination.with_suffix(".cost.json"), cell_cost(cell.work, plan))
            Results.load(cell.folder / soup_subfolder(domain) / "results.json").save(destination)


def run_hub_style(trial: int, cell: HubStyleCell, timings: dict) -> None:
    """`recycle --strategy ratatouille` of the drawn fine-tunes and the Trainer group, each domain held out in
    turn, into that domain's sweep folder of the trial, so its first RUNS runs are the Ratatouille cell's own
    (reused, not retrained); each test domain's results are kept with the verdicts printed about them."""
    from ratatouille_hub.recipe import recycle
    from ratatouille_hub.recipe.plan import load_plans
    from ratatouille_hub.sweep import cell_recipe, cells_of

    aux = recycled_in(trial, "hub-style")
    for domain in DOMAINS:
        if cell_path(trial, domain, cell.name).exists():
            continue
        print(f"\n== trial {trial}, {domain} held out, {cell.name}: {len(aux)} recycled fine-tunes", flush=True)
        sweep = sweep_config(trial, domain)
        ratatouille = next(c for c in cells_of(sweep) if c.strategy == "ratatouille")
        config = replace(cell_recipe(sweep, ratatouille), aux=aux, runs=1 + len(aux), bn_policy=cell.bn_policy)
        started, printed = time.time(), []
        results = recycle(config, echo=printing_into(printed))
        timings[f"trial{trial}/{cell.name}/{domain}"] = round(time.time() - started, 1)
        save_json(DURABLE / "timings.json", timings)
        (plan,) = load_plans(Path(config.output))
        verdicts = [line for line in printed if line.startswith(("[vet]", "[merge] greedy", "[diagnose]"))]
        save_json(
            cell_path(trial, domain, cell.name).with_suffix(".cost.json"),
            cell_cost(Path(config.output), plan) | {"printed": verdicts},
        )
        results.save(cell_path(trial, domain, cell.name))


def printing_into(lines: list[str]):
    """An echo that prints each line and keeps it in `lines`."""

    def echo(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    return echo


def diagnose_domain(trial: int, domain: str) -> None:
    """The three criteria on every pair of the Ratatouille runs of one test domain (validation only)."""
    from ratatouille_hub.config import RecipeConfig
    from ratatouille_hub.diagnostics import diagnose_models, format_diagnosis
    from ratatouille_hub.results import Results

    destination = DURABLE / f"trial{trial}" / f"diagnose-{domain}.json"
    if destination.exists():
        return
    results = Results.load(cell_path(trial, domain, "ratatouille"))
    swept = sweep_config(trial, domain, ("ratatouille",))  # retrained, only the runs diagnosed are needed
    output = Path(swept.output) / f"trial-{trial}"
    folders = [str(output / run.folder / "model") for run in results.runs]
    if not all(Path(f).is_dir() for f in folders):  # finished in an earlier session: retrain that domain's runs
        from ratatouille_hub.sweep import sweep

        sweep(swept, echo=lambda line: print(line, flush=True), per_cell=draw_finetunes)
    config = RecipeConfig(base=folders[0], target="PACS", test_domain=domain, image_size=IMAGE_SIZE, seed=trial)
    inits = [run.init.split("@")[0] for run in results.runs]
    # Named by their inits, as the soup card names its runs, not by their scratch folders.
    diagnosis = replace(
        diagnose_models(folders, config), names=tuple(f"run {i} from {_short(init)}" for i, init in enumerate(inits))
    )
    print(format_diagnosis(diagnosis))
    save_json(
        destination,
        {
            "domain": domain,
            # runs retrained in a later session on another kind of CPU are not the cell's bytes (other rounding)
            "cpu": cpu_kind(),
            "cell_cpu": load_json(cell_path(trial, domain, "ratatouille").with_suffix(".cost.json"), {}).get(
                "cpu", UNRECORDED_CPU
            ),
            "runs": inits,
            "distance_to_base": auxiliary_distances(results),
            "accuracies": list(diagnosis.accuracies),
            "pairs": [
                {
                    "runs": [inits[p.a], inits[p.b]],
                    "ratio_error": p.ratio_error,
                    "barrier": p.barrier,
                    "path_accuracies": list(p.path_accuracies),
                }
                for p in diagnosis.pairs
            ],
        },
    )


def draw_diagnoses() -> None:
    """The figure of each stored diagnosis of DIAGNOSED_DOMAIN, drawn from its JSON: the figure follows the
    product's drawing without retraining the runs."""
    from ratatouille_hub.figures import plot_paths

    for stored in DURABLE.glob(f"trial*/diagnose-{DIAGNOSED_DOMAIN}.json"):
        figure = RESULTS / f"pacs-diagnose-{DIAGNOSED_DOMAIN}-{stored.parent.name}.png"
        plot_paths(stored_diagnosis(json.loads(stored.read_text())), figure)


def stored_diagnosis(record: dict):
    """A diagnosis saved by diagnose_domain, read back: its runs named as the soup card names them, its pairs
    in the order diagnose measured them (every pair, in turn)."""
    from itertools import combinations

    from ratatouille_hub.diagnostics import Diagnosis, PairDiagnosis

    inits = record["runs"]
    pairs = []
    for (a, b), pair in zip(combinations(range(len(inits)), 2), record["pairs"], strict=True):
        if pair["runs"] != [inits[a], inits[b]]:
            raise ValueError(f"the stored pair {pair['runs']} is not runs {a} and {b} of {inits}")
        pairs.append(PairDiagnosis(a, b, pair["ratio_error"], tuple(pair["path_accuracies"])))
    names = tuple(f"run {i} from {_short(init)}" for i, init in enumerate(inits))
    return Diagnosis(names, tuple(record["accuracies"]), tuple(pairs))


def auxiliary_distances(results: Results) -> dict[str, float]:
    """How far inter-training moved each recycled featurizer: ||w - w_base|| / ||w_base|| (vetting.py)."""
    from ratatouille_hub.discovery import head_names_of, local_signature
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.vetting import distance_to_base

    base, *aux = (resolve_model(i.source, i.revision) for i in results.ingredients)
    signature, heads = local_signature(base.path), head_names_of(base.path / "config.json")
    return {a.source: distance_to_base(base, a, signature, heads) for a in aux}


# -- report ------------------------------------------------------------------------------------------


def report() -> None:
    trials = sorted(int(p.name.removeprefix("trial")) for p in DURABLE.glob("trial*") if p.is_dir())
    table: dict[str, dict[str, list[float]]] = {row.name: {d: [] for d in DOMAINS} for row in ROWS}
    val_table: dict[str, dict[str, list[float]]] = {row.name: {d: [] for d in DOMAINS} for row in ROWS}
    complete_trials, costs, chosen_runs, diversity, best_at_last, hub_style, cpus = [], {}, {}, {}, {}, {}, {}
    for trial in trials:
        cpus[trial] = cpus_of(trial)
        cells = {
            (d, c): load_results(cell_path(trial, d, c))
            for d in DOMAINS
            for c in (*STRATEGIES, *(h.name for h in HUB_STYLE_CELLS))
        }
        if not all(cells[(d, c)] for d in DOMAINS for c in STRATEGIES):
            continue  # only complete trials enter the tables: a partial one would weigh some domains more
        complete_trials.append(trial)
        for row in ROWS:
            for domain in DOMAINS:
                table[row.name][domain].append(row.scores_of(cells[(domain, row.cell)]).test_accuracy)
                val_table[row.name][domain].append(row.scores_of(cells[(domain, row.cell)]).val_accuracy)
        costs[trial] = {row.name: row_cost(trial, row, cells) for row in ROWS}
        chosen_runs[trial] = {
            row.name: {d: runs_of_row(row, cells[(d, row.cell)]) for d in DOMAINS}
            for row in ROWS
            if row.name in CHOSEN_RUN_ROWS
        }
        diversity[trial] = {
            d: {c: pair_summary(cells[(d, c)]) for c in ("soup", "ratatouille", "hub-style") if cells.get((d, c))}
            for d in DOMAINS
        }
        best_at_last[trial] = best_at_last_summary([cells[(d, c)] for d in DOMAINS for c in STRATEGIES])
        made = {(d, c.name) for d in DOMAINS for c in HUB_STYLE_CELLS if cells[(d, c.name)]}
        if trial in HUB_STYLE_TRIALS and made:  # its cells run after the three trials: none before
            hub_style[trial] = {
                d: {
                    c.name: hub_style_summary(cells[(d, c.name)], cell_path(trial, d, c.name))
                    for c in HUB_STYLE_CELLS
                    if (d, c.name) in made
                }
                for d in DOMAINS
                if any(domain == d for domain, _ in made)
            }
    summary = {
        row: {d: _stats(values) for d, values in by_domain.items()} | {"average": _average_stats(by_domain)}
        for row, by_domain in table.items()
    }
    diagnoses = {
        f"{p.parent.name}/{p.stem}": load_json(p, None) for p in sorted(DURABLE.glob("trial*/diagnose-*.json"))
    }
    payload = {
        "protocol": protocol(),
        "trials": trials,
        "complete_trials": complete_trials,
        "test_accuracy": summary,
        "test_accuracy_per_trial": table,
        "val_accuracy_per_trial": val_table,
        "goal": goal(table),
        "cost_per_trial": costs,
        "chosen_runs_per_trial": chosen_runs,
        "diversity": diversity,
        "best_at_last_evaluation": best_at_last,
        "ingredients": load_json(DURABLE / "ingredients.json", {}),
        "hub_style": hub_style,
        "diagnose": diagnoses,
        "timings_s": load_json(DURABLE / "timings.json", {}),
        "cells_per_cpu": cpus,
        "cpu_of_trial": {t: cpu_of_trial(t) for t in complete_trials},
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_kind(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_json(RESULTS / "pacs.json", payload)
    draw_diagnoses()
    (RESULTS / "pacs.md").write_text(markdown(payload))
    print((RESULTS / "pacs.md").read_text())


def load_results(path: Path) -> Results | None:
    from ratatouille_hub.results import Results

    if not path.exists():
        return None
    plain = json.loads(path.read_text())
    results = Results.from_dict(plain)
    if "best_recycled_run" not in plain:  # kept before results named it (the 64 px trials): derived alike
        results = replace(results, best_recycled_run=best_recycled_run(results))
    return results


def best_recycled_run(results: Results):
    """What assembly records as `best_recycled_run`, from a results record that does not say which runs were
    recycled: the first in assembly's order among the runs whose init is not the recipe's base (its first
    ingredient)."""
    from ratatouille_hub.recipe.assembly import rank_by_validation
    from ratatouille_hub.results import BestRun

    for index in rank_by_validation([run.val_accuracy for run in results.runs]):
        run = results.runs[index]
        if is_recycled(results, run):
            scores = {"val_accuracy": run.val_accuracy, "val_accuracy_per_domain": run.val_accuracy_per_domain}
            return BestRun(index=index, test_accuracy=run.test_accuracy, **scores)
    return None


def is_recycled(results: Results, run) -> bool:
    """Whether `run` starts from another checkpoint than the recipe's base (its first ingredient); read from
    the init, since results kept before runs said so (the 64 px trials) do not."""
    from ratatouille_hub.fetch import split_revision

    return split_revision(run.init)[0] != results.ingredients[0].source


def runs_of_row(row: Row, results: Results) -> list[str]:
    """The runs a row's model is made of, each as `run <index> (<init>)`: the one kept, or greedy's."""
    scores = row.scores_of(results)
    indices = scores.members if hasattr(scores, "members") else [scores.index]
    return [f"run {i} ({_init_name(results, results.runs[i])})" for i in indices]


def _init_name(results: Results, run) -> str:
    from ratatouille_hub.fetch import split_revision

    kind, source = _init_kind(results, run), split_revision(run.init)[0]
    if kind == "fused":  # fusion:<key>@fused:<key>
        return "fused " + source.removeprefix("fusion:").split("@")[0]
    return kind if kind == "base" else _short(source)


def cpu_of_trial(trial: int) -> str:
    """The kind of CPU all of a trial's table cells (every domain and strategy; not the Trainer group's) ran on,
    "mixed CPUs" if they did not share one."""
    kinds = {
        load_json(cell_path(trial, d, c).with_suffix(".cost.json"), {}).get("cpu", UNRECORDED_CPU)
        for d in DOMAINS
        for c in STRATEGIES
    }
    return kinds.pop() if len(kinds) == 1 else "mixed CPUs"


def cell_cost(output: Path, plan) -> dict:
    """What a cell's runs (of one test domain's plan) cost as their run folders recorded them, its linear
    probe, and the CPU they ran on: kept beside the cell's results, since the run folders stay behind in the
    session's scratch."""
    runs = []
    for spec in plan.runs:
        metrics = json.loads((output / spec.folder / "metrics.json").read_text())
        runs.append({"steps": spec.steps + spec.warmup_steps, "seconds": metrics.get("seconds")})
    probe = json.loads((output / plan.lp.folder / "metrics.json").read_text()).get("seconds")
    return {"runs": runs, "linear_probe_seconds": probe or 0, "cpu": cpu_kind()}


def cpus_of(trial: int) -> dict[str, int]:
    """How many of the trial's kept cells ran on each kind of CPU."""
    counts: dict[str, int] = {}
    for path in sorted((DURABLE / f"trial{trial}").glob("*.cost.json")):
        cpu = load_json(path, {}).get("cpu", UNRECORDED_CPU)
        counts[cpu] = counts.get(cpu, 0) + 1
    return counts


def row_cost(trial: int, row: Row, cells: dict) -> dict:
    """What a row cost over the 4 test domains: its runs, their optimisation steps, and the seconds of those
    runs and of the shared linear probe (shared runs counted in full for every row that uses them; the
    ingredients are recycled, so not counted)."""
    runs = steps = seconds = 0.0
    for domain in DOMAINS:
        cost = load_json(cell_path(trial, domain, row.cell).with_suffix(".cost.json"), None)
        results = cells[(domain, row.cell)]
        if len(cost["runs"]) != len(results.runs):
            raise ValueError(f"trial {trial}, {domain}-{row.cell}: the cost and the results list other runs")
        seconds += cost["linear_probe_seconds"]
        for run, recorded in zip(cost["runs"], results.runs, strict=True):
            if row.recycled_only and not is_recycled(results, recorded):
                continue
            runs += 1
            steps += run["steps"]
            seconds += math.nan if run["seconds"] is None else run["seconds"]
    return {"runs": int(runs), "steps": int(steps), "seconds": seconds}


def pair_summary(results: Results) -> dict:
    """Recycle's own diagnostics (the best run against each other run, training-domain validation)."""
    pairs = results.diagnostics
    return {
        "pairs": len(pairs),
        "ratio_error": statistics.fmean(p.ratio_error for p in pairs),
        "barrier": statistics.fmean(p.barrier for p in pairs),
        "max_barrier": max(p.barrier for p in pairs),
    }


def best_at_last_summary(cells: list[Results]) -> dict[str, list[int]]:
    """How many of a trial's distinct runs (shared ones once), by kind of init, scored their best validation at
    their last evaluation, out of how many: those had not peaked when they stopped."""
    seen, counts = set(), {}
    for results in cells:
        for run in results.runs:
            if (results.test_domain, run.folder) in seen:
                continue
            seen.add((results.test_domain, run.folder))
            kind = _init_kind(results, run)
            last, total = counts.get(kind, [0, 0])
            counts[kind] = [last + (run.best_step == results.recipe["steps"]), total + 1]
    return counts


def _init_kind(results: Results, run) -> str:
    """Which kind of init a run starts from: the base, a fused one, or a recycled fine-tune."""
    from ratatouille_hub.fetch import split_revision

    if not is_recycled(results, run):
        return "base"
    return "fused" if split_revision(run.init)[0].startswith("fusion:") else "recycled"


def hub_style_summary(results: Results, path: Path) -> dict:
    inits = [run.init.split("@")[0] for run in results.runs]
    return {
        "bn_policy": results.bn_policy,
        "printed": load_json(path.with_suffix(".cost.json"), {}).get("printed", []),
        "runs": [
            {"init": init, "val_accuracy": run.val_accuracy, "test_accuracy": run.test_accuracy}
            for init, run in zip(inits, results.runs, strict=True)
        ],
        "averages": {
            name: {
                "val_accuracy": a.val_accuracy,
                "test_accuracy": a.test_accuracy,
                "members": [inits[m] for m in a.members],
            }
            for name, a in results.averages.items()
        },
        "ensemble": {"val_accuracy": results.ensemble.val_accuracy, "test_accuracy": results.ensemble.test_accuracy},
        "pairs": [
            {"runs": [inits[i] for i in p.runs], "ratio_error": p.ratio_error, "barrier": p.barrier}
            for p in results.diagnostics
        ],
    }


# The paper's gains of Ratatouille uniform over each baseline on PACS (docs/method.md: 89.5 against 85.9, 88.7,
# 89.0 and 88.0).
GOAL = {"ERM (LP init)": 0.036, "Soups, uniform": 0.008, "Inter-training": 0.005, "Fusing": 0.015}


def goal(table: dict[str, dict[str, list[float]]]) -> dict:
    """Ratatouille uniform minus each baseline on the PACS average, trial by trial (paired), against the
    paper's gain."""
    ours = _per_trial_average(table["Ratatouille, uniform"])
    verdicts = {}
    for baseline, target in GOAL.items():
        gains = [a - b for a, b in zip(ours, _per_trial_average(table[baseline]), strict=True)]
        stats = _stats(gains)
        verdicts[baseline] = {"paper_gain": target, "gain": stats, "met": stats is not None and stats["mean"] >= target}
    return verdicts


def _per_trial_average(by_domain: dict[str, list[float]]) -> list[float]:
    n = min(len(v) for v in by_domain.values())
    return [statistics.fmean(by_domain[d][t] for d in DOMAINS) for t in range(n)]


def _stats(values: list[float]) -> dict | None:
    from ratatouille_hub.sweep import mean_and_stderr

    return mean_and_stderr(values) if values else None


def _average_stats(by_domain: dict[str, list[float]]) -> dict | None:
    """Mean over the 4 test domains, per trial; then mean and s.e. over the trials."""
    return _stats(_per_trial_average(by_domain))


def _cell(stats: dict | None, scale: float = 100) -> str:
    if stats is None:
        return "-"
    text = f"{scale * stats['mean']:.1f}"
    if stats["stderr"] is not None:
        text += f" ± {scale * stats['stderr']:.1f}"
    return text


def _short(repo_id: str) -> str:
    return repo_id.split("/")[-1].removeprefix("efficientnet-lite0-")


def markdown(payload: dict) -> str:
    complete = payload["complete_trials"]
    lines = [
        "# PACS: Model Ratatouille and its baselines, EfficientNet-Lite0, 2 CPU cores",
        "",
        "Generated by `benchmarks/pacs.py` (`make bench-pacs`); numbers in `pacs.json`.",
        "",
        protocol(),
        f"Complete trials: {', '.join(map(str, complete)) or 'none'} (started: {', '.join(map(str, payload['trials'])) or 'none'}). "
        "Held-out domain accuracy (%), mean ± standard error over the complete trials; model selection on "
        "training-domain validation only. Cost: per trial (all 4 test domains), the runs a row needs, their "
        "steps, and the seconds of those runs and of the linear probe as their folders recorded them (runs "
        "shared between rows are counted in each; the recycled fine-tunes are not), averaged over the complete "
        "trials made on each kind of CPU (the cores were at times shared with other work: upper bounds).",
        "",
    ]
    costs, cpu_of = payload["cost_per_trial"], payload["cpu_of_trial"]
    kinds = list(dict.fromkeys(cpu_of.values()))  # in the order the trials ran
    per_kind = {kind: [t for t in costs if cpu_of[t] == kind] for kind in kinds}
    seconds_header = "".join(f" seconds, {kind} ({_trials(per_kind[kind])}) |" for kind in kinds) or " seconds |"
    lines += [
        "| method | " + " | ".join(DOMAINS) + " | average | runs | steps |" + seconds_header,
        "|---|" + "---|" * (len(DOMAINS) + 3 + max(1, len(kinds))),
    ]
    for row, stats in payload["test_accuracy"].items():
        cost = [costs[t][row] for t in costs]
        spent = (
            f"{cost[0]['runs']} | {cost[0]['steps']} |"
            + "".join(f" {statistics.fmean(costs[t][row]['seconds'] for t in per_kind[kind]):.0f} |" for kind in kinds)
            if cost
            else "- | - | - |"
        )
        lines.append(f"| {row} | " + " | ".join(_cell(stats[d]) for d in (*DOMAINS, "average")) + f" | {spent}")
    where = payload.get("cells_per_cpu", {})
    if where:
        ran = "; ".join(
            f"trial {t}: " + ", ".join(f"{cpu} ({n} cell{'s' if n != 1 else ''})" for cpu, n in counts.items())
            for t, counts in where.items()
        )
        lines += ["", f"Where the kept cells ran (2 cores each): {ran}."]
    lines += ["", "## The goal: the paper's gains on the PACS average", ""]
    for baseline, verdict in payload["goal"].items():
        gain = verdict["gain"]
        if gain is None:
            lines.append(f"- Ratatouille uniform minus {baseline}: no complete trial yet.")
            continue
        close = gain["stderr"] is not None and abs(gain["mean"] - verdict["paper_gain"]) <= gain["stderr"]
        lines.append(
            f"- Ratatouille uniform minus {baseline}: {_cell(gain)} points (paired over trials; the paper: "
            f"+{100 * verdict['paper_gain']:.1f}): {'met' if verdict['met'] else 'not met'} on the mean"
            + ("; the paper's gain is within one standard error" if close else "")
            + "."
        )
    lines += _chosen_runs_section(payload["chosen_runs_per_trial"])
    lines += _ingredients_section(payload["ingredients"])
    lines += _diversity_section(payload["diversity"])
    lines += _best_at_last_section(payload["best_at_last_evaluation"])
    lines += _hub_style_section(payload["hub_style"])
    lines += _diagnose_section(payload["diagnose"])
    timings = payload["timings_s"]
    if timings:
        lines += [
            "",
            "## Wall time of each stage (s, 2 cores; other work may have shared the cores)",
            "",
            "Measured by the process that finished the stage: a stage resumed after a restart counts only "
            "what was left of it; a cell counts only the runs no earlier cell of its trial and domain trained.",
            "",
            "| stage | seconds |",
            "|---|---|",
            *(f"| {k} | {v:.0f} |" for k, v in timings.items()),
            f"| total | {sum(timings.values()):.0f} |",
        ]
    return "\n".join(lines) + "\n"


def _trials(trials: list[int]) -> str:
    return f"trial {trials[0]}" if len(trials) == 1 else "trials " + ", ".join(map(str, trials))


def _chosen_runs_section(chosen: dict) -> list[str]:
    if not chosen:
        return []
    lines = [
        "",
        "## Which runs each row is",
        "",
        "The run each single-model row kept (by training-domain validation) and the runs greedy averaged, by "
        "index in their cell and init (`base`, or the recycled fine-tune); the uniform, Model Stock, "
        "interpolated and ensemble rows use every run of their cell. Inter-training is the best run by "
        "validation among the Ratatouille cell's runs from recycled inits.",
        "",
        "| trial | test domain | " + " | ".join(CHOSEN_RUN_ROWS) + " |",
        "|---|---|" + "---|" * len(CHOSEN_RUN_ROWS),
    ]
    for trial, by_row in chosen.items():
        for domain in DOMAINS:
            lines.append(
                f"| {trial} | {domain} | " + " | ".join(", ".join(by_row[r][domain]) for r in CHOSEN_RUN_ROWS) + " |"
            )
    return lines


def _ingredients_section(ingredients: dict) -> list[str]:
    if not ingredients:
        return []
    rebuilt = sorted({cpu for entry in ingredients.values() for cpu in entry.get("rebuilt_on", {})})
    lines = [
        "",
        "## The ingredients (made once per session, recycled by every trial)",
        "",
        "Distance: ||w - w_base|| / ||w_base|| over the backbone's kernels (vetting's measure; vetting refuses "
        "above 1.0). Accuracy: on 1000 of the fine-tune's own training images. Built on: the CPU of the first "
        "build; a session on another kind of CPU rebuilds them from the same seeds with other bytes (other float "
        "rounding), and its trials recycle that rebuild (its columns).",
        "",
        "| fine-tune | how | built on | distance to the base | accuracy on its training images |"
        + "".join(f" rebuilt on {cpu}: distance, accuracy |" for cpu in rebuilt),
        "|---|---|---|---|---|" + "---|" * len(rebuilt),
    ]
    for repo_id, entry in ingredients.items():
        again = [entry.get("rebuilt_on", {}).get(cpu) for cpu in rebuilt]
        lines.append(
            f"| {repo_id} | {_how(entry)} | {entry.get('cpu', UNRECORDED_CPU)} | {entry['distance_to_base']:.3f} | "
            f"{100 * entry['train_accuracy']:.1f} |"
            + "".join(
                f" {b['distance_to_base']:.3f}, {100 * b['train_accuracy']:.1f} |" if b else " - |" for b in again
            )
        )
    return lines


def _how(entry: dict) -> str:
    hparams = entry["hparams"]
    if "optimizer" in hparams:
        return f"Trainer, lr {hparams['lr']:g}, BN in train mode"
    return f"intertrain, lr {hparams['lr']:g}, wd {hparams['weight_decay']:g}, dropout {hparams['dropout']:g}"


def _diversity_section(diversity: dict) -> list[str]:
    if not diversity:
        return []
    lines = [
        "",
        "## Diversity and averageability of the runs (recycle's own diagnostics)",
        "",
        "Each recycle compares its best run (by validation) with every other run on training-domain "
        "validation. Ratio-error: errors made by one run only / errors made by both (higher: more diverse). "
        "Barrier: the largest dip of accuracy on the straight weight path below the line between the ends, "
        "points (0: the two average freely).",
        "",
        "| trial | test domain | Soups runs: ratio-error, barrier | Ratatouille runs: ratio-error, barrier | with the Trainer group: ratio-error, barrier (max) |",
        "|---|---|---|---|---|",
    ]
    for trial, per_domain in diversity.items():
        for domain, by_cell in per_domain.items():
            cells = [by_cell.get(c) for c in ("soup", "ratatouille", "hub-style")]
            text = [
                "-"
                if s is None
                else f"{s['ratio_error']:.2f}, {100 * s['barrier']:.1f}"
                + (f" ({100 * s['max_barrier']:.1f})" if c == "hub-style" else "")
                for c, s in zip(("soup", "ratatouille", "hub-style"), cells, strict=True)
            ]
            lines.append(f"| {trial} | {domain} | " + " | ".join(text) + " |")
    return lines


def _best_at_last_section(counts_of_trial: dict) -> list[str]:
    if not counts_of_trial:
        return []
    kinds = ("base", "recycled", "fused")
    lines = [
        "",
        "## Had the runs peaked?",
        "",
        f"Runs (each counted once, however many rows share it) whose best validation was at their last evaluation, "
        f"fine-tuning step {STEPS} (evaluated every {EVAL_EVERY} steps; runs from a recycled or fused init first had "
        f"{WARMUP} head-only warm-up steps, not evaluated; a tie keeps the earlier step), out of all runs, by init: "
        "these had not peaked when they stopped.",
        "",
        "| trial | from the base | from a recycled fine-tune | from a fused init | all |",
        "|---|---|---|---|---|",
    ]
    last = total = 0
    for trial, by_kind in counts_of_trial.items():
        counts = [by_kind.get(k, [0, 0]) for k in kinds]
        counts.append([sum(c[0] for c in counts), sum(c[1] for c in counts)])
        lines.append(f"| {trial} | " + " | ".join(f"{a} of {b}" for a, b in counts) + " |")
        last, total = last + counts[-1][0], total + counts[-1][1]
    return [*lines, "", f"In all, {last} of {total} runs had not peaked by their last evaluation."]


def _hub_style_section(hub_style: dict) -> list[str]:
    if not hub_style:
        return []
    lines = [
        "",
        "## The Trainer group: fine-tunes made the way most Hub fine-tunes are",
        "",
        "A Ratatouille of the same runs plus one run from each Trainer fine-tune, assembled with each "
        "BatchNorm policy. Held-out accuracy (%); greedy's soup names the runs it kept by their init.",
        "",
        "| trial | test domain | BN policy | uniform | greedy | Model Stock | ensemble | runs from Trainer fine-tunes: val / test | greedy kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for trial, per_domain in hub_style.items():
        for domain, by_cell in per_domain.items():
            for summary in by_cell.values():
                averages = summary["averages"]
                trainer = [r for r in summary["runs"] if r["init"].endswith("-trainer")]
                lines.append(
                    f"| {trial} | {domain} | {summary['bn_policy']} | "
                    + " | ".join(
                        f"{100 * averages[m]['test_accuracy']:.1f}" for m in ("uniform", "greedy", "model-stock")
                    )
                    + f" | {100 * summary['ensemble']['test_accuracy']:.1f} | "
                    + ", ".join(f"{100 * r['val_accuracy']:.1f} / {100 * r['test_accuracy']:.1f}" for r in trainer)
                    + " | "
                    + ", ".join(_short(m) for m in averages["greedy"]["members"])
                    + " |"
                )
    trial, domain, first = next(
        (
            (t, d, c)
            for t, per_domain in hub_style.items()
            for d, by_cell in per_domain.items()
            for c in by_cell.values()
        ),
        (None, None, None),
    )
    if first and first["printed"]:
        lines += [
            "",
            "What the product printed about them (vetting, greedy's choice, the barriers), trial "
            f"{trial}, test domain {domain}, BN policy {first['bn_policy']}:",
            "",
            "```text",
            *first["printed"],
            "```",
        ]
    return lines


def _diagnose_section(diagnoses: dict) -> list[str]:
    from ratatouille_hub.diagnostics import evenly_spaced

    lines = []
    for name, diagnosis in diagnoses.items():
        if diagnosis is None:
            continue
        trial = name.split("/")[0].removeprefix("trial")
        lines += [
            "",
            f"## Diagnose: every pair of the Ratatouille runs, trial {trial}, test domain {diagnosis['domain']}",
            "",
            "Training-domain validation. Ratio-error: errors made by one run only / errors made by both (diversity). "
            "Barrier: the largest dip of accuracy on the straight weight path below the line between the ends."
            + _retrained_elsewhere(diagnosis),
            "",
            "| run | init | validation accuracy | init's distance to the base |",
            "|---|---|---|---|",
            *(
                f"| {i} | {init} | {100 * acc:.1f} | {_distance(diagnosis, init)} |"
                for i, (init, acc) in enumerate(zip(diagnosis["runs"], diagnosis["accuracies"]))
            ),
            "",
            "| pair | ratio-error | barrier (points) | accuracy along the path at t = "
            + ", ".join(f"{t:g}" for t in evenly_spaced(len(diagnosis["pairs"][0]["path_accuracies"])))
            + " |",
            "|---|---|---|---|",
            *(
                f"| {p['runs'][0]} / {p['runs'][1]} | {p['ratio_error']:.2f} | {100 * p['barrier']:.1f} | "
                + ", ".join(f"{100 * a:.1f}" for a in p["path_accuracies"])
                + " |"
                for p in diagnosis["pairs"]
            ),
        ]
    pngs = sorted(RESULTS.glob("pacs-diagnose-*.png"))
    if pngs:
        lines += ["", *(f"![weight paths, barriers and diversity of the runs]({p.name})" for p in pngs)]
    return lines


def _retrained_elsewhere(diagnosis: dict) -> str:
    cpu, cell_cpu = diagnosis.get("cpu", UNRECORDED_CPU), diagnosis.get("cell_cpu", UNRECORDED_CPU)
    if cpu == cell_cpu:
        return ""
    return (
        f" The runs were retrained on an {cpu} for this diagnosis; the table's cell ran on an {cell_cpu}: the same "
        "recipe and seeds, other float rounding, so these are close to the table's runs, not the same bytes."
    )


def _distance(diagnosis: dict, init: str) -> str:
    distance = diagnosis.get("distance_to_base", {}).get(init)
    return "0 (the base)" if distance is None else f"{distance:.3f}"


def load_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def save_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
