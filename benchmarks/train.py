"""Training-speed benchmark: images/s of the product's fine-tune step against a bare PyTorch loop.

    python benchmarks/train.py [--threads 2 [1 ...]] [--repeats 3] [--models efficientnet-lite0 tiny-resnet]

Ours is `ratatouille_hub.train.optimize` called as `recipe/executor.py::train_run` calls it for a run's
fine-tune: every parameter, augmentation on, BatchNorm statistics frozen, dropout 0, fp32 through
`make_accelerator("no")`, here without validation. The bare loop is what one writes by hand on the same model
(a deep copy of one load, so the same init), channels_last as the product makes it, Adam with the same lr and
weight decay, the same `data.augment` (same seed) and `Normalization`, BatchNorm frozen once with
`train_mode_frozen_bn`, then forward, backward, step, zero_grad. Both run in one process whose glibc allocator
is tuned as the CLI tunes it (`allocator.tune_allocator`). Models: EfficientNet-Lite0 (the shared ImageNet
checkpoint, loaded with `load_classifier` and a 7-class PACS head) at 128 px and the tiny ResNet of
`ratatouille_hub.testing` at 32 px. Both loops read the same pre-generated uint8 batches: random images in 3
domains, drawn by `DomainBatches` with 32 images per domain (96 a step, as a recipe with batch_size 32 and three
training domains), materialised before timing and cycled, so batch assembly is in neither timing (its own cost
is reported on the side).

A measurement is one whole `optimize` call of N steps with the bare loop's N steps interleaved: the batch
iterator handed to `optimize` runs one bare step (timed apart) before each batch it hands over, so the loops
alternate step by step and the drift of this machine's speed (+-15% over tens of seconds with nothing else
running) hits both alike. Ours's time is the call less the bare steps, so its per-call costs (optimizer, layout
changes, the state it returns, the Accelerator's garbage collection) count; the bare loop's is its set-up
(a fresh Adam per measurement) and its steps. After a warm-up (both loops run the same steps from the same
weights: their weights must then agree, which checks that they do the same work) the measurement is taken
`--repeats` times; `ratio` is ours over bare in images/s of the median measurements, `step ratio` the same for
median steps (the steady state of a 5001-step run, where per-call costs vanish). N is sized from the fastest
warm-up step for about `Case.seconds` a loop. Threads: torch.set_num_threads(`--threads`, 2 by default).

Other processes on a machine of few cores stall torch's worker threads (tens of times slower at 2 threads on 2
cores), so a measurement starts after a quiet second (others under QUIET CPUs beyond the cores the threads
leave free; or after GATE_WAIT_S of waiting), and one during which others averaged ABORT_ABOVE CPUs beyond the
free cores is abandoned and taken again, ABORTS times a model at most; a model that never got a quiet machine
is reported as not measured. Results: benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train.json"
EFFICIENTNET = ROOT.parent / "shared" / "models" / "efficientnet-lite0-imagenet"
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
DOMAINS, PER_DOMAIN, IMAGES_PER_DOMAIN, POOL = 3, 32, 128, 8  # POOL: distinct batches, cycled
LR, WEIGHT_DECAY, AUGMENT_SEED = 5e-5, 1e-4, 1234  # run 0's lr, a drawn weight decay (RecipeConfig)
GOAL = 0.95
# CPUs of other processes, beyond the cores our threads leave free: under QUIET for a second starts a measurement
# (or GATE_WAIT_S of waiting does), over ABORT_ABOVE on average (after 1 s) abandons one, ABORTS times a model
QUIET, GATE_WAIT_S, ABORT_ABOVE, ABORTS = 0.1, 30.0, 0.3, 8


@dataclass(frozen=True)
class Case:
    name: str
    px: int
    seconds: float  # target time of each loop in a measurement
    warmup: int  # steps


CASES = {
    "efficientnet-lite0": Case("efficientnet-lite0", 128, 20.0, 3),
    "tiny-resnet": Case("tiny-resnet", 32, 6.0, 20),
}


def load_model(case: Case):
    import torch

    from ratatouille_hub.models import load_classifier
    from ratatouille_hub.testing import tiny_resnet

    if case.name == "tiny-resnet":
        return tiny_resnet(0, names=PACS_CLASSES)
    torch.manual_seed(0)  # the re-initialised 7-class head
    return load_classifier(EFFICIENTNET, dict(enumerate(PACS_CLASSES)))


def normalization(case: Case):
    from ratatouille_hub.data import Normalization

    if case.name == "tiny-resnet":
        return Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the tiny checkpoints' processor
    return Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the checkpoint's timm data_config


def batch_pool(case: Case):
    """POOL batches of DOMAINS x PER_DOMAIN random uint8 images, drawn as the recipe draws them; and the
    seconds one `DomainBatches` draw takes (its share of a real step, outside both timings)."""
    import torch

    from ratatouille_hub.data import ImageTensors
    from ratatouille_hub.train import DomainBatches

    generator = torch.Generator().manual_seed(0)
    domains = [
        ImageTensors(
            torch.randint(0, 256, (IMAGES_PER_DOMAIN, 3, case.px, case.px), dtype=torch.uint8, generator=generator),
            torch.randint(0, len(PACS_CLASSES), (IMAGES_PER_DOMAIN,), generator=generator),
        )
        for _ in range(DOMAINS)
    ]
    batches = DomainBatches(domains, PER_DOMAIN, seed=0)
    pool = [next(batches) for _ in range(POOL)]
    start = time.perf_counter()
    for _ in range(50):
        next(batches)
    return pool, (time.perf_counter() - start) / 50


# -- timing on a shared machine -----------------------------------------------------------------------


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds of the whole machine, of this process) so far."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    times = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), times.user + times.system


class Others:
    """CPUs' worth of other processes' work since creation (0 on a quiet machine)."""

    def __init__(self):
        self.start, (self.machine, self.ours) = time.perf_counter(), busy_seconds()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def cpus(self) -> float:
        machine, ours = busy_seconds()
        return max(0.0, (machine - self.machine) - (ours - self.ours)) / max(self.elapsed(), 1e-9)


def free_cpus() -> int:
    """Cores that torch's threads leave to other processes."""
    import torch

    return max(0, (os.cpu_count() or 1) - torch.get_num_threads())


class Busy(Exception):
    """Other processes took CPUs during a measurement."""


def wait_quiet() -> None:
    """Until a second in which other processes use under QUIET CPUs beyond the free cores, or GATE_WAIT_S."""
    start = time.perf_counter()
    while time.perf_counter() - start < GATE_WAIT_S:
        others = Others()
        time.sleep(1.0)
        if others.cpus() < free_cpus() + QUIET:
            return


class Attempts:
    def __init__(self, aborts: int):
        self.aborts_left, self.aborted = aborts, 0

    def run(self, measure_once):
        """measure_once() on a quiet machine; None when every abort allowed was spent."""
        while self.aborts_left > 0:
            wait_quiet()
            try:
                return measure_once()
            except Busy as busy:
                self.aborts_left -= 1
                self.aborted += 1
                print(f"    abandoned ({busy}); again", flush=True)
        return None


# -- the two loops, step by step ----------------------------------------------------------------------


class BareLoop:
    """The hand-written loop, one `step()` at a time (model already channels_last)."""

    def __init__(self, model, pool, normalize):
        import torch
        from torch import nn

        from ratatouille_hub.models import train_mode_frozen_bn

        self.model, self.normalize, self.batches = model, normalize, itertools.cycle(pool)
        self.generator = torch.Generator().manual_seed(AUGMENT_SEED)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.loss_fn = nn.CrossEntropyLoss()
        train_mode_frozen_bn(model)

    def step(self) -> None:
        import torch

        from ratatouille_hub.data import augment

        pixels, labels = next(self.batches)
        x = self.normalize(augment(pixels, self.generator)).contiguous(memory_format=torch.channels_last)
        loss = self.loss_fn(self.model(pixel_values=x).logits, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Interleaved:
    """Ours's batches (the pool, cycled); before handing each over it runs one bare step, timed apart, so the
    loops alternate step by step and drift in the machine's speed hits both alike. Raises Busy when, after a
    second, other processes averaged ABORT_ABOVE CPUs beyond the free cores."""

    def __init__(self, pool, bare: BareLoop, others: Others):
        self.batches, self.bare, self.others = itertools.cycle(pool), bare, others
        self.draws: list[float] = []  # ours's draws: its step i runs from exit[i] to draws[i + 1]
        self.enter: list[float] = []  # the bare step i runs from enter[i] to exit[i]
        self.exit: list[float] = []

    def __iter__(self):
        return self

    def __next__(self):
        self.draws.append(time.perf_counter())
        if self.others.elapsed() > 1.0 and (cpus := self.others.cpus()) > free_cpus() + ABORT_ABOVE:
            raise Busy(f"others busy on {cpus:.2f} CPUs")
        self.enter.append(time.perf_counter())  # the check (reading /proc/stat) is in neither loop's time
        self.bare.step()
        self.exit.append(time.perf_counter())
        return next(self.batches)


@dataclass
class Pair:
    ours_s: float  # the optimize call, less the bare steps run inside it
    bare_s: float  # the bare loop's set-up and steps
    ours_step_s: list[float]  # ours's steps 1..N-1 (its last one ends inside optimize's wind-down)
    bare_step_s: list[float]
    ours_fixed_s: float  # ours's call less its steps (the last step counted at the median)
    bare_fixed_s: float
    others_cpus: float


def paired_call(ours, bare, pool, steps: int, normalize, accelerator) -> Pair:
    """One `optimize` call of `steps` steps on `ours`, as train_run makes it for a run's fine-tune, with the
    bare loop's `steps` steps on `bare` interleaved."""
    from ratatouille_hub.train import optimize

    others = Others()
    start = time.perf_counter()
    bare_loop = BareLoop(bare, pool, normalize)
    bare_fixed = time.perf_counter() - start
    feed = Interleaved(pool, bare_loop, others)
    start = time.perf_counter()
    optimize(
        ours,
        feed,
        parameters=list(ours.parameters()),
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
    wall = time.perf_counter() - start
    bare_steps = [b - a for a, b in zip(feed.enter, feed.exit)]
    ours_steps = [b - a for a, b in zip(feed.exit, feed.draws[1:])]
    ours_s = wall - sum(bare_steps) - sum(b - a for a, b in zip(feed.draws, feed.enter))
    return Pair(
        ours_s=ours_s,
        bare_s=bare_fixed + sum(bare_steps),
        ours_step_s=ours_steps,
        bare_step_s=bare_steps,
        ours_fixed_s=ours_s - sum(ours_steps) - statistics.median(ours_steps),
        bare_fixed_s=bare_fixed,
        others_cpus=others.cpus(),
    )


def max_abs_difference(first, second) -> float:
    a, b = first.state_dict(), second.state_dict()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# -- harness ------------------------------------------------------------------------------------------


def measure(case: Case, repeats: int, steps: int | None, accelerator) -> dict:
    import torch

    from ratatouille_hub.models import to_channels_last

    print(f"{case.name} at {case.px} px, {torch.get_num_threads()} threads: loading, warming up", flush=True)
    normalize = normalization(case)
    pool, draw_s = batch_pool(case)
    base = load_model(case)
    batch = DOMAINS * PER_DOMAIN
    row = {
        "model": case.name,
        "px": case.px,
        "batch": batch,
        "batch_layout": f"{DOMAINS} domains x {PER_DOMAIN}",
        "threads": torch.get_num_threads(),
        "warmup_steps": case.warmup,
        "parameters": sum(p.numel() for p in base.parameters()),
        "domain_batches_draw_ms": round(1000 * draw_s, 3),
    }
    attempts = Attempts(ABORTS)
    busy = f"other processes kept the machine busy ({ABORTS} tries)"

    def warm_up():
        ours, bare = copy.deepcopy(base), to_channels_last(copy.deepcopy(base))
        return ours, bare, paired_call(ours, bare, pool, case.warmup, normalize, accelerator)

    warm = attempts.run(warm_up)
    if warm is None:
        return {**row, "not_measured": busy}
    ours, bare, warm_pair = warm
    row["max_abs_diff_after_warmup"] = max_abs_difference(ours, bare)  # same init, batches, seed and steps
    if steps is None:  # from the fastest warm-up step, the least disturbed one
        steps = max(5, round(case.seconds / min(warm_pair.ours_step_s + warm_pair.bare_step_s)))
    row["steps"] = steps
    print(f"  {steps} steps ({steps * batch} images) a loop a measurement, {repeats} measurements", flush=True)
    pairs: list[Pair] = []
    for _ in range(repeats):
        pair = attempts.run(lambda: paired_call(ours, bare, pool, steps, normalize, accelerator))
        if pair is None:
            return {**row, **pair_fields(pairs), "not_measured": busy}
        pairs.append(pair)
        print(
            f"  ours {pair.ours_s:.2f} s, bare {pair.bare_s:.2f} s (others on {pair.others_cpus:.2f} CPUs)", flush=True
        )
    for name in ("ours", "bare"):
        median_step = statistics.median(s for pair in pairs for s in getattr(pair, f"{name}_step_s"))
        row[f"{name}_images_per_s"] = round(
            steps * batch / statistics.median(getattr(p, f"{name}_s") for p in pairs), 2
        )
        row[f"{name}_step_median_images_per_s"] = round(batch / median_step, 2)
        row[f"{name}_per_call_s"] = round(statistics.median(getattr(p, f"{name}_fixed_s") for p in pairs), 3)
    row["ratio"] = round(row["ours_images_per_s"] / row["bare_images_per_s"], 4)
    row["step_ratio"] = round(row["ours_step_median_images_per_s"] / row["bare_step_median_images_per_s"], 4)
    row["goal_met"] = row["ratio"] >= GOAL
    row["abandoned_measurements"] = attempts.aborted
    return {**row, **pair_fields(pairs)}


def pair_fields(pairs: list[Pair]) -> dict:
    fields = {}
    for name in ("ours", "bare"):
        fields[f"{name}_samples_s"] = [round(getattr(p, f"{name}_s"), 3) for p in pairs]
        fields[f"{name}_step_median_samples_ms"] = [
            round(1000 * statistics.median(getattr(p, f"{name}_step_s")), 2) for p in pairs
        ]
        fields[f"{name}_steps_first_sample_ms"] = (
            [round(1000 * s, 1) for s in getattr(pairs[0], f"{name}_step_s")] if pairs else []
        )
    fields["others_cpus"] = [round(p.others_cpus, 2) for p in pairs]
    return fields


def machine() -> dict:
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown"
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
    }


def run_benchmark(models: list[str], threads: list[int], repeats: int, steps: int | None) -> dict:
    import torch

    from ratatouille_hub.train import make_accelerator

    info = machine()
    accelerator = make_accelerator("no")
    rows = []
    for count in threads:
        torch.set_num_threads(count)  # after the Accelerator, which may set threads of its own
        rows += [measure(CASES[name], repeats, steps, accelerator) for name in models]
    info["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    return {
        "machine": info,
        "precision": "fp32 (make_accelerator('no'))",
        "tqdm_enabled": sys.stderr.isatty(),
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "repeats": repeats,
        "goal_ratio": GOAL,
        "rows": rows,
    }


def print_table(results: dict) -> None:
    info = results["machine"]
    print(f"\n{info['cpu']}, {info['cpus']} CPUs, torch {info['torch']}, fp32")
    print(
        f"{'model':<20}{'px':>5}{'batch':>7}{'threads':>9}{'ours img/s':>12}{'bare img/s':>12}{'ratio':>8}"
        f"{'step ratio':>12}"
    )
    for row in results["rows"]:
        head = f"{row['model']:<20}{row['px']:>5}{row['batch']:>7}{row['threads']:>9}"
        if "not_measured" in row:
            print(f"{head}  not measured: {row['not_measured']}")
            continue
        print(
            f"{head}{row['ours_images_per_s']:>12.1f}{row['bare_images_per_s']:>12.1f}{100 * row['ratio']:>7.1f}%"
            f"{100 * row['step_ratio']:>11.1f}%"
        )
    for row in results["rows"]:
        if "not_measured" in row:
            continue
        print(
            f"  {row['model']} ({row['threads']} threads): {row['steps']} steps a loop a measurement; a call's cost"
            f" besides its steps: ours {row['ours_per_call_s']:.2f} s, bare {row['bare_per_call_s']:.3f} s;"
            f" a DomainBatches draw {row['domain_batches_draw_ms']:.2f} ms (in neither); max |ours - bare| after"
            f" warm-up {row['max_abs_diff_after_warmup']:.3g}; others on {max(row['others_cpus']):.2f} CPUs at most;"
            f" {row['abandoned_measurements']} abandoned"
        )


def main(argv: list[str] | None = None) -> None:
    from ratatouille_hub.allocator import SETTINGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES), help="models to time")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads, both loops")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per model (median kept)")
    parser.add_argument("--steps", type=int, help="steps a loop a measurement (default: sized from the warm-up)")
    args = parser.parse_args(argv)
    from ratatouille_hub.allocator import tune_allocator

    allocator = tune_allocator()  # as the CLI does before torch allocates anything; both loops share it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ratatouille_hub import logs

    with logs.library_output(logs.DEFAULT):  # the libraries' own bars and load chatter would bury the table
        results = run_benchmark(args.models, args.threads, args.repeats, args.steps)
    results["machine"]["malloc"] = {
        "tuned_by_product": allocator,
        "from_environment": {k: os.environ[k] for k in SETTINGS if k in os.environ},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
