"""Demo design probe: docs/method.md's three criteria on the toy world, on training-domain validation only.

    python benchmarks/demo_criteria.py [--set KEY=VALUE ...] [--output benchmarks/scratch/demo-criteria]

What the demo's world is designed from, measured without the held-out domain. It builds the demo's
checkpoints (base, community fine-tunes, the careless one) and a target that holds the training domains
only: the held-out domain (sketch) is never drawn. `recycle` needs a held-out domain, so a placeholder of
blank grey images stands in for it; nothing measured on it is printed or saved. Then it runs the demo's
recipes with the demo's seeds (a run's randomness depends on the trial seed and its index only, and a
domain's images and split on its name only), so every run here is the run the demo trains and the
validation numbers are the demo's:
  soup                  every run from the base (model soups; ERM is its best run)
  ratatouille           runs 1-4 from the four fine-tunes, as discovery lists them (careless first)
  ratatouille-vetted    runs 1-3 from the three careful fine-tunes
and prints, per recipe: the linear probe's and each run's validation accuracy (accurate), every pair's
barrier on the weight path (averageable) and ratio-error (diverse) from `diagnose` on all pairs, and each
average's and the ensemble's validation accuracy; the uniform average's gap over its runs' mean and the
diversity the careful fine-tunes add over the soup's come with the demo's bands over the images
(ratatouille_hub/toy/evidence.py), so a margin reads as the demo will read it. `--set` overrides a field of
the demo's WorldDesign (`--set steps=500 --set lr_choices=1e-4,3e-4`), each variant in its own folder keyed
by the design.
`--probe-domain cartoon` leaves one training domain out as well (DomainBed's leave-one-domain-out check):
the runs train on the other two, and the averages are measured on it against their runs' mean, the
question the held-out domain asks, answered without drawing it.
Results: benchmarks/results/demo_criteria.json (the default design, world seed 0, the CPU's own kernels) or the
scratch folder (any other).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from ratatouille_hub import recycle
from ratatouille_hub.api import diagnose
from ratatouille_hub.config import DiagnoseOptions
from ratatouille_hub.hashing import stable_hash
from ratatouille_hub.recipe import plan_recipe
from ratatouille_hub.recipe.assembly import rank_by_validation
from ratatouille_hub.toy import world as toyworld
from ratatouille_hub.toy.demo import (
    AUX_TASKS,
    TARGET_ID,
    _save_dataset,
    build_checkpoints,
    demo_config,
    demo_processes,
    helpers,
    one_thread,
)
from ratatouille_hub.toy.design import DESIGN, WorldDesign
from ratatouille_hub.toy.evidence import correct_per_image, diversity_band, gap_band, signed

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "demo_criteria.json"
# forcing other CPU kernels computes another world: such a run never replaces the default design's record
KERNEL_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
HELD_OUT = "sketch"
PLACEHOLDER = "placeholder"  # stands in for the held-out domain, which is never drawn here
TRAIN_DOMAINS = tuple(d for d in toyworld.DOMAINS if d != HELD_OUT)
# the fields that make the world (checkpoints and target); variants that differ only in the recipe share it
WORLD_FIELDS = (
    "image_size",
    "widths",
    "pretrain_images",
    "pretrain_steps",
    "pretrain_batch",
    "pretrain_lr",
    "pretrain_photo_shapes",
    "finetune_steps",
    "community_lr",
    "careless_lr",
    "target_per_class_per_domain",
)


def parse_design(settings: list[str]) -> WorldDesign:
    """DESIGN with `KEY=VALUE` overrides, each value parsed as its field's type (tuples: comma-separated)."""
    fields = {f.name: f for f in dataclasses.fields(WorldDesign)}
    changes = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {setting}: no such field; fields: {', '.join(fields)}")
        current = getattr(DESIGN, key)
        if isinstance(current, bool):
            if value not in ("true", "false"):
                raise SystemExit(f"--set {setting}: {key} is true or false")
            changes[key] = value == "true"
        elif isinstance(current, tuple):
            changes[key] = tuple(type(current[0])(v) for v in value.split(","))
        else:
            changes[key] = type(current)(value)
    return replace(DESIGN, **changes)


def training_domains_target(folder: Path, design: WorldDesign, seed: int, with_placeholder: bool = True) -> None:
    """The demo's target without its held-out domain, plus (`with_placeholder`) one blank image per class as
    a stand-in for it."""
    from datasets import concatenate_datasets

    if (folder / "README.md").exists():
        return
    shapes = toyworld.target_dataset(
        design.target_per_class_per_domain, size=design.image_size, seed=seed, domains=TRAIN_DOMAINS
    )
    if not with_placeholder:
        _save_dataset(shapes, folder, TARGET_ID, "the demo's target, training domains only")
        return
    blank = Image.new("RGB", (design.image_size,) * 2, (128, 128, 128))
    placeholder = shapes.select(range(len(toyworld.SHAPES))).map(
        lambda row: {"image": blank, "domain": PLACEHOLDER}, features=shapes.features
    )
    _save_dataset(
        concatenate_datasets([shapes, placeholder]), folder, TARGET_ID, "the demo's target, training domains only"
    )


def recipes(paths: dict[str, Path]) -> dict[str, dict]:
    """The demo's recycles on local folders, the fine-tunes in the order discovery lists them on the demo's Hub."""
    careful = tuple(str(paths[task]) for task in ("polygons", "dots", "stripes"))
    return {
        "soup": {"strategy": "soup", "aux": ()},
        "ratatouille": {"strategy": "ratatouille", "aux": (str(paths["careless"]), *careful)},
        "ratatouille-vetted": {"strategy": "ratatouille", "aux": careful},
    }


def measure(name: str, config, plan, echo, names: dict[str, str]) -> tuple[dict, torch.Tensor]:
    """One recipe's runs, their pairs (diagnose on every pair) and its averages, on validation (and on the
    probe domain when there is one: `probe`; the placeholder's numbers are never kept); with the uniform
    average's gap over its runs' mean and its band, as the demo reads it. Also which validation images each
    run got right, for the diversity band across recipes."""
    results = recycle(config, echo=echo)
    output = Path(config.output)
    correct = correct_per_image(plan, output, results)
    runs = [
        {
            "index": r.index,
            "init": names.get(r.init.split("@")[0], r.init),
            "recycled": r.recycled,
            "val": r.val_accuracy,
            "best_step": r.best_step,
            "hparams": r.hparams,
        }
        for r in results.runs
    ]
    probed = config.test_domain != PLACEHOLDER
    if probed:
        for run, result in zip(runs, results.runs, strict=True):
            run["probe"] = result.test_accuracy
    models = tuple(str(output / r.folder / "model") for r in results.runs)
    options = DiagnoseOptions(models=models, target=config.target, test_domain=config.test_domain, seed=config.seed)
    diagnosis = diagnose(options)
    pairs = [
        {
            "runs": [p.a, p.b],
            "kind": pair_kind(runs[p.a]["recycled"], runs[p.b]["recycled"]),
            "barrier": p.barrier,
            "ratio_error": p.ratio_error,
            "path": list(p.path_accuracies),
        }
        for p in diagnosis.pairs
    ]
    averages = {method: average.val_accuracy for method, average in results.averages.items()}
    linear_probes = sorted((output / "lp").glob("*/metrics.json"))  # one head for all the recipe's runs
    measured = {
        "name": name,
        "linear_probe": [json.loads(path.read_text())["val_accuracy"] for path in linear_probes],
        "runs": runs,
        "pairs": pairs,
        "averages": averages,
        "greedy_members": results.averages["greedy"].members,
        "ensemble": results.ensemble.val_accuracy,
        "uniform_gap_band": band_record(gap_band(correct["val"])),
    }
    if probed:
        measured["probe"] = {
            "domain": config.test_domain,
            "averages": {method: average.test_accuracy for method, average in results.averages.items()},
            "ensemble": results.ensemble.test_accuracy,
            "uniform_gap_band": band_record(gap_band(correct["test"])),
        }
    return measured, correct["val"].runs


def band_text(band: dict, decimals: int = 1) -> str:
    estimate, low, high = (signed(band[key], decimals) for key in ("estimate", "low", "high"))
    return f"{estimate} ({low} to {high}): {band['side']}"


def band_record(band) -> dict:
    return {"estimate": band.estimate, "low": band.low, "high": band.high, "side": band.side}


def diversity_bands(measured: list[dict], correct: dict[str, torch.Tensor]) -> dict:
    """The careful Ratatouille's median ratio-error minus the soup's, on the same validation images resampled
    together: over the pairs from the best run (the demo's reading) and over all pairs."""
    by_name = {m["name"]: m for m in measured}
    if not {"soup", "ratatouille-vetted"} <= by_name.keys():
        return {}

    def pairs(name: str, from_best: bool) -> list[tuple[int, int]]:
        best = rank_by_validation([run["val"] for run in by_name[name]["runs"]])[0]
        every = [tuple(p["runs"]) for p in by_name[name]["pairs"]]
        return [p for p in every if best in p] if from_best else every

    return {
        scope: band_record(
            diversity_band(
                correct["ratatouille-vetted"],
                pairs("ratatouille-vetted", from_best),
                correct["soup"],
                pairs("soup", from_best),
            )
        )
        for scope, from_best in (("from_best_run", True), ("all_pairs", False))
    }


def pair_kind(a_recycled: bool, b_recycled: bool) -> str:
    return {0: "base-base", 1: "base-recycled", 2: "recycled-recycled"}[a_recycled + b_recycled]


def report(measured: dict) -> str:
    runs = measured["runs"]
    probe_accuracies = ", ".join(f"{100 * accuracy:.1f}%" for accuracy in measured["linear_probe"])
    lines = [f"== {measured['name']}", f"  linear probe: val {probe_accuracies}"]
    lines += [
        f"  run {r['index']} from {r['init']:<22} val {100 * r['val']:5.1f}%  step {r['best_step']:>4}  "
        f"lr {r['hparams']['lr']:g} wd {r['hparams']['weight_decay']:g} dropout {r['hparams']['dropout']:g}"
        for r in runs
    ]
    vals = [r["val"] for r in runs]
    lines.append(f"  runs: best {100 * max(vals):.1f}%, mean {100 * statistics.mean(vals):.1f}%")
    by_kind: dict[str, list[dict]] = {}
    for pair in measured["pairs"]:
        by_kind.setdefault(pair["kind"], []).append(pair)
    for kind, pairs in by_kind.items():
        barriers = sorted(100 * p["barrier"] for p in pairs)
        ratios = [p["ratio_error"] for p in pairs]
        lines.append(
            f"  {kind:<18} pairs {len(pairs):>2}: barrier median {statistics.median(barriers):4.1f}, "
            f"max {barriers[-1]:4.1f} pts; ratio-error median {statistics.median(ratios):.2f}"
        )
    averages = measured["averages"]
    lines.append(
        "  averages: "
        + ", ".join(f"{m} {100 * v:.1f}%" for m, v in averages.items())
        + f" (greedy kept {len(measured['greedy_members'])}); ensemble {100 * measured['ensemble']:.1f}%"
    )
    lines.append(f"  uniform against its runs' mean: {band_text(measured['uniform_gap_band'])}")
    if "probe" in measured:
        probe, held = measured["probe"], [r["probe"] for r in runs]
        best = runs[rank_by_validation([r["val"] for r in runs])[0]]["probe"]
        lines.append(
            f"  on {probe['domain']} (left out): runs {100 * min(held):.1f}-{100 * max(held):.1f}% "
            f"(mean {100 * statistics.mean(held):.1f}, best by validation {100 * best:.1f}); "
            + ", ".join(f"{m} {100 * v:.1f}%" for m, v in probe["averages"].items())
            + f"; ensemble {100 * probe['ensemble']:.1f}%; uniform against its runs' mean there: "
            + band_text(probe["uniform_gap_band"])
        )
    return "\n".join(lines)


def record_path(folder: Path, record: dict, complete: bool) -> Path:
    """The committed record for the default design (world seed 0, every recipe, no probe domain, the CPU's own
    kernels); the variant's folder for anything else."""
    default = (
        record["design"] == dataclasses.asdict(DESIGN)
        and record["seed"] == 0
        and complete
        and not record["probe_domain"]
        and not record["kernel_overrides"]
    )
    return RESULTS if default else folder / "demo_criteria.json"


def finite(value):
    """JSON has no infinity: an infinite ratio-error (two models that never err together) is written as null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a design field")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "scratch" / "demo-criteria")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (the demo's: 0)")
    parser.add_argument(
        "--recipes", default="soup,ratatouille,ratatouille-vetted", help="which recipes (comma-separated)"
    )
    parser.add_argument(
        "--probe-domain",
        choices=TRAIN_DOMAINS,
        help="leave this training domain out too and measure the averages on it (the held-out domain stays undrawn)",
    )
    args = parser.parse_args()
    design = parse_design(args.set)
    variant = {"design": dataclasses.asdict(design), "seed": args.seed}
    if args.probe_domain:
        variant["probe"] = args.probe_domain
    folder = args.output / stable_hash(variant, length=12)
    world = {key: value for key, value in dataclasses.asdict(design).items() if key in WORLD_FIELDS}
    world_folder = args.output / f"world-{stable_hash({'world': world, 'seed': args.seed}, length=12)}"
    print(f"design {folder.name}: {design}", flush=True)

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    with one_thread(), helpers(demo_processes() - 1, echo) as work:  # the demo's processes: its runs, bit for bit
        paths = build_checkpoints(world_folder, echo, args.seed, design, work)
        target = (
            world_folder / "datasets" / ("shapes-training-domains" + ("-no-placeholder" if args.probe_domain else ""))
        )
        training_domains_target(target, design, args.seed, with_placeholder=not args.probe_domain)
        names = {str(path): "base" if key == "base" else key for key, path in paths.items()}
        print(f"world built: {time.perf_counter() - start:.0f} s", flush=True)
        configs = {
            name: replace(
                demo_config(folder, recipe["strategy"], design),
                base=str(paths["base"]),
                target=str(target),
                test_domain=args.probe_domain or PLACEHOLDER,
                aux=recipe["aux"],
            )
            for name, recipe in recipes(paths).items()
            if name in args.recipes.split(",")
        }
        plans = {name: plan_recipe(config, echo=lambda line: None)[0] for name, config in configs.items()}
        work.share(list(plans.values()), echo)
        measured, correct = [], {}
        for name, config in configs.items():
            recipe, correct[name] = measure(name, config, plans[name], echo, names)
            measured.append(recipe)
            print(report(measured[-1]), f"\n  ({time.perf_counter() - start:.0f} s)", flush=True)
        diversity = diversity_bands(measured, correct)
        for scope, band in diversity.items():
            print(f"diversity added by the careful fine-tunes ({scope.replace('_', ' ')}): {band_text(band, 2)}")
        threads = torch.get_num_threads()
    seconds = time.perf_counter() - start
    print(f"{seconds:.0f} s, {demo_processes()} processes of {threads} thread")
    record = {
        "design": dataclasses.asdict(design),
        "seed": args.seed,
        "probe_domain": args.probe_domain,
        "aux_tasks": list(AUX_TASKS),
        "recipes": measured,
        "diversity_band": diversity,
        "kernel_overrides": {name: os.environ[name] for name in KERNEL_OVERRIDES if name in os.environ},
        "seconds": seconds,
        "threads": threads,
        "processes": demo_processes(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
    }
    complete = args.recipes == parser.get_default("recipes")
    destination = record_path(folder, record, complete)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(finite(record), indent=1) + "\n")
    print(f"written: {destination}")


if __name__ == "__main__":
    main()
