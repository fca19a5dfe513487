"""Precision benchmark: does bf16 autocast pay for training on this machine, and does it change what is selected?

    python benchmarks/precision.py [--part speed|selection|all] [--models efficientnet-lite0 resnet-18]
                                   [--px 128 224] [--repeats 3] [--steps 4]

The evidence behind `--precision auto` (ratatouille_hub/train.py::make_accelerator).

Part `speed`: the product's fine-tune step (`train.optimize` as `recipe/executor.py::train_run` calls it:
every parameter, augmentation on, BatchNorm statistics frozen, no validation) under `make_accelerator("no")`
(fp32) and `make_accelerator("bf16")` (bf16 autocast; weights, gradients and Adam stay fp32), on this
machine's device, at each `--px`. Models: EfficientNet-Lite0 (the shared ImageNet checkpoint, 7-class PACS
head) and a ResNet-18 (transformers' ResNetConfig, basic blocks [2, 2, 2, 2], randomly initialised: no ResNet
weights are offline here; speed does not depend on the weights). Batches as the PACS benchmark's protocol
draws them: 3 domains x 16 images (48 a step) of random uint8 pixels, drawn by `DomainBatches` before timing
and cycled. The two precisions start from the same weights and alternate call by call (`--repeats` calls of
`--steps` steps each, after a warm-up call of 2), so drift in this shared machine's speed hits both alike;
a step's time is from one batch draw to the next (the call's set-up and wind-down left out), and each
precision's figure is the median step. Threads: torch.set_num_threads(`--threads`, 2 by default); glibc's
allocator tuned as the CLI tunes it. Each pair of calls starts after a quiet second (benchmarks/train.py's
gate: others under 0.1 CPU beyond the cores the threads leave free, or 30 s of waiting), and `others` records
the CPUs other processes used during it: on a shared machine, read the speed-up of the rows where it is low.

Part `selection`: one tiny real recipe twice, once per precision: `recycle` of EfficientNet-Lite0 on the
shared PACS (`--strategy soup --test-domain sketch`, 3 runs of 40 steps at 64 px, validation every 10 steps,
16 images per domain, a 500-step linear probe), each into its own output folder under `--work` (a rerun
resumes them). Reported: every run's validation accuracy at each
evaluation, its best step, which runs greedy kept, and the soups' validation and held-out accuracies under
both, and whether bf16 selected other steps or runs than fp32. Validation and predictions are fp32 in both
(only the training step is autocast), so a difference comes from the training alone.

Results: benchmarks/results/precision.json (each part replaces its own section).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "precision.json"
WORK = ROOT / "benchmarks" / "scratch" / "precision"
SHARED = ROOT.parent / "shared"
EFFICIENTNET = SHARED / "models" / "efficientnet-lite0-imagenet"
PACS = SHARED / "data" / "pacs"
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
DOMAINS, PER_DOMAIN, IMAGES_PER_DOMAIN, POOL = 3, 16, 64, 4  # POOL: distinct batches, cycled
LR, WEIGHT_DECAY, AUGMENT_SEED = 5e-5, 1e-4, 1234  # run 0's lr, a drawn weight decay (RecipeConfig)
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # name in the results: make_accelerator's precision
SELECTION = dict(  # the tiny real recipe of part `selection`
    strategy="soup",
    test_domain="sketch",
    runs=3,
    steps=40,
    eval_every=10,
    lp_steps=500,
    batch_size=16,
    image_size=64,
)


def train_benchmark():
    """benchmarks/train.py as a module: its machine description and its measure of other processes' load."""
    spec = importlib.util.spec_from_file_location("train_benchmark", ROOT / "benchmarks" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fresh_accelerator(precision: str):
    """`make_accelerator(precision)` after clearing accelerate's process-wide state, which holds one precision
    per process (and which `Accelerator.autocast` reads): the precisions alternate here, the product keeps one."""
    from accelerate.state import AcceleratorState

    from ratatouille_hub.train import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(precision)


def resnet18(num_labels: int):
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic")
    config.num_labels = num_labels
    return ResNetForImageClassification(config)


def load_model(name: str):
    import torch

    from ratatouille_hub.models import load_classifier

    if name == "resnet-18":
        return resnet18(len(PACS_CLASSES))
    torch.manual_seed(0)  # the re-initialised 7-class head
    return load_classifier(EFFICIENTNET, dict(enumerate(PACS_CLASSES)))


def batch_pool(px: int):
    """POOL batches of DOMAINS x PER_DOMAIN random uint8 images, drawn as the recipe draws them."""
    import torch

    from ratatouille_hub.data import ImageTensors
    from ratatouille_hub.train import DomainBatches

    generator = torch.Generator().manual_seed(0)
    domains = [
        ImageTensors(
            torch.randint(0, 256, (IMAGES_PER_DOMAIN, 3, px, px), dtype=torch.uint8, generator=generator),
            torch.randint(0, len(PACS_CLASSES), (IMAGES_PER_DOMAIN,), generator=generator),
        )
        for _ in range(DOMAINS)
    ]
    batches = DomainBatches(domains, PER_DOMAIN, seed=0)
    return [next(batches) for _ in range(POOL)]


class TimedBatches:
    """The pool, cycled, noting when each batch is drawn: a step runs from one draw to the next."""

    def __init__(self, pool):
        self.batches, self.draws = itertools.cycle(pool), []

    def __iter__(self):
        return self

    def __next__(self):
        self.draws.append(time.perf_counter())
        return next(self.batches)

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.draws, self.draws[1:])]


def timed_call(model, pool, steps: int, accelerator, normalize) -> list[float]:
    """One `optimize` call of `steps` steps as train_run makes it for a fine-tune; each step's seconds but the last
    (which ends inside the call's wind-down)."""
    from ratatouille_hub.train import optimize

    feed = TimedBatches(pool)
    optimize(
        model,
        feed,
        parameters=list(model.parameters()),
        steps=steps,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        accelerator=accelerator,
        normalize=normalize,
        augment_seed=AUGMENT_SEED,
        validate=None,
        freeze_bn=True,
        dropout=0.0,
    )
    return feed.step_seconds()


def measure_speed(name: str, px: int, repeats: int, steps: int, bench) -> dict:
    import torch

    from ratatouille_hub.data import Normalization

    print(f"{name} at {px} px, {torch.get_num_threads()} threads", flush=True)
    normalize = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pool = batch_pool(px)
    base = load_model(name)
    models = {precision: copy.deepcopy(base) for precision in PRECISIONS}
    for precision, flag in PRECISIONS.items():  # warm-up: first-touch allocations, oneDNN's kernel choices
        timed_call(models[precision], pool, 2, fresh_accelerator(flag), normalize)
    steps_s: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    others = []
    for _ in range(repeats):
        bench.wait_quiet()  # a quiet second (or 30 s of waiting) before each pair of calls
        load = bench.Others()
        for precision, flag in PRECISIONS.items():
            accelerator = fresh_accelerator(flag)
            steps_s[precision] += timed_call(models[precision], pool, steps, accelerator, normalize)
        others.append(round(load.cpus(), 2))
    batch = DOMAINS * PER_DOMAIN
    row = {
        "model": name,
        "px": px,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in base.parameters()),
    }
    for precision, times in steps_s.items():
        row[f"{precision}_step_ms"] = round(1000 * statistics.median(times), 1)
        row[f"{precision}_images_per_s"] = round(batch / statistics.median(times), 2)
        row[f"{precision}_steps_ms"] = [round(1000 * t, 1) for t in times]
    row["bf16_speedup"] = round(row["fp32_step_ms"] / row["bf16_step_ms"], 3)
    row["others_cpus"] = others
    print(
        f"  fp32 {row['fp32_step_ms']:.0f} ms, bf16 {row['bf16_step_ms']:.0f} ms a step: bf16 x{row['bf16_speedup']:.2f}",
        flush=True,
    )
    return row


def run_speed(models: list[str], pxs: list[int], repeats: int, steps: int, keep) -> None:
    """Each (model, resolution) measured, then handed to `keep` with the machine's description."""
    import torch

    bench = train_benchmark()
    info = bench.machine()
    info["cpu_flags_bf16"] = cpu_flags(("avx512_bf16", "amx_bf16", "amx_tile"))
    info["mkldnn_bf16_supported"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    for name in models:
        for px in pxs:
            row = measure_speed(name, px, repeats, steps, bench)
            info["load_average_1min_after"] = round(os.getloadavg()[0], 2)
            keep(info, row | {"repeats": repeats, "steps_per_call": steps})


def cpu_flags(wanted: tuple[str, ...]) -> list[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(line for line in handle if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return [flag for flag in wanted if flag in flags]


# -- selection ------------------------------------------------------------------------------------------


def run_selection(work: Path) -> dict:
    """The tiny real recipe once per precision; what each selected."""
    from accelerate.state import AcceleratorState

    from ratatouille_hub.config import RecipeConfig
    from ratatouille_hub.recipe import recycle

    outcomes = {}
    for precision, flag in PRECISIONS.items():
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process, as fresh_accelerator
        config = RecipeConfig(
            base=str(EFFICIENTNET), target=str(PACS), precision=flag, output=str(work / precision), **SELECTION
        )
        print(f"selection: {precision}", flush=True)
        results = recycle(config, echo=lambda line: print(line, flush=True))
        outcomes[precision] = selected(results, work / precision)
    fp32, bf16 = outcomes["fp32"], outcomes["bf16"]
    return {
        "recipe": SELECTION,
        "base": "EfficientNet-Lite0 (shared ImageNet checkpoint)",
        "outcomes": outcomes,
        "same_best_steps": [r["best_step"] for r in fp32["runs"]] == [r["best_step"] for r in bf16["runs"]],
        "same_greedy_members": fp32["greedy_members"] == bf16["greedy_members"],
        "same_best_run": fp32["best_run"] == bf16["best_run"],
        "max_val_accuracy_difference": max(
            abs(a - b)
            for ra, rb in zip(fp32["runs"], bf16["runs"], strict=True)
            for (_, a), (_, b) in zip(ra["history"], rb["history"], strict=True)
        ),
    }


def selected(results, output: Path) -> dict:
    """Each run's validation history and best step (from its run folder's metrics), greedy's members, the soups."""
    runs = []
    for run in results.runs:
        metrics = json.loads((output / run.folder / "metrics.json").read_text())
        runs.append(
            {
                "best_step": metrics["best_step"],
                "val_accuracy": run.val_accuracy,
                "test_accuracy": run.test_accuracy,
                "history": metrics["history"],
            }
        )
    return {
        "runs": runs,
        "best_run": max(range(len(runs)), key=lambda i: runs[i]["val_accuracy"]),
        "greedy_members": list(results.averages["greedy"].members),
        "soups": {
            name: {"val_accuracy": a.val_accuracy, "test_accuracy": a.test_accuracy}
            for name, a in results.averages.items()
            if name in ("uniform", "greedy")
        },
    }


# -- report ---------------------------------------------------------------------------------------------


def print_speed(speed: dict) -> None:
    info = speed["machine"]
    print(f"\n{info['cpu']}, {info['cpus']} CPUs, torch {info['torch']}")
    print(
        f"bf16 on this CPU: {', '.join(info['cpu_flags_bf16']) or 'none'}; oneDNN bf16: {info['mkldnn_bf16_supported']}"
    )
    print(
        f"{'model':<20}{'px':>5}{'batch':>7}{'threads':>9}{'fp32 ms':>10}{'bf16 ms':>10}{'bf16 speed-up':>15}{'others':>8}"
    )
    for row in speed["rows"]:
        print(
            f"{row['model']:<20}{row['px']:>5}{row['batch']:>7}{row['threads']:>9}{row['fp32_step_ms']:>10.0f}{row['bf16_step_ms']:>10.0f}"
            f"{row['bf16_speedup']:>14.2f}x{max(row['others_cpus']):>8.2f}"
        )


def print_selection(selection: dict) -> None:
    print(f"\nselection ({selection['recipe']}):")
    for precision, outcome in selection["outcomes"].items():
        steps = ", ".join(str(r["best_step"]) for r in outcome["runs"])
        print(
            f"  {precision}: best steps {steps}; best run {outcome['best_run']}; greedy kept {outcome['greedy_members']};"
            f" uniform {100 * outcome['soups']['uniform']['val_accuracy']:.1f} val /"
            f" {100 * outcome['soups']['uniform']['test_accuracy']:.1f} test"
        )
    print(
        f"  same best steps: {selection['same_best_steps']}; same greedy members: {selection['same_greedy_members']};"
        f" largest validation difference at an evaluation: {100 * selection['max_val_accuracy_difference']:.1f} points"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "selection", "all"), default="all")
    parser.add_argument("--models", nargs="+", choices=("efficientnet-lite0", "resnet-18"), default=None)
    parser.add_argument("--px", type=int, nargs="+", default=[128, 224], help="resolutions of part speed")
    parser.add_argument("--repeats", type=int, default=3, help="calls per precision (step medians over all)")
    parser.add_argument("--steps", type=int, default=4, help="steps a call")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK, help="the selection's run folders (a rerun resumes them)")
    args = parser.parse_args(argv)
    from ratatouille_hub.allocator import tune_allocator

    tune_allocator()  # as the CLI does before torch allocates anything
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only
    import torch

    from ratatouille_hub import logs

    torch.set_num_threads(args.threads)
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    with logs.library_output(logs.DEFAULT):  # the libraries' own bars and load chatter would bury the table
        if args.part in ("speed", "all"):

            def keep(info: dict, row: dict) -> None:  # rows measured apart (a model, a resolution) stay
                speed = results.setdefault("speed", {"rows": []})
                speed["machine"] = info
                speed["rows"] = [r for r in speed["rows"] if not measured_again(r, [row])] + [row]
                save(args.output, results)

            run_speed(args.models or ["efficientnet-lite0", "resnet-18"], args.px, args.repeats, args.steps, keep)
        if args.part in ("selection", "all"):
            results["selection"] = run_selection(args.work)
            save(args.output, results)
    if "speed" in results:
        print_speed(results["speed"])
    if "selection" in results:
        print_selection(results["selection"])
    print(f"\nwrote {args.output}")


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def measured_again(row: dict, rows: list[dict]) -> bool:
    return any((r["model"], r["px"], r["threads"]) == (row["model"], row["px"], row["threads"]) for r in rows)


if __name__ == "__main__":
    main()
