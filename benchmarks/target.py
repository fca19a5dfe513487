"""Targets at DomainNet size (issue 23, item 2): what planning and preparing a target cost at N images, and
what training reads per second from a cached and from a streamed target.

    python benchmarks/target.py [--sizes 25000 50000 100000 200000] [--parts plan prepare train calibrate]
    python benchmarks/target.py --smoke       # 120 images, in one process: checks the script, not numbers
    python benchmarks/target.py --table       # print the saved results

Data: N generated JPEGs (--px square, a smooth background and a class's shape, quality 90), written once
into benchmarks/scratch/target/pool-<px>px/ and linked into a DomainBed folder per N (6 domains named as DomainNet's,
20 classes: ROOT/<domain>/<class>/<image>.jpg), DomainNet's own layout. A base: the tests' tiny ResNet.

Each case runs alone in a fresh child process (the product's allocator settings), which reports its seconds
(imports excluded), its CPU seconds (its own and its reaped DataLoader workers': what the wall time would be
on one free core) and its peak RSS (VmHWM, file pages it mapped included):

  plan       TargetPreparation(...).spec(): what `plan` and `recycle --dry-run` do (reads every file's bytes
             for the DomainBed fingerprint, decodes nothing);
  cached     the same, then decode(cache=...) into a fresh cache at --image-size: every image decoded by
             DataLoader workers and written in order; cache bytes are the files' allocated blocks;
  streamed   the same with cache_budget_gb=0: nothing decoded, no cache;
  train      `optimize` of the tiny ResNet on the target of the smallest N (5 training domains x 32 images
             a step, augmented; one torch thread), cached and streamed (decode_workers(): one DataLoader
             worker per CPU): images/s over --steps steps after --warmup; beside it the loader alone
             (DomainBatches' batches, no model): the most a faster model could be fed;
  calibrate  ms per image of `ImageSource.decode_into` (one process) for 500 x 375 JPEGs resized to 224 px,
             the photo-like size DomainNet's extrapolation in the README uses.

A machine shared with other work: run the timed parts under /tmp/quiet-run. Each N's rows are kept, so sizes
and parts can be measured apart. Results: benchmarks/results/target.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "benchmarks" / "scratch" / "target"
RESULTS = ROOT / "benchmarks" / "results" / "target.json"
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")  # DomainNet's six
CLASSES = 20
PER_DOMAIN = 32  # images per training domain per step: 5 x 32 = 160 a step
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_TOP_PAD_": str(1 << 30)}
PARTS = ("plan", "prepare", "train", "calibrate")


# -- data: generated once, linked into one DomainBed folder per size ------------------------------------


def image(index: int, px: int):
    """Image `index`: a smooth two-colour gradient (its own) and its class's shape, as a PIL image."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    label = (index // len(DOMAINS)) % CLASSES
    ramp = np.linspace(0.0, 1.0, px, dtype=np.float32)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = start + (end - start) * ((ramp[:, None] + ramp[None, :]) / 2)[..., None]
    picture = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    box = [px * (0.2 + 0.02 * (label % 5)), px * 0.25, px * (0.6 + 0.02 * (label // 5)), px * 0.8]
    colour = tuple(int(c) for c in np.random.default_rng(1000 + label).integers(0, 256, 3))
    (draw.ellipse if label % 2 else draw.rectangle)(box, fill=colour)
    return picture


def write_pool(count: int, px: int, pool: Path) -> None:
    """Images 0..count-1 in `pool` (those already there are kept)."""
    pool.mkdir(parents=True, exist_ok=True)
    have = {entry.name for entry in os.scandir(pool)}
    for index in range(count):
        name = f"{index:07d}.jpg"
        if name not in have:
            image(index, px).save(pool / name, quality=90)


def dataset_folder(count: int, px: int, scratch: Path) -> Path:
    """The DomainBed folder of images 0..count-1: image i in domain i mod 6, class (i div 6) mod 20."""
    folder = scratch / f"domainbed-{px}px-{count}"
    if (folder / ".complete").is_file():
        return folder
    pool = scratch / f"pool-{px}px"
    write_pool(count, px, pool)
    shutil.rmtree(folder, ignore_errors=True)
    for domain in DOMAINS:
        for label in range(CLASSES):
            (folder / domain / f"class{label:02d}").mkdir(parents=True)
    for index in range(count):
        domain, label = DOMAINS[index % len(DOMAINS)], (index // len(DOMAINS)) % CLASSES
        os.link(pool / f"{index:07d}.jpg", folder / domain / f"class{label:02d}" / f"{index:07d}.jpg")
    (folder / ".complete").touch()
    return folder


# -- children: each case alone in a fresh process ---------------------------------------------------


def child(spec: dict) -> dict:
    case = spec["case"]
    if case == "base":
        from ratatouille_hub import testing

        model = testing.tiny_resnet(0, names=[f"class{i:02d}" for i in range(CLASSES)])
        testing.save_tiny_checkpoint(Path(spec["base"]), model, processor=testing.tiny_processor(spec["size"]))
        return {}
    if case == "calibrate":
        return calibrate(Path(spec["scratch"]))
    import torch

    from ratatouille_hub.config import TargetOptions
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.models import load_processor
    from ratatouille_hub.target import TargetPreparation

    options = TargetOptions(target=spec["folder"], image_size=spec["size"], cache_budget_gb=spec.get("budget"))
    base = resolve_model(spec["base"])
    load_processor(base.path, base.source)  # imports `transformers` and `datasets`: not the target's cost
    start, start_cpu = time.perf_counter(), cpu_seconds()
    preparation = TargetPreparation(options, base)
    described = preparation.spec()
    planned, planned_cpu = time.perf_counter(), cpu_seconds()
    result = {"rows": described.val_size + sum(described.train_sizes) + described.test_size}
    if case == "plan":
        return {
            **result,
            "seconds": planned - start,
            "cpu_seconds": planned_cpu - start_cpu,
            "peak_rss_mb": memory_mb("VmHWM"),
        }
    target = preparation.decode(cache=Path(spec["cache"]))
    prepared, prepared_cpu = time.perf_counter(), cpu_seconds()
    result.update(
        plan_seconds=planned - start,
        seconds=prepared - planned,
        cpu_seconds=prepared_cpu - planned_cpu,
        streamed=not isinstance(target.test.pixels, torch.Tensor),
        peak_rss_mb=memory_mb("VmHWM"),
    )
    if case == "train":
        result.update(train(target, base, spec["steps"], spec["warmup"]))
    return result


def train(target, base, steps: int, warmup: int) -> dict:
    """Images/s of `optimize` and of the batches alone, after `warmup` steps (workers started, caches warm)."""
    import torch

    from ratatouille_hub.models import load_classifier
    from ratatouille_hub.train import DomainBatches, make_accelerator, optimize

    torch.set_num_threads(1)  # the decoding workers take the other cores (two threads on a shared machine stall)

    class Timed:
        def __init__(self, batches):
            self.batches, self.stamps = batches, []

        def __next__(self):
            batch = next(self.batches)
            self.stamps.append(time.perf_counter())
            return batch

    def rate(stamps: list[float]) -> float:
        return (len(stamps) - 1 - warmup) * PER_DOMAIN * len(target.data.train) / (stamps[-1] - stamps[warmup])

    loader = Timed(DomainBatches(target.data.train, PER_DOMAIN, seed=0))
    for _ in range(warmup + steps + 1):
        next(loader)
    loader_rate = rate(loader.stamps)
    del loader  # its workers stop
    batches = Timed(DomainBatches(target.data.train, PER_DOMAIN, seed=0))
    model = load_classifier(base.path, target.id2label)
    optimize(
        model,
        batches,
        parameters=list(model.parameters()),
        steps=warmup + steps + 1,
        lr=1e-3,
        weight_decay=0.0,
        accelerator=make_accelerator("no"),
        normalize=target.data.normalize,
        augment_seed=0,
        eval_every=10**9,
    )
    return {"train_images_per_s": rate(batches.stamps), "loader_images_per_s": loader_rate}


def calibrate(scratch: Path, count: int = 200) -> dict:
    """ms per image, one process, of decoding 500 x 375 JPEGs (smooth, with a little noise) to 224 px."""
    import datasets
    import numpy as np
    import torch
    from PIL import Image

    from ratatouille_hub.data import ImageSource

    folder = scratch / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.jpg"
        if not path.is_file():
            picture = image(index, 500).resize((500, 375))
            noisy = np.asarray(picture, dtype=np.float32) + rng.normal(0, 6, (375, 500, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    entries = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image(decode=False))
    source = ImageSource(entries, "image", 224, None, "calibration")
    pixels = torch.empty((count, 3, 224, 224), dtype=torch.uint8)
    source.decode_into(pixels[:8], list(range(8)), [None] * 8)  # warm: imports, the files' pages
    start, start_cpu = time.perf_counter(), time.process_time()
    source.decode_into(pixels, list(range(count)), [None] * count)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    kilobytes = sum(os.path.getsize(p) for p in paths) / count / 1e3
    return {
        "ms_per_image_224": 1e3 * seconds / count,
        "cpu_ms_per_image_224": 1e3 * cpu / count,
        "jpeg_kb": kilobytes,
        "source_px": [500, 375],
    }


def cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (the DataLoader workers, once stopped)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def memory_mb(field: str) -> float:
    """A VmRSS/VmHWM line of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/self/status has no {field}")


# -- harness: the parent never imports torch, so nothing it holds shows in a child -----------------


def spawn(spec: dict, in_process: bool = False) -> dict:
    """`spec`'s case in a fresh child process, or (`in_process`: --smoke, which checks the script, not numbers)
    in this one."""
    if in_process:
        return child(spec)
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {spec['case']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def allocated_bytes(folder: Path) -> int:
    """Bytes the files under `folder` take on disk (allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def measure(args, results: dict) -> None:
    scratch = args.scratch

    def run(spec: dict) -> dict:
        return spawn(spec, in_process=args.smoke)

    base = scratch / f"base-{args.image_size}px"
    if not (base / "config.json").is_file():
        run({"case": "base", "base": str(base), "size": args.image_size})
    sizes = results.setdefault("sizes", {})
    for count in args.sizes:
        print(f"N = {count:,}: data ...", flush=True)
        folder = str(dataset_folder(count, args.px, scratch))
        common = {"folder": folder, "base": str(base), "size": args.image_size}
        row = sizes.setdefault(str(count), {})
        if "plan" in args.parts:
            print(f"N = {count:,}: plan ...", flush=True)
            row["plan"] = run({"case": "plan", **common})
        if "prepare" in args.parts:
            cache = scratch / "cache" / str(count)
            shutil.rmtree(cache, ignore_errors=True)
            print(f"N = {count:,}: prepare, cached ...", flush=True)
            row["cached"] = run({"case": "cached", **common, "cache": str(cache)})
            row["cached"]["cache_bytes"] = allocated_bytes(cache)
            print(f"N = {count:,}: prepare, streamed ...", flush=True)
            row["streamed"] = run({"case": "streamed", **common, "cache": str(cache) + "-none", "budget": 0})
            row["streamed"]["cache_bytes"] = allocated_bytes(cache) if Path(str(cache) + "-none").exists() else 0
            shutil.rmtree(cache, ignore_errors=True)  # 200k at 32 px is 0.6 GB
        save(args.output, results)
    if "train" in args.parts:
        count = min(args.sizes)
        folder = str(dataset_folder(count, args.px, scratch))
        cache = scratch / "cache" / f"train-{count}"
        training = {"N": count, "steps": args.steps, "warmup": args.warmup, "images_per_step": 5 * PER_DOMAIN}
        for path, budget in (("cached", None), ("streamed", 0)):
            print(f"N = {count:,}: train, {path} ...", flush=True)
            spec = {"case": "train", "folder": folder, "base": str(base), "size": args.image_size, "budget": budget}
            # its own cache folder: a finished cache is read whatever the budget
            training[path] = run({**spec, "cache": f"{cache}-{path}", "steps": args.steps, "warmup": args.warmup})
            shutil.rmtree(f"{cache}-{path}", ignore_errors=True)
        results["train"] = training
    if "calibrate" in args.parts:
        print("calibrate: decode at 224 px ...", flush=True)
        results["calibrate"] = run({"case": "calibrate", "scratch": str(scratch)})
    save(args.output, results)


def save(output: Path, results: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()}


def print_table(results: dict) -> None:
    settings = results["settings"]
    print(f"\n{results['machine']['cpu']}, {results['machine']['cpus']} CPUs; {settings}")
    header = (
        f"{'N':>8} {'plan s':>7} {'plan MB':>8} {'cached s':>9} {'CPU s':>6} {'cached MB':>10} {'cache MB':>9} "
        f"{'streamed s':>11} {'streamed MB':>12}"
    )
    print(header + "\n" + "-" * len(header))
    for count, row in sorted(results.get("sizes", {}).items(), key=lambda item: int(item[0])):
        plan, cached, streamed = row.get("plan", {}), row.get("cached", {}), row.get("streamed", {})

        def cell(values: dict, key: str, width: int, scale: float = 1.0, digits: int = 1) -> str:
            return f"{values[key] / scale:>{width}.{digits}f}" if key in values else f"{'-':>{width}}"

        print(
            f"{int(count):>8,} {cell(plan, 'seconds', 7)} {cell(plan, 'peak_rss_mb', 8, digits=0)} "
            f"{cell(cached, 'seconds', 9)} {cell(cached, 'cpu_seconds', 6)} {cell(cached, 'peak_rss_mb', 10, digits=0)} "
            f"{cell(cached, 'cache_bytes', 9, 1e6, 0)} {cell(streamed, 'seconds', 11, digits=2)} "
            f"{cell(streamed, 'peak_rss_mb', 12, digits=0)}"
        )
    training = results.get("train")
    if training:
        print(f"\ntraining, N = {training['N']:,}, {training['images_per_step']} images a step:")
        for path in ("cached", "streamed"):
            row = training[path]
            print(
                f"  {path:<9} {row['train_images_per_s']:>8,.0f} images/s training, "
                f"{row['loader_images_per_s']:>8,.0f} images/s from the loader alone"
            )
    calibration = results.get("calibrate")
    if calibration:
        print(
            f"\ndecode + resize to 224 px, one process: {calibration['ms_per_image_224']:.2f} ms "
            f"({calibration['cpu_ms_per_image_224']:.2f} CPU ms) per {calibration['source_px'][0]} x "
            f"{calibration['source_px'][1]} JPEG ({calibration['jpeg_kb']:.0f} kB)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--px", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=32, help="training size the target is prepared at")
    parser.add_argument("--steps", type=int, default=50, help="training steps timed")
    parser.add_argument("--warmup", type=int, default=10, help="training steps before the timing")
    parser.add_argument("--scratch", type=Path, default=SCRATCH)
    parser.add_argument("--output", type=Path, default=None, help=f"default: {RESULTS.relative_to(ROOT)}")
    parser.add_argument(
        "--smoke", action="store_true", help="120 images, 3 steps, in this process; results in the scratch folder"
    )
    parser.add_argument("--table", action="store_true", help="print the saved results and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.smoke:
        args.sizes, args.px, args.image_size, args.steps, args.warmup = [120], 24, 16, 3, 1
        args.parts = [part for part in args.parts if part != "calibrate"]
    args.output = args.output or (args.scratch / "target-smoke.json" if args.smoke else RESULTS)
    results = json.loads(args.output.read_text()) if args.output.is_file() and not args.table else {}
    if args.table:
        print_table(json.loads(args.output.read_text()))
        return
    settings = {"px": args.px, "image_size": args.image_size, "domains": len(DOMAINS), "classes": CLASSES}
    if results.get("settings", settings) != settings:
        results = {}  # rows measured under other settings are not comparable
    results.update(machine=machine(), settings=settings)
    measure(args, results)
    print_table(results)


if __name__ == "__main__":
    main()
