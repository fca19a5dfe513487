"""Input-pipeline benchmark: images/s one host core prepares for a training step at 224 px, before and after
the per-pixel work moved to the training device.

    python benchmarks/pipeline.py [--px 224] [--seconds 3] [--repeats 3]

Before: the code at BEFORE (loaded from git history, so it stays measurable): `DomainBatches` gathers each
domain's uint8 rows and joins them, then the training loop's thread augments and normalises the batch in
floats on the host (`data.augment`, `Normalization`); only then would it go to the device.
After: the host gathers the uint8 rows straight into one tensor (pinned where CUDA is present), draws the
augmentation's random numbers (a few per image, `data.draw_augmentation`) and copies the batch to the device;
the crop, flip, jitter, greyscale and normalisation run there (`data.apply_augmentation`, `train.device_batch`).
Reported apart: the host's share (gather + draws + copy; with no GPU here there is no copy, the device being
the host) and the device's share as it runs on this CPU (where a CPU-only run does it).

Batches as a recipe draws them: 3 training domains x 32 images (96 a step) from 3 x 512 random uint8 images
(about 230 MB at 224 px, far beyond the caches). One torch thread, the glibc allocator tuned as the CLI tunes it.
A rate per core is images per CPU-second of this process (its one thread's work, which other processes on a
shared machine do not inflate the way they inflate wall time); wall images/s are reported beside it. Each
number is the median of `--repeats` measurements of about `--seconds` each. Before any timing, the after path
on this CPU must give the before path's bytes for the same seeds (the parity the tests pin on whole runs).
Goal: GOAL images/s per host core, the rate an H200-class GPU trains a ResNet-50 in bf16 (issue 23).
Results: benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pipeline.json"
BEFORE = "cce991c1ae3583955f797bdc80f30186ab28e7b5"  # the last commit whose loop augmented on the host
DOMAINS, PER_DOMAIN, IMAGES_PER_DOMAIN = 3, 32, 512
AUGMENT_SEED, BATCH_SEED = 1234, 0
GOAL = 6000.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as a ResNet-50 base declares


def before_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """`ratatouille_hub.data` and `ratatouille_hub.train` as they were at BEFORE, loaded as modules of the
    package so that their relative imports resolve (to today's modules; only `data`'s augmentation and
    normalisation and `train`'s DomainBatches are used, which import nothing that changed)."""
    loaded = []
    for name in ("data", "train"):
        path = f"ratatouille_hub/{name}.py"
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BEFORE}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        module = types.ModuleType(f"ratatouille_hub._before_{name}")
        module.__package__ = "ratatouille_hub"
        sys.modules[module.__name__] = module  # dataclasses look their module up there
        exec(compile(source, f"{BEFORE[:7]}:{path}", "exec"), module.__dict__)
        loaded.append(module)
    return loaded[0], loaded[1]


def make_domains(px: int):
    import torch

    from ratatouille_hub.data import ImageTensors

    generator = torch.Generator().manual_seed(0)
    return [
        ImageTensors(
            torch.randint(0, 256, (IMAGES_PER_DOMAIN, 3, px, px), dtype=torch.uint8, generator=generator),
            torch.randint(0, 7, (IMAGES_PER_DOMAIN,), generator=generator),
        )
        for _ in range(DOMAINS)
    ]


class Before:
    """The host's whole share of a step before: gather and join, augment, normalise."""

    def __init__(self, domains, before_data, before_train):
        import torch

        self.batches = before_train.DomainBatches(domains, PER_DOMAIN, seed=BATCH_SEED)
        self.generator = torch.Generator().manual_seed(AUGMENT_SEED)
        self.augment, self.normalize = before_data.augment, before_data.Normalization(MEAN, STD)

    def step(self):
        pixels, labels = next(self.batches)
        return self.normalize(self.augment(pixels, self.generator)), labels


class AfterHost:
    """The host's share of a step after: gather into one (pinned) tensor, draw the augmentation, copy to the
    device (with CUDA; asynchronously, as `train.device_batch` copies)."""

    def __init__(self, domains):
        import torch

        from ratatouille_hub.train import DomainBatches

        self.batches = DomainBatches(domains, PER_DOMAIN, seed=BATCH_SEED)
        self.generator = torch.Generator().manual_seed(AUGMENT_SEED)
        self.device = torch.device("cuda") if torch.cuda.is_available() else None

    def step(self):
        from ratatouille_hub.data import draw_augmentation

        pixels, labels = next(self.batches)
        draws = draw_augmentation(len(labels), self.generator)
        if self.device is not None:
            pixels, labels = pixels.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        return pixels, labels, draws

    def finish(self):
        import torch

        if self.device is not None:
            torch.cuda.synchronize()  # the copies count until they are done


class AfterDeviceOnCpu:
    """The device's share of a step after, on this CPU: augment from the draws, normalise (prepared batches)."""

    def __init__(self, domains):
        from ratatouille_hub.data import Normalization

        host = AfterHost(domains)
        host.device = None
        self.prepared = [host.step() for _ in range(8)]
        self.normalize, self.index = Normalization(MEAN, STD), 0

    def step(self):
        from ratatouille_hub.data import apply_augmentation

        pixels, labels, draws = self.prepared[self.index % len(self.prepared)]
        self.index += 1
        return self.normalize(apply_augmentation(pixels, draws)), labels


def check_parity(domains, before_data, before_train, steps: int = 3) -> None:
    """The after path on this CPU gives the before path's bytes, step after step."""
    import torch

    from ratatouille_hub.data import Normalization
    from ratatouille_hub.train import DomainBatches, device_batch

    before = Before(domains, before_data, before_train)
    batches = DomainBatches(domains, PER_DOMAIN, seed=BATCH_SEED)
    generator, normalize = torch.Generator().manual_seed(AUGMENT_SEED), Normalization(MEAN, STD)
    for step in range(steps):
        expected, expected_labels = before.step()
        x, labels = device_batch(next(batches), torch.device("cpu"), normalize, generator)
        if not (torch.equal(x, expected) and torch.equal(labels, expected_labels)):
            raise SystemExit(f"after differs from before at step {step}: the benchmark compares unequal work")


def machine_busy_seconds() -> float:
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(path, seconds: float, repeats: int) -> dict:
    """Median images per CPU-second and per wall second over `repeats` runs of about `seconds` each, and the
    CPUs' worth of other processes' work during them."""
    path.step()  # warm-up: first-touch allocations, the pinned pool
    start = time.perf_counter()
    path.step()
    steps = max(3, round(seconds / max(time.perf_counter() - start, 1e-6)))
    per_cpu, per_wall, others = [], [], []
    for _ in range(repeats):
        wall, cpu, machine = time.perf_counter(), time.process_time(), machine_busy_seconds()
        for _ in range(steps):
            path.step()
        getattr(path, "finish", lambda: None)()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        images = steps * DOMAINS * PER_DOMAIN
        per_cpu.append(images / cpu)
        per_wall.append(images / wall)
        others.append(max(0.0, machine_busy_seconds() - machine - cpu) / wall)
    return {
        "steps": steps,
        "images_per_cpu_s": round(statistics.median(per_cpu), 1),
        "images_per_wall_s": round(statistics.median(per_wall), 1),
        "ms_per_step": round(1000 * DOMAINS * PER_DOMAIN / statistics.median(per_cpu), 2),
        "others_cpus": round(statistics.mean(others), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    from ratatouille_hub.allocator import tune_allocator

    allocator = tune_allocator()
    import torch

    torch.set_num_threads(1)
    before_data, before_train = before_modules()
    domains = make_domains(args.px)
    check_parity(domains, before_data, before_train)
    paths = {
        "before: host gathers, augments, normalises": Before(domains, before_data, before_train),
        "after: host gathers, draws, copies": AfterHost(domains),
        "after: device augments, normalises (this CPU)": AfterDeviceOnCpu(domains),
    }
    rows = []
    for name, path in paths.items():
        print(f"{name} ...", flush=True)
        rows.append({"path": name, **measure(path, args.seconds, args.repeats)})
    host_before, host_after = rows[0]["images_per_cpu_s"], rows[1]["images_per_cpu_s"]
    results = {
        "machine": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "malloc_tuned": allocator,
        },
        "px": args.px,
        "batch": f"{DOMAINS} domains x {PER_DOMAIN}",
        "threads": torch.get_num_threads(),
        "before_commit": BEFORE,
        "parity_checked": True,
        "goal_images_per_core_s": GOAL,
        "rows": rows,
        "host_speedup": round(host_after / host_before, 1),
        "goal_met": host_after >= GOAL,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(results: dict) -> None:
    machine = results["machine"]
    device = machine["cuda"] or "no GPU: no copy, the device is this CPU"
    print(f"\n{machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}, 1 thread, {device}")
    print(f"{results['px']} px, {results['batch']} images a step; images per CPU-second = images/s per core\n")
    header = f"{'path':<48} {'img/CPU-s':>10} {'img/wall-s':>11} {'ms/step':>8} {'others':>7}"
    print(header + "\n" + "-" * len(header))
    for row in results["rows"]:
        print(
            f"{row['path']:<48} {row['images_per_cpu_s']:>10,.0f} {row['images_per_wall_s']:>11,.0f} "
            f"{row['ms_per_step']:>8.2f} {row['others_cpus']:>7.2f}"
        )
    met = "met" if results["goal_met"] else "NOT met"
    print(
        f"\nhost share: {results['host_speedup']}x before's; goal {results['goal_images_per_core_s']:,.0f} images/s "
        f"per host core: {met}"
    )


if __name__ == "__main__":
    main()
