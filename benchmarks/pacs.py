"""PACS benchmark: every method of METHOD.md side by side, on real images, through the local Hub.

    python benchmarks/pacs.py [--trial 0] [--domains art_painting cartoon photo sketch]

One command runs the whole table from scratch, and resumes where it stopped:
1. a local Hub (benchmarks/scratch/pacs/hub) is seeded with the real base (EfficientNet-Lite0, ImageNet)
   and PACS as `flwrlabs/pacs`, both read from ../shared (never copied into the repository);
2. `intertrain` fine-tunes the base on each auxiliary dataset (caltech101, clothing, cifar10) and pushes
   the results to the Hub with community-style cards;
3. for each test domain, `recycle --base <hub base> --target PACS` runs every strategy (erm, soup,
   ratatouille, fusing): it discovers the fine-tunes on the Hub, downloads them at pinned revisions,
   shares the linear probe and the runs between strategies, merges and evaluates;
4. the table goes to benchmarks/results/pacs.json and pacs.md, with diagnose figures for one domain.

Each stage is a folder with a `done` marker (the project's own run folders), so a rerun skips finished
work. The command applies the malloc settings of ../shared/STACK.md itself (ratatouille_hub/allocator.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from ratatouille_hub.results import Results

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
WORK = ROOT / "benchmarks" / "scratch" / "pacs"
RESULTS = ROOT / "benchmarks" / "results"
BASE_FOLDER = SHARED / "models" / "efficientnet-lite0-imagenet"
BASE_ID = "bench/efficientnet-lite0-imagenet"
PACS_FOLDER = SHARED / "data" / "pacs"
AUX_DATASETS = ("caltech101", "clothing", "cifar10")
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
STRATEGIES = ("erm", "soup", "ratatouille", "fusing")
DIAGNOSED_DOMAIN = "art_painting"

# The scaled-down protocol (written at the top of pacs.md; see PROTOCOL below).
IMAGE_SIZE = 128
AUX_RUNS, AUX_STEPS, AUX_BATCH = 4, 1000, 32  # the paper's 4 per dataset; 300 steps moved them 1.5-1.9%
RUNS = 4
STEPS, EVAL_EVERY, WARMUP, BATCH = 200, 50, 50, 16
LP_STEPS = 5001

ROWS = (  # (row, strategy whose results hold it, the scores in its results record)
    ("ERM (LP init)", "erm", lambda r: r.soup),
    ("Soups, uniform", "soup", lambda r: r.averages["uniform"]),
    ("Soups, greedy", "soup", lambda r: r.averages["greedy"]),
    ("Inter-training", "ratatouille", lambda r: r.best_run),
    ("Fusing", "fusing", lambda r: r.soup),
    ("Ratatouille, uniform", "ratatouille", lambda r: r.averages["uniform"]),
    ("Ratatouille, greedy", "ratatouille", lambda r: r.averages["greedy"]),
    ("Ensemble (of the Ratatouille runs)", "ratatouille", lambda r: r.ensemble),
)

PROTOCOL = f"""\
Protocol (what is scaled down from METHOD.md, and why). One trial of the full table must fit in about
3 hours of 2 CPU cores (no GPU), where METHOD.md's budget is 20 runs x 5001 steps at 224 px per test
domain on GPUs: about 500x more compute. Kept as in METHOD.md: DomainBed leave-one-domain-out, 80/20
train/validation split per training domain (seeded by trial), model selection on training-domain
validation only, the shared linear probe ({LP_STEPS} steps, lr 5e-5, on frozen features), a head-only
warm-up then a fresh Adam for runs from recycled or fused inits, frozen BatchNorm statistics, feature
dropout, per-run hparams drawn from {{1e-5, 3e-5, 5e-5}} x {{1e-4, 1e-6}} x {{0, 0.1, 0.5}} (run 0: defaults),
best step by validation, uniform and greedy averaging, DomainBed augmentation. Scaled down:
- backbone: EfficientNet-Lite0 (ImageNet, 4.7M parameters), the only real ImageNet backbone offline
  here, instead of ResNet-50; so absolute numbers are not comparable with the paper's, only orderings;
- resolution {IMAGE_SIZE} px (the PACS copy's native size) instead of 224;
- {RUNS} runs per strategy instead of 20: ERM and soups from the base; Ratatouille = 1 run from the base
  + 1 from each of the {len(AUX_DATASETS)} auxiliary fine-tunes (paper: 4 + 16); Fusing = {RUNS} runs;
- {STEPS} steps per run instead of 5001, {BATCH} images per training domain per step instead of 32,
  validation every {EVAL_EVERY} steps, head-only warm-up {WARMUP} steps instead of 200;
- auxiliary fine-tunes: {AUX_RUNS} runs per dataset (as the paper), hparams drawn as for target runs, of
  {AUX_STEPS} steps x {AUX_BATCH} images (METHOD.md: 5001), on
  caltech101 (PACS-overlapping classes removed), clothing and cifar10 (upsampled from 32 px) instead of
  the other DomainBed datasets;
- channels-last memory layout (1.4-2x faster on CPU; equal up to float rounding); fp32 throughout.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", type=int, default=0, help="trial seed: data splits, runs (default: 0)")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS), help="test domains to run")
    parser.add_argument("--report-only", action="store_true", help="rebuild pacs.json/pacs.md from finished results")
    parser.add_argument(
        "--ingredients-only", action="store_true", help="make and push the auxiliary fine-tunes, then stop"
    )
    args = parser.parse_args()
    from ratatouille_hub.allocator import tune_allocator

    tune_allocator()  # what the command does at start-up: PyTorch on CPU is 2-5x slower without it
    if not args.report_only:
        run_trial(args.trial, args.domains, ingredients_only=args.ingredients_only)
    if not args.ingredients_only:
        report()


def run_trial(trial: int, domains: list[str], ingredients_only: bool = False) -> None:
    from ratatouille_hub.localhub.server import LocalHub, hub_environment

    WORK.mkdir(parents=True, exist_ok=True)
    with LocalHub(WORK / "hub") as hub:
        # Before any HF library is imported: they read these once, at import time.
        os.environ.update(hub_environment(hub.url, WORK / "hf-home"))
        os.environ.pop("HF_TOKEN", None)
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        seed_hub(hub)
        timings = load_json(WORK / "timings.json", {})
        aux_ids = intertrain_auxiliaries(timings) + trainer_finetunes(timings)
        if ingredients_only:
            print(f"auxiliary fine-tunes on the local Hub: {', '.join(aux_ids)}")
            return
        for domain in domains:
            for strategy in STRATEGIES:
                run_cell(trial, domain, strategy, timings)
        diagnose_domain(trial, DIAGNOSED_DOMAIN if DIAGNOSED_DOMAIN in domains else domains[0])
        print(f"auxiliary fine-tunes on the local Hub: {', '.join(aux_ids)}")


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


def intertrain_auxiliaries(timings: dict) -> list[str]:
    """One fine-tune of the base per auxiliary dataset, pushed to the Hub as a community checkpoint."""
    from ratatouille_hub.config import IntertrainConfig
    from ratatouille_hub.intertrain import intertrain
    from ratatouille_hub.publish import push_folder

    ids = []
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
        started = time.time()
        folders = intertrain(config)  # resumable: each finished fine-tune is reused
        key = f"intertrain/{name}x{AUX_RUNS}x{AUX_STEPS}"
        if key not in timings:
            timings[key] = round(time.time() - started, 1)
            save_json(WORK / "timings.json", timings)
        for run, folder in enumerate(folders):
            repo_id = f"bench/efficientnet-lite0-{name}-{run}"
            push_folder(folder, repo_id)
            ids.append(repo_id)
    return ids


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


TRAINER_LR, TRAINER_STEPS, TRAINER_BATCH = 3e-4, AUX_STEPS, AUX_BATCH  # 6x the recipe's lr, AdamW, BN training


def trainer_finetunes(timings: dict) -> list[str]:
    """One fine-tune per auxiliary dataset made the way most Hub fine-tunes are: transformers' Trainer with
    its defaults (AdamW, linear decay, the model in train mode, so BatchNorm statistics move), a larger
    learning rate, no augmentation; pushed under another user with a community card (base_model: finetune)."""
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import Trainer, TrainingArguments

    from ratatouille_hub.data import decode_images, label_names_of, normalization_of, resolution_of
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.io import DONE, staged_folder
    from ratatouille_hub.models import load_classifier, load_processor, serving_processor
    from ratatouille_hub.publish import push_folder
    from ratatouille_hub.sources import load_dataset_source

    base = resolve_model(BASE_ID)
    processor = load_processor(base.path, base.source)
    size, normalize = resolution_of(processor, IMAGE_SIZE), normalization_of(processor)
    ids = []
    for name in AUX_DATASETS:
        repo_id = f"community/efficientnet-lite0-{name}-trainer"
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
            card = ModelCard(
                f"---\n{ModelCardData(base_model=BASE_ID, base_model_relation='finetune', datasets=[name], pipeline_tag='image-classification', library_name='transformers').to_yaml()}\n---\n"
                f"# {BASE_ID} fine-tuned on {name}\n\nTrainer, lr {TRAINER_LR}, {TRAINER_STEPS} steps of {TRAINER_BATCH}.\n"
            )
            with staged_folder(folder) as staging:
                model.save_pretrained(staging)
                serving_processor(model, size, normalize).save_pretrained(staging)
                card.save(staging / "README.md")
                (staging / DONE).touch()
            timings[f"trainer/{name}x{TRAINER_STEPS}"] = round(time.time() - started, 1)
            save_json(WORK / "timings.json", timings)
        push_folder(folder, repo_id)
        ids.append(repo_id)
    return ids


def cell_path(trial: int, domain: str, strategy: str) -> Path:
    return WORK / f"trial{trial}" / "results" / f"{domain}-{strategy}.json"


def run_cell(trial: int, domain: str, strategy: str, timings: dict) -> None:
    """`recycle --base <hub base> --target PACS --strategy S` for one test domain (skipped when finished)."""
    from ratatouille_hub.config import RecipeConfig
    from ratatouille_hub.recipe import recycle

    destination = cell_path(trial, domain, strategy)
    if destination.exists():
        return
    print(f"\n== trial {trial}, test domain {domain}, strategy {strategy}", flush=True)
    config = RecipeConfig(
        base=BASE_ID,
        target="PACS",
        test_domain=domain,
        strategy=strategy,
        runs=RUNS,
        steps=STEPS,
        eval_every=EVAL_EVERY,
        lp_steps=LP_STEPS,
        warmup_steps=WARMUP,
        batch_size=BATCH,
        image_size=IMAGE_SIZE,
        seed=trial,
        output=str(WORK / f"trial{trial}" / domain),
    )
    started = time.time()
    results = recycle(config, echo=lambda line: print(line, flush=True))
    timings[f"trial{trial}/{domain}/{strategy}"] = round(time.time() - started, 1)
    save_json(WORK / "timings.json", timings)
    if strategy == "ratatouille":
        shutil.copyfile(Path(config.output) / "soup" / "diagnostics.png", destination.with_suffix(".png"))
    results.save(destination)


def diagnose_domain(trial: int, domain: str) -> None:
    """The three criteria on every pair of the Ratatouille runs of one test domain (validation only)."""
    from ratatouille_hub.config import RecipeConfig
    from ratatouille_hub.diagnose import diagnose_models, format_diagnosis, plot_paths

    destination = WORK / f"trial{trial}" / "results" / f"diagnose-{domain}.json"
    if destination.exists():
        return
    results = Results.load(cell_path(trial, domain, "ratatouille"))
    output = WORK / f"trial{trial}" / domain
    folders = [str(output / run.folder / "model") for run in results.runs]
    config = RecipeConfig(base=folders[0], target="PACS", test_domain=domain, image_size=IMAGE_SIZE, seed=trial)
    diagnosis = diagnose_models(folders, config)
    print(format_diagnosis(diagnosis))
    plot_paths(diagnosis, destination.with_suffix(".png"))
    inits = [run.init.split("@")[0] for run in results.runs]
    save_json(
        destination,
        {
            "domain": domain,
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


def auxiliary_distances(results: Results) -> dict[str, float]:
    """How far inter-training moved each recycled featurizer: ||w - w_base|| / ||w_base|| (vetting.py)."""
    from ratatouille_hub.discover import head_names_of, local_signature
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.vetting import distance_to_base

    base, *aux = (resolve_model(i.source, i.revision) for i in results.ingredients)
    signature, heads = local_signature(base.path), head_names_of(base.path / "config.json")
    return {a.source: distance_to_base(base, a, signature, heads) for a in aux}


# -- report ------------------------------------------------------------------------------------------


def report() -> None:
    trials = sorted(int(p.name.removeprefix("trial")) for p in WORK.glob("trial*") if (p / "results").is_dir())
    table: dict[str, dict[str, list[float]]] = {row: {d: [] for d in DOMAINS} for row, _, _ in ROWS}
    val_table: dict[str, dict[str, list[float]]] = {row: {d: [] for d in DOMAINS} for row, _, _ in ROWS}
    complete_trials = []
    for trial in trials:
        paths = {(d, s): cell_path(trial, d, s) for d in DOMAINS for s in STRATEGIES}
        cells = {cell: Results.load(path) if path.exists() else None for cell, path in paths.items()}
        for row, strategy, scores_of in ROWS:
            for domain in DOMAINS:
                cell = cells[(domain, strategy)]
                if cell is not None:
                    table[row][domain].append(scores_of(cell).test_accuracy)
                    val_table[row][domain].append(scores_of(cell).val_accuracy)
        if all(cells.values()):
            complete_trials.append(trial)
    timings = load_json(WORK / "timings.json", {})
    summary = {
        row: {d: _stats(values) for d, values in by_domain.items()} | {"average": _average_stats(by_domain)}
        for row, by_domain in table.items()
    }
    diagnoses = {p.stem: load_json(p, None) for p in sorted(WORK.glob("trial*/results/diagnose-*.json"))}
    payload = {
        "protocol": PROTOCOL,
        "trials": trials,
        "complete_trials": complete_trials,
        "test_accuracy": summary,
        "test_accuracy_per_trial": table,
        "val_accuracy_per_trial": val_table,
        "diagnose": diagnoses,
        "timings_s": timings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_json(RESULTS / "pacs.json", payload)
    for png in WORK.glob(f"trial*/results/diagnose-{DIAGNOSED_DOMAIN}.png"):
        shutil.copyfile(png, RESULTS / f"pacs-diagnose-{DIAGNOSED_DOMAIN}-{png.parent.parent.name}.png")
    (RESULTS / "pacs.md").write_text(markdown(payload))
    print((RESULTS / "pacs.md").read_text())


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    mean = statistics.fmean(values)
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": mean, "stderr": stderr, "n": len(values)}


def _average_stats(by_domain: dict[str, list[float]]) -> dict | None:
    """Mean over the 4 test domains, per trial that has all 4; then mean and s.e. over those trials."""
    n = min(len(v) for v in by_domain.values())
    if n == 0:
        return None
    return _stats([statistics.fmean(by_domain[d][t] for d in DOMAINS) for t in range(n)])


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    text = f"{100 * stats['mean']:.1f}"
    if stats["n"] >= 3 and stats["stderr"] is not None:
        text += f" ± {100 * stats['stderr']:.1f}"
    return text


def markdown(payload: dict) -> str:
    trials = payload["trials"]
    lines = [
        "# PACS: Model Ratatouille and its baselines, EfficientNet-Lite0, 2 CPU cores",
        "",
        "Generated by `benchmarks/pacs.py` (`make bench-pacs`); numbers in `pacs.json`.",
        "",
        PROTOCOL,
        f"Trials: {', '.join(map(str, trials)) or 'none'} (complete: {', '.join(map(str, payload['complete_trials'])) or 'none'}). "
        "Held-out domain accuracy (%); mean ± standard error once there are 3 trials.",
        "",
        "| method | " + " | ".join(DOMAINS) + " | average |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for row, stats in payload["test_accuracy"].items():
        lines.append(f"| {row} | " + " | ".join(_cell(stats[d]) for d in (*DOMAINS, "average")) + " |")
    for name, diagnosis in payload["diagnose"].items():
        if diagnosis is None:
            continue
        lines += [
            "",
            f"## Diagnose: the Ratatouille runs, test domain {diagnosis['domain']} ({name.split('-')[0] if '-' in name else ''})",
            "",
            "Training-domain validation. Ratio-error: errors made by one run only / errors made by both (diversity). "
            "Barrier: the largest dip of accuracy on the straight weight path below the line between the ends.",
            "",
            "| run | init | validation accuracy | init's distance to the base |",
            "|---|---|---|---|",
            *(
                f"| {i} | {init} | {100 * acc:.1f} | {_distance(diagnosis, init)} |"
                for i, (init, acc) in enumerate(zip(diagnosis["runs"], diagnosis["accuracies"]))
            ),
            "",
            "| pair | ratio-error | barrier (points) | accuracy along the path (0, .25, .5, .75, 1) |",
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
        lines += ["", *(f"![interpolation paths]({p.name})" for p in pngs)]
    timings = payload["timings_s"]
    if timings:
        lines += [
            "",
            "## Wall time (s, 2 cores)",
            "",
            "| stage | seconds |",
            "|---|---|",
            *(f"| {k} | {v:.0f} |" for k, v in timings.items()),
            f"| total | {sum(timings.values()):.0f} |",
        ]
    return "\n".join(lines) + "\n"


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
