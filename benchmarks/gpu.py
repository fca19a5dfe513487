"""GPU benchmark: the product's fine-tune speed against a bare PyTorch loop, and one PACS cell at 224 px.

    python benchmarks/gpu.py [--part throughput|pacs|all] [--budget-s 540] [--shared DIR] [--output FILE]
    python benchmarks/gpu.py --smoke      # CPU, tiny, about a minute: the machinery, not the numbers

Made to run once on a lent H200-class GPU, offline, inside a hard budget: every part runs in a child process
killed at its share of `--budget-s`, and the JSON is rewritten as each part (and each row of a part) finishes,
so it is always there before the limit, a part that ran out of time marked `timed_out` with what it finished.

Part `throughput` (224 px; EfficientNet-Lite0 from SHARED/models and a ResNet-50 randomly initialised from
transformers' ResNetConfig defaults, both with a 7-class head; bf16 autocast and fp32): the product's fine-tune
(`train.optimize` as `recipe/executor.py::train_run` calls it: every parameter, augmentation on, BatchNorm
statistics frozen, no validation; precision through `make_accelerator`) against the bare loop one writes by
hand (benchmarks/train.py's approach: a deep copy of the same load, channels_last, Adam with the same lr and
weight decay, the same `data.augment` and `Normalization`, `torch.autocast` for bf16, forward, backward, step,
zero_grad). Both read the same pre-drawn uint8 batches (3 domains x 32 images, 96 a step, drawn by
`DomainBatches`, so pinned where CUDA is present) and copy each to the device as they go; one batch draw's
host time is reported apart. After a warm-up, each loop runs 3 times, alternating, N steps a time
(N sized from the warm-up to fill the part's budget), the device synchronised before and after; images/s is
from the median time, `ratio` ours over bare. Host-side stall: a few more steps of each loop under
torch.profiler, every step marked from one batch to the next; over the steps but the first and the last, the
time the GPU ran no kernel, copy or memset, per step (the profiler's own host overhead is in it, so it bounds
the stall from above). Peak device memory per row.

Part `pacs` (224 px): one cell of benchmarks/pacs.py's table through its own functions (local Hub seeded from
SHARED, `intertrain` ingredients pushed to it, the product's `sweep`): test domain TEST_DOMAIN, strategies erm,
soup and ratatouille, trial 0, 32 images per domain per step (the paper's), precision `auto`. Runs and steps
are as many as fit the part's budget, from the product's measured step time (the throughput part's bf16 row
for EfficientNet-Lite0, or a guess): the most runs (1 + 3k: one from the base and one from each of k
fine-tunes per auxiliary dataset) at which each run still gets MIN_STEPS steps, then the steps that fit, up to
the paper's 5001; each auxiliary fine-tune trains as many steps as a run.

SHARED (`--shared`) is a folder laid out as ../shared is: models/efficientnet-lite0-imagenet and
data/{pacs,caltech101,clothing,cifar10}; the default is the first of ./shared and ../shared that exists.
`--smoke` runs both parts on this CPU at a tiny size (the stand-in shared folder it builds holds a tiny timm
model and toy datasets), in a temporary folder unless `--work` names one; its JSON goes there, not into results.
Results: benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
BASE_NAME = "efficientnet-lite0-imagenet"
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
LR, WEIGHT_DECAY, AUGMENT_SEED = 5e-5, 1e-4, 1234  # run 0's lr, a drawn weight decay (as benchmarks/train.py)
TEST_DOMAIN = "sketch"  # PACS's largest domain; the toy world of --smoke has one of that name too
CELL_STRATEGIES = ("erm", "soup", "ratatouille")
MIN_STEPS, MAX_STEPS = 1000, 5001  # a run's steps: at least this many before adding runs; the paper's
MAX_AUX_PER_TRIAL = 6  # 19 runs: about the paper's 20
THROUGHPUT_SHARE, THROUGHPUT_MOST_S = 0.4, 220.0  # of the budget, with both parts
RESERVE_S = 10.0  # kept back from the budget: the children are stopped by then, the JSON written
STEP_SHARE = 0.4  # of the cell's seconds, for optimisation steps (a guess until a GPU run says)
GUESSED_STEP_S = 0.06  # a step of 96 images at 224 px when no throughput row says (an H200's, roughly)


@dataclass(frozen=True)
class Size:
    """What a run of the benchmark measures at: --smoke's tiny size on CPU, or the real one."""

    px: int
    per_domain: int  # images per domain per step (3 domains)
    images_per_domain: int  # distinct images per domain behind the pre-drawn batches
    pool: int  # pre-drawn batches, cycled
    warmup_steps: int
    loop_seconds: float  # target time of each loop in one measurement (upper bound)
    repeats: int  # measurements of each loop, alternating
    profile_steps: int
    resnet: str  # "resnet-50", or the smoke's tiny ResNet


REAL = Size(224, 32, 256, 8, 5, 4.0, 3, 8, "resnet-50")
SMOKE = Size(32, 4, 8, 2, 1, 0.01, 1, 3, "tiny-resnet")


# -- orchestration -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("throughput", "pacs", "all"), default="all")
    parser.add_argument("--budget-s", type=float, help="hard wall-clock budget of the parts (default 540; 600 smoke)")
    parser.add_argument("--shared", type=Path, help="models/ and data/ as ../shared lays them out")
    parser.add_argument("--output", type=Path, help=f"the JSON (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--work", type=Path, help="run folders and the local Hub (default: benchmarks/scratch/gpu)")
    parser.add_argument("--smoke", action="store_true", help="both parts at a tiny size on CPU")
    parser.add_argument("--pacs-steps", type=int, help="a run's steps in the PACS cell (default: what fits)")
    parser.add_argument("--pacs-aux-per-dataset", type=int, help="k: runs are 1 + 3k (default: what fits)")
    parser.add_argument("--child", choices=("throughput", "pacs"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # time.time() by which a child ends
    parser.add_argument("--part-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return
    started = time.time()
    budget = args.budget_s or (600.0 if args.smoke else 540.0)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        work = (args.work or (Path(scratch) if args.smoke else ROOT / "benchmarks" / "scratch" / "gpu")).resolve()
        work.mkdir(parents=True, exist_ok=True)
        output = (args.output or (work / "gpu-smoke.json" if args.smoke else RESULTS)).resolve()
        shared = stand_in_shared(work / "shared") if args.smoke else (args.shared or default_shared())
        parts = ("throughput", "pacs") if args.part == "all" else (args.part,)
        results = json.loads(output.read_text()) if output.exists() else {}
        results |= {"smoke": args.smoke, "machine": machine(), "shared": str(shared)}
        missing = preflight(shared.resolve(), parts, args.smoke)
        if missing:
            results["refused"] = missing
            write_json(output, results)
            raise SystemExit(f"gpu.py: {missing}")
        results.pop("refused", None)
        for part in parts:
            deadline = started + budget - RESERVE_S
            if part == "throughput" and len(parts) > 1:
                deadline = min(deadline, started + min(THROUGHPUT_SHARE * budget, THROUGHPUT_MOST_S))
            part_started = time.time()
            results[part] = {"status": "running", "budget_s": round(deadline - part_started, 1)}
            write_json(output, results)
            results[part] = run_part(part, deadline, work, shared.resolve(), output, args) | {
                "budget_s": results[part]["budget_s"],
                "wall_s": round(time.time() - part_started, 1),
            }
            write_json(output, results)
            print(f"[gpu] {part}: {results[part]['status']} in {results[part]['wall_s']:.0f} s", flush=True)
    print_summary(results)
    print(f"\nwrote {output}")


def default_shared() -> Path:
    """./shared (the device machine's copy) or ../shared (beside a developer's checkout)."""
    return next((p for p in (ROOT / "shared", ROOT.parent / "shared") if p.is_dir()), ROOT.parent / "shared")


def preflight(shared: Path, parts: tuple[str, ...], smoke: bool) -> str | None:
    """What is missing for `parts`, said before any of the budget is spent; None when all is there."""
    import importlib.util

    modules = ("torch", "transformers", "accelerate", "timm", "datasets", "evaluate", "huggingface_hub", "yaml")
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"Python packages missing: {', '.join(absent)} (README.md, 'On a GPU', says how to carry them)"
    needed = [shared / "models" / BASE_NAME / "model.safetensors"]
    if "pacs" in parts:
        needed += [shared / "data" / name for name in ("pacs", "caltech101", "clothing", "cifar10")]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        return f"not found (--shared {shared}): {', '.join(absent)}"
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device: this benchmark is for a GPU (--smoke runs it tiny on CPU)"
    return None


def run_part(part: str, deadline: float, work: Path, shared: Path, output: Path, args) -> dict:
    """`part` in a child process, stopped (its whole process group) at `deadline`; its JSON as it left it."""
    part_output = work / f"{part}.part.json"
    part_output.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--deadline", str(deadline)]
    command += ["--part-output", str(part_output), "--shared", str(shared), "--work", str(work)]
    command += ["--output", str(output)] + (["--smoke"] if args.smoke else [])
    for flag, value in (("--pacs-steps", args.pacs_steps), ("--pacs-aux-per-dataset", args.pacs_aux_per_dataset)):
        command += [flag, str(value)] if value is not None else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.smoke:  # tiny tensors: one thread is as fast, and does not stall when other processes share the cores
        env["OMP_NUM_THREADS"] = "1"
    child = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        returncode = child.wait(timeout=max(1.0, deadline - time.time()))
        status = "done" if returncode == 0 else f"failed (exit {returncode})"
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            os.killpg(child.pid, sig)
            try:
                child.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        status = "timed_out"
    found = json.loads(part_output.read_text()) if part_output.exists() else {}
    return found | {"status": status}


def run_child(args) -> None:
    from ratatouille_hub.allocator import tune_allocator

    tune_allocator()  # as the CLI does, before torch allocates anything
    size = SMOKE if args.smoke else REAL
    if args.child == "throughput":
        throughput(size, args.shared, args.deadline, args.part_output)
    else:
        pacs_cell(size, args, args.deadline, args.part_output)


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists (name, driver), without initialising CUDA in this parent process, whose parts
    then have the device to themselves; [] where there is none."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def write_json(path: Path, data: dict) -> None:
    """Atomically: a part killed mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(staging, path)


def machine() -> dict:
    import importlib.metadata

    # the machine's CPUs (this parent imports nothing of the package: it is not on its path on a lent machine)
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    info["gpus"] = gpu_names()
    for package in ("torch", "transformers", "accelerate", "timm", "datasets", "huggingface_hub"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


# -- throughput --------------------------------------------------------------------------------------------


def throughput(size: Size, shared: Path, deadline: float, part_output: Path) -> None:
    import torch

    from ratatouille_hub import logs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found: dict = {"device": device_description(device), "size": asdict(size), "rows": []}
    configs = [(model, precision) for model in ("efficientnet-lite0", size.resnet) for precision in ("bf16", "fp32")]
    with logs.library_output(logs.DEFAULT):
        for index, (name, precision) in enumerate(configs):
            share = (deadline - time.time()) / (len(configs) - index)  # what is left, spread over what is left
            print(f"[throughput] {name}, {precision}: {share:.0f} s", flush=True)
            found["rows"].append(measure_row(name, precision, size, shared, device, share))
            write_json(part_output, found)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def device_description(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"type": "cpu", "threads": torch.get_num_threads()}
    properties = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": properties.name,
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }


def load_model(name: str, shared: Path):
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from ratatouille_hub.models import load_classifier
    from ratatouille_hub.testing import labels, tiny_resnet

    torch.manual_seed(0)  # the re-initialised 7-class head; ResNet's weights
    if name == "efficientnet-lite0":
        return load_classifier(shared / "models" / BASE_NAME, dict(enumerate(PACS_CLASSES)))
    if name == "tiny-resnet":
        return tiny_resnet(0, names=PACS_CLASSES)
    return ResNetForImageClassification(ResNetConfig(**labels(PACS_CLASSES)))  # the defaults are ResNet-50's


def batch_pool(size: Size):
    """`size.pool` batches of 3 domains x `size.per_domain` random uint8 images, drawn as the recipe draws them
    (pinned where CUDA is present); and the host seconds one `DomainBatches` draw takes."""
    import torch

    from ratatouille_hub.data import ImageTensors
    from ratatouille_hub.train import DomainBatches

    generator = torch.Generator().manual_seed(0)
    shape = (size.images_per_domain, 3, size.px, size.px)
    domains = [
        ImageTensors(
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator),
            torch.randint(0, len(PACS_CLASSES), (size.images_per_domain,), generator=generator),
        )
        for _ in range(3)
    ]
    batches = DomainBatches(domains, size.per_domain, seed=0)
    pool = [next(batches) for _ in range(size.pool)]
    start = time.perf_counter()
    for _ in range(20):
        next(batches)
    return pool, (time.perf_counter() - start) / 20


class StepMarks:
    """The pool, cycled; with a profiler, each step marked as a range from its batch to the next one's."""

    def __init__(self, pool, marked: bool = False):
        self.batches, self.marked, self.open = itertools.cycle(pool), marked, None

    def __iter__(self):
        return self

    def __next__(self):
        self.close()
        if self.marked:
            import torch

            self.open = torch.profiler.record_function(STEP_MARK)
            self.open.__enter__()
        return next(self.batches)

    def close(self) -> None:
        if self.open is not None:
            self.open.__exit__(None, None, None)
            self.open = None


STEP_MARK = "gpu-bench-step"


class BareLoop:
    """The hand-written loop (model already channels_last on the device), one `step()` at a time."""

    def __init__(self, model, device, normalize, precision: str):
        import torch
        from torch import nn

        from ratatouille_hub.models import train_mode_frozen_bn

        self.model, self.device, self.normalize = model, device, normalize
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.generator = torch.Generator().manual_seed(AUGMENT_SEED)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.loss_fn = nn.CrossEntropyLoss()
        train_mode_frozen_bn(model)

    def step(self, batch) -> None:
        import torch

        from ratatouille_hub.data import augment

        pixels, labels = (t.to(self.device, non_blocking=True) for t in batch)
        x = self.normalize(augment(pixels, self.generator)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(pixel_values=x).logits
        loss = self.loss_fn(logits.float(), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, feed: StepMarks, steps: int) -> None:
        for _ in range(steps):
            self.step(next(feed))
        feed.close()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours_call(model, feed, steps: int, accelerator, normalize) -> None:
    """One `optimize` call of `steps` steps, as train_run makes it for a run's fine-tune."""
    from ratatouille_hub.train import optimize

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
    feed.close()


def timed(device, work) -> float:
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def fresh_accelerator(precision: str):
    """`make_accelerator` after clearing accelerate's process-wide state, which holds one precision per process
    (and which `Accelerator.autocast` reads): the precisions take turns here, the product keeps one."""
    from accelerate.state import AcceleratorState

    from ratatouille_hub.train import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(precision)


def measure_row(name: str, precision: str, size: Size, shared: Path, device, seconds: float) -> dict:
    import torch

    from ratatouille_hub.data import Normalization
    from ratatouille_hub.models import to_channels_last

    started = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    accelerator = fresh_accelerator("bf16" if precision == "bf16" else "no")
    normalize = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pool, draw_s = batch_pool(size)
    base = load_model(name, shared)
    ours, bare_model = copy.deepcopy(base), to_channels_last(copy.deepcopy(base)).to(device)
    bare = BareLoop(bare_model, device, normalize, precision)
    batch = 3 * size.per_domain
    row = {
        "model": name,
        "precision": precision,
        "px": size.px,
        "batch": batch,
        "parameters": sum(p.numel() for p in base.parameters()),
        "domain_batches_draw_ms": round(1000 * draw_s, 3),
    }
    warm = [
        timed(device, lambda: ours_call(ours, StepMarks(pool), size.warmup_steps, accelerator, normalize)),
        timed(device, lambda: bare.run(StepMarks(pool), size.warmup_steps)),
    ]
    row["warmup_s"] = [round(s, 3) for s in warm]
    left = seconds - (time.time() - started)
    step_s = max(min(warm) / size.warmup_steps, 1e-4)  # warm-ups include first-call costs: an over-estimate
    # 2 loops x repeats measurements, then the profiled steps of both; a third of the share kept back
    steps = max(2, min(2000, int(left * 0.66 / (2 * size.repeats * step_s)), round(size.loop_seconds / step_s)))
    row["steps"] = steps
    ours_s, bare_s = [], []
    for _ in range(size.repeats):
        ours_s.append(timed(device, lambda: ours_call(ours, StepMarks(pool), steps, accelerator, normalize)))
        bare_s.append(timed(device, lambda: bare.run(StepMarks(pool), steps)))
    for label, samples in (("ours", ours_s), ("bare", bare_s)):
        row[f"{label}_images_per_s"] = round(steps * batch / statistics.median(samples), 1)
        row[f"{label}_samples_s"] = [round(s, 4) for s in samples]
    row["ratio"] = round(row["ours_images_per_s"] / row["bare_images_per_s"], 4)
    row["ours_stall"] = profiled_stall(
        device, size.profile_steps, lambda feed: ours_call(ours, feed, size.profile_steps, accelerator, normalize), pool
    )
    row["bare_stall"] = profiled_stall(
        device, size.profile_steps, lambda feed: bare.run(feed, size.profile_steps), pool
    )
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    row["seconds"] = round(time.time() - started, 1)
    print(
        f"  ours {row['ours_images_per_s']:.0f} img/s, bare {row['bare_images_per_s']:.0f} img/s"
        f" ({100 * row['ratio']:.1f}%); stall {row['ours_stall'].get('ms_per_step')} ms a step",
        flush=True,
    )
    return row


def profiled_stall(device, steps: int, run, pool) -> dict:
    """The device's idle time per step over `steps` steps under torch.profiler (the first and the last left out:
    the call's set-up and wind-down); only on CUDA: on CPU the device is the host."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with tempfile.TemporaryDirectory() as folder:
        with profile(activities=activities) as profiler:
            run(StepMarks(pool, marked=True))
            synchronize(device)
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    found = device_idle(events, STEP_MARK)
    if device.type != "cuda":
        return {"ms_per_step": None, "why": "no CUDA device: the host is the device", "steps": found["steps"]}
    return found


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # the chrome trace's categories of device activity


def device_idle(events: list[dict], mark: str) -> dict:
    """From a chrome trace's events: the steps marked `mark` (host ranges, one per step), and over the steps but
    the first and the last, the time no device activity ran, in ms per step, and the device's busy share."""
    steps = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("name") == mark and e.get("cat") == "user_annotation"
    )
    if len(steps) < 3:
        return {"ms_per_step": None, "why": f"{len(steps)} marked steps: too few", "steps": len(steps)}
    window = (steps[1][0], steps[-2][1])
    work = [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in DEVICE_WORK
    ]
    busy = covered(work, window)
    span = window[1] - window[0]
    counted = len(steps) - 2
    return {
        "ms_per_step": round((span - busy) / 1000 / counted, 3),
        "step_ms": round(span / 1000 / counted, 3),
        "device_busy": round(busy / span, 4) if span > 0 else None,
        "steps": counted,
    }


def covered(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """The length of `window` that the union of `intervals` covers (overlaps counted once)."""
    total, reach = 0.0, window[0]
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, window[1])
        if end > start:
            total += end - start
            reach = end
    return total


# -- the PACS cell -----------------------------------------------------------------------------------------


def pacs_benchmark():
    """benchmarks/pacs.py as a module: the cell is its stages at another size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pacs_benchmark", ROOT / "benchmarks" / "pacs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class CellSize:
    aux_per_dataset: int  # k: runs are 1 + 3k, and 3k fine-tunes are made
    steps: int
    eval_every: int
    warmup: int
    lp_steps: int
    step_s: float  # the estimate it was sized from
    step_s_from: str


def cell_size(seconds: float, step_s: float, step_s_from: str, steps: int | None, k: int | None) -> CellSize:
    """The most runs at which each gets MIN_STEPS steps (or `k`), then the steps that fit (or `steps`), up to
    MAX_STEPS. STEP_SHARE of `seconds` goes to optimisation steps: decoding, the linear probe, evaluations,
    saving and the soups take the rest. A run costs its steps and a head warm-up; the 3k fine-tunes, each as many
    steps as a run of 32 images (a third of a cell step's 96)."""
    step_budget = STEP_SHARE * seconds / step_s

    def fit(aux: int) -> int:
        runs = (1 + 3 * aux) + 3 * aux  # the Soups runs (erm shares run 0) and the Ratatouille runs from fine-tunes
        per_step = runs * 1.2 + 3 * aux / 3  # a 20% warm-up; the fine-tunes' smaller batches
        return int(step_budget / per_step)

    if k is None:
        k = next((a for a in range(MAX_AUX_PER_TRIAL, 0, -1) if fit(a) >= MIN_STEPS), 1)
    steps = steps or max(10, min(MAX_STEPS, fit(k)))
    eval_every = max(1, steps // 5)
    steps = eval_every * (steps // eval_every)
    return CellSize(k, steps, eval_every, max(1, min(200, steps // 5)), min(5001, 50 * steps), step_s, step_s_from)


def measured_step_s(output: Path) -> tuple[float, str] | None:
    """The product's seconds per step of 96 images, bf16, EfficientNet-Lite0, from the throughput rows in `output`."""
    if not output.exists():
        return None
    rows = json.loads(output.read_text()).get("throughput", {}).get("rows", [])
    row = next((r for r in rows if (r["model"], r["precision"]) == ("efficientnet-lite0", "bf16")), None)
    if row is None or not row.get("ours_images_per_s"):
        return None
    return row["batch"] / row["ours_images_per_s"], f"throughput: {row['ours_images_per_s']} images/s at {row['px']} px"


def pacs_cell(size: Size, args, deadline: float, part_output: Path) -> None:
    pacs = pacs_benchmark()
    work = args.work / "pacs"
    pacs.configure(size.px, shared=args.shared, work=work, results=work / "results")
    known = measured_step_s(args.output)
    step_s, step_s_from = known or (GUESSED_STEP_S, "a guess: no throughput row")
    if args.smoke:
        step_s, step_s_from = 1.0, "--smoke: fixed tiny sizes"
    seconds = deadline - time.time()
    cell = cell_size(seconds, step_s, step_s_from, args.pacs_steps, args.pacs_aux_per_dataset)
    if args.smoke:
        cell = CellSize(1, 2, 2, 1, 2, step_s, step_s_from)
    pacs.scale_protocol(
        aux_runs=cell.aux_per_dataset,
        aux_steps=cell.steps,
        aux_per_trial=cell.aux_per_dataset,
        steps=cell.steps,
        eval_every=cell.eval_every,
        warmup=cell.warmup,
        batch=size.per_domain,
        lp_steps=cell.lp_steps,
    )
    found: dict = {
        "test_domain": TEST_DOMAIN,
        "strategies": list(CELL_STRATEGIES),
        "image_size": size.px,
        "images_per_domain_per_step": size.per_domain,
        "runs_per_strategy": pacs.RUNS,
        "size": asdict(cell),
        "seconds_at_start": round(seconds, 1),
        "stages_s": {},
    }
    write_json(part_output, found)
    os.chdir(ROOT)  # the sweep names its runs relative to the repository, as benchmarks/pacs.py does
    from ratatouille_hub.localhub.server import LocalHub, hub_environment

    with LocalHub(work / "hub") as hub:
        # Before any HF library is imported: they read these once, at import time.
        os.environ.update(hub_environment(hub.url, work / "hf-home"))
        os.environ.pop("HF_TOKEN", None)
        import torch

        from ratatouille_hub import logs
        from ratatouille_hub.environment import usable_cpus
        from ratatouille_hub.train import resolved_precision

        if not args.smoke:
            torch.set_num_threads(usable_cpus())
        # what the cell's numbers were made on: the sweep trains and scores there
        found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        found["precision"] = resolved_precision("auto")
        timings: dict = {}
        with logs.library_output(logs.DEFAULT):
            for stage, run in (
                ("seed the local Hub", lambda: pacs.seed_hub(hub)),
                (
                    "ingredients (intertrain, decoding included)",
                    lambda: pacs.intertrain_auxiliaries(timings, pacs.drawn_runs(None)),
                ),
                ("the cell (sweep)", lambda: pacs.run_trial(0, timings, (TEST_DOMAIN,), CELL_STRATEGIES)),
            ):
                started = time.time()
                run()
                found["stages_s"][stage] = round(time.time() - started, 1)
                write_json(part_output, found)
    found["accuracy"] = cell_accuracies(pacs)
    write_json(part_output, found)


def cell_accuracies(pacs) -> dict:
    """Each row of benchmarks/pacs.py's table that the cell's strategies make: validation and held-out accuracy,
    and what its runs cost."""
    from ratatouille_hub.results import Results

    rows = {}
    for row in pacs.ROWS:
        if row.cell not in CELL_STRATEGIES:
            continue
        results = Results.load(pacs.cell_path(0, TEST_DOMAIN, row.cell))
        scores = row.scores_of(results)
        rows[row.name] = {"val_accuracy": scores.val_accuracy, "test_accuracy": scores.test_accuracy}
    costs = {
        s: json.loads(pacs.cell_path(0, TEST_DOMAIN, s).with_suffix(".cost.json").read_text()) for s in CELL_STRATEGIES
    }
    return {"rows": rows, "cost": costs}


# -- --smoke's stand-in shared folder ------------------------------------------------------------------------


def stand_in_shared(folder: Path) -> Path:
    """models/ and data/ laid out as ../shared, tiny: a timm-wrapped EfficientNet of a few thousand parameters
    in the base's place, the toy world's 16 px shapes (4 domains, `sketch` among them) as PACS and its three
    auxiliary tasks as caltech101, clothing and cifar10."""
    if (folder / "done").exists():
        return folder
    from ratatouille_hub.testing import tiny_timm, write_hub_dataset
    from ratatouille_hub.toy import world

    cfg = {"input_size": [3, 16, 16], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
    tiny_timm(folder / "models" / BASE_NAME, {**cfg, "crop_pct": 1.0, "crop_mode": "center"})
    write_hub_dataset(world.target_dataset(per_class_per_domain=3, size=16), folder / "data" / "pacs")
    for name, dataset in zip(("caltech101", "clothing", "cifar10"), world.aux_datasets(per_class=4, size=16).values()):
        write_hub_dataset(dataset, folder / "data" / name)
    (folder / "done").touch()
    return folder


# -- report ----------------------------------------------------------------------------------------------------


def print_summary(results: dict) -> None:
    part = results.get("throughput")
    if part and part.get("rows"):
        print(f"\nthroughput on {part['device'].get('name', part['device']['type'])} ({part['status']}):")
        print(
            f"{'model':<20}{'precision':>10}{'px':>5}{'ours img/s':>12}{'bare img/s':>12}{'ratio':>8}{'stall ms':>10}"
        )
        for row in part["rows"]:
            stall = row["ours_stall"].get("ms_per_step")
            print(
                f"{row['model']:<20}{row['precision']:>10}{row['px']:>5}{row['ours_images_per_s']:>12.0f}"
                f"{row['bare_images_per_s']:>12.0f}{100 * row['ratio']:>7.1f}%{'-' if stall is None else stall:>10}"
            )
    cell = results.get("pacs")
    if cell and cell.get("accuracy"):
        size = cell["size"]
        print(
            f"\nPACS, test domain {cell['test_domain']}, {cell['image_size']} px, {cell['runs_per_strategy']} runs of"
            f" {size['steps']} steps ({cell['status']}): held-out accuracy"
        )
        for row, scores in cell["accuracy"]["rows"].items():
            print(f"  {row:<60}{100 * scores['test_accuracy']:>6.1f}%")
    elif cell:
        print(f"\nPACS cell: {cell['status']} (stages done: {', '.join(cell.get('stages_s', {})) or 'none'})")


if __name__ == "__main__":
    main()
