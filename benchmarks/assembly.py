"""Assembly benchmark: peak RSS of averaging, greedy search and diagnostics over N ResNet-50-sized runs.

    python benchmarks/assembly.py [--sizes 4 8 20]

Runs are random fp32 ResNet-50s (ResNetConfig defaults, a 3-class head, 94 MB each): one seed's weights,
perturbed per run, generated once into benchmarks/scratch/assembly-runs/ and reused. Each case runs alone in
a fresh child process, which reports its own peak RSS (VmHWM: exec starts it afresh, unlike ru_maxrss) and
the seconds of the case itself, imports excluded:

  uniform        RunAverager.model over all N runs: what each merge method's average costs assembly;
  greedy         the greedy merge method over the N runs, scored by RunAverager.validation_accuracy on 8
                 generated 32 px images; each candidate is averaged from its runs' files, one run at a time
                 (the JSON counts the runs kept and the run loads);
  diagnose       RunAverager.diagnose_against run 0 and the N - 1 others, on the same images;
  all-in-memory  what assembly did before: every run's state dict loaded at once, then averaged.

The children run with the product's glibc allocator settings (ratatouille_hub/allocator.py: freed memory
stays with the process, so peak RSS is what was ever live at once). About 3 minutes on 2 idle cores.
Results: benchmarks/results/assembly.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "benchmarks" / "scratch" / "assembly-runs"
RESULTS = ROOT / "benchmarks" / "results" / "assembly.json"
WEIGHTS = "model.safetensors"
LABELS = {0: "a", 1: "b", 2: "c"}
IMAGES, IMAGE_SIZE = 8, 32
CASES = ("uniform", "greedy", "diagnose", "all-in-memory")
# ratatouille_hub/allocator.py's values, set before the child starts (as the CLI sets them at start-up)
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_TOP_PAD_": str(1 << 30)}


# -- children: each case alone in a fresh process --------------------------------------------------


def generate_runs(count: int) -> None:
    """Write missing run model folders; each lands whole (staged folder), so a killed run is never reused."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from ratatouille_hub.testing import write_perturbed_runs

    missing = [folder for folder in run_folders(count) if not (folder / WEIGHTS).is_file()]
    if not missing:
        return
    torch.manual_seed(0)
    config = ResNetConfig(id2label=LABELS, label2id={name: i for i, name in LABELS.items()})
    write_perturbed_runs(ResNetForImageClassification(config), missing)


def run_folders(count: int) -> list[Path]:
    return [RUNS / f"run-{index:02d}" for index in range(count)]


def generated_target():
    """A Target of 8 random 32 px images: enough for validation and diagnostics to run the real code."""
    import torch

    from ratatouille_hub.data import ImageTensors, Normalization
    from ratatouille_hub.target import Target
    from ratatouille_hub.train import TargetData

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    images = ImageTensors(pixels, torch.arange(IMAGES) % len(LABELS))
    data = TargetData(train=[images], val=[images], normalize=Normalization((0.5,) * 3, (0.25,) * 3))
    return Target("generated", data, images, ("generated",), "generated", LABELS, "")


def child(case: str, count: int) -> None:
    """Run one case on the first `count` runs; print its seconds, RSS before it and peak RSS, as JSON. The
    slow first imports (transformers' ResNet, the accuracy metric) come before, to time the case alone."""
    import torch
    import transformers.models.resnet.modeling_resnet  # noqa: F401

    from ratatouille_hub.evaluation import accuracy
    from ratatouille_hub.merge_engine import average_state_dicts
    from ratatouille_hub.merge_methods import MERGE_METHODS, MergeInputs, Mixture
    from ratatouille_hub.models import load_classifier
    from ratatouille_hub.recipe.assembly import RunAverager

    torch.set_num_threads(1)  # the work is memory-bound; two threads on a shared 2-core machine ran 5-10x slower
    folders, target = run_folders(count), generated_target()
    accuracy(target.test.labels, target.test.labels)
    start_rss = memory_mb("VmRSS")
    start = time.perf_counter()
    detail = {}
    if case == "all-in-memory":
        states = [load_classifier(folder, LABELS).state_dict() for folder in folders]
        load_classifier(folders[0], LABELS).load_state_dict(average_state_dicts(states))
    else:
        averager = RunAverager(folders, target, "average")
        if case == "uniform":
            averager.model(Mixture(tuple(range(count))))
        elif case == "greedy":
            scored: list[int] = []

            def score(subset: list[int]) -> float:
                scored.append(len(subset))
                return averager.validation_accuracy(subset)

            inputs = MergeInputs(count=count, ranking=list(range(count)), score=score)
            detail["kept"] = len(MERGE_METHODS["greedy"].mix(inputs).members)
            detail["run_loads"] = sum(scored)
        else:
            plot = RUNS.parent / "assembly-diagnostics.png"
            detail["pairs"] = len(averager.diagnose_against(0, list(range(1, count)), plot))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "start_rss_mb": start_rss, "peak_rss_mb": memory_mb("VmHWM"), **detail}))


def memory_mb(field: str) -> float:
    """A VmRSS/VmHWM line of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/self/status has no {field}")


# -- harness: the parent never imports torch, so nothing it holds shows in a child -----------------


def spawn(*args: str) -> str:
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, *args]
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout


def run_benchmark(sizes: list[int]) -> dict:
    print(f"runs: {RUNS.relative_to(ROOT)} (generated once, about 30 s)", flush=True)
    spawn("--generate", str(max(sizes)))
    run_mb = (run_folders(1)[0] / WEIGHTS).stat().st_size / 1e6
    load_before = os.getloadavg()
    rows = []
    for count in sizes:
        for case in CASES:
            print(f"measuring N={count} {case}", flush=True)
            start = time.perf_counter()
            measured = json.loads(spawn("--child", case, str(count)).splitlines()[-1])
            rows.append({"n": count, "case": case, "wall_s": round(time.perf_counter() - start, 2), **measured})
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "malloc_env": MALLOC_ENV,
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "run_mb": round(run_mb, 1),
        "all_states_mb": {str(count): round(count * run_mb, 1) for count in sizes},
        "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
    }


def print_table(results: dict) -> None:
    print(f"\n{'N':>3}  {'case':<14}{'peak RSS MB':>12}{'RSS before MB':>15}{'case s':>9}{'N x run MB':>12}  notes")
    for row in results["rows"]:
        all_states = results["all_states_mb"][str(row["n"])]
        notes = ", ".join(f"{key} {row[key]}" for key in ("kept", "run_loads", "pairs") if key in row)
        print(
            f"{row['n']:>3}  {row['case']:<14}{row['peak_rss_mb']:>12.0f}{row['start_rss_mb']:>15.0f}"
            f"{row['seconds']:>9.1f}{all_states:>12.0f}  {notes}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 20], help="numbers of runs to assemble")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
    elif args.generate:
        generate_runs(args.generate)
    else:
        results = run_benchmark(args.sizes)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print_table(results)
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
