"""Merge benchmark: wall time and peak RSS of merging N ResNet-50-sized checkpoints with every registered
method, against a read floor, the naive load-all average and mergekit.

    python benchmarks/merge.py [--sizes 8 20 100] [--repeats 3]

Checkpoints (random fp32 ResNet-50 with the 1000-class ImageNet head, 102 MB each) and a base (the anchor of
model-stock, interpolate, task-arithmetic, ties and dare) are generated once into benchmarks/scratch/ and
reused. Every candidate runs in a fresh child process, so the import of torch and the allocator are paid as
a user pays them: ours is `python -m ratatouille_hub.cli merge --method M` for every method of the registry
but greedy (it needs a target dataset; its merge is the uniform mean of the runs it keeps), with each
method's default parameters; floor and naive are this script with --child; mergekit is its raw-safetensors
entry with linear, model_stock, task_arithmetic and ties (installed with --no-deps into
benchmarks/scratch/mergekit-pkgs, so the project's torch is untouched). Peak RSS is the child's own ru_maxrss
as wait4 reports it. The page cache is warmed first, so the numbers measure CPU and memory work, not the
disk. `merge` names each input by its weights' sha256 and remembers it by the file's stat
(hashing.remembered_sha256): ours run as a re-merge of the same runs does (another method, another
parameter), the digests remembered beforehand; ours:uniform-first is uniform with none remembered, the first
merge of new runs, which hashes every input. The goal a method meets: wall time within 1.10x of the floor's and peak RSS within the floor's + 50 MB.
Results: benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "scratch"
CHECKPOINTS = WORK / "checkpoints"
OUTPUTS = WORK / "outputs"
MERGEKIT_PACKAGES = WORK / "mergekit-pkgs"
RESULTS = ROOT / "benchmarks" / "results" / "merge.json"
WEIGHTS = "model.safetensors"
# mergekit 0.1.5 plus the requirements the project venv lacks; --no-deps keeps the project's torch.
MERGEKIT_INSTALL = [
    "mergekit==0.1.5",
    "immutables==0.21",
    "peft==0.21.2",
    "sentencepiece==0.2.3",
    "protobuf==7.36.2",
    "scipy==1.17.1",
]
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
HF_HOME = WORK / "hf-home"  # our commands' cache: where they remember the inputs' digests
FIRST_MERGE = "ours:uniform-first"  # uniform with no digest remembered: the first merge of these inputs
REMEMBER = "import sys; from pathlib import Path; from ratatouille_hub.hashing import remembered_sha256 as r; " + (
    "[r(Path(p)) for p in sys.argv[1:]]"
)
BASE_SEED = 1000  # the base checkpoint's seed, apart from the members' 0..N-1 (N up to 100)
WALL_GOAL, RSS_GOAL_MIB = 1.10, 50.0  # within 1.10x the floor's wall time, and the floor's peak RSS + 50 MB
# mergekit's methods beside ours, with the parameters of our defaults (ties: density 0.2, lambda 1)
MERGEKIT_METHODS = {
    "linear": ({"weight": 1.0}, False),
    "model_stock": ({}, True),
    "task_arithmetic": ({"weight": 1.0}, True),
    "ties": ({"weight": 1.0, "density": 0.2}, True),
}


# -- candidates: each runs alone in a child process; ours is the project's CLI, `ratatouille-hub merge`


def child_floor(output: Path, inputs: list[Path]) -> None:
    """Read every tensor's bytes once (safe_open maps lazily, so clone() does the actual read)."""
    from safetensors import safe_open

    for folder in inputs:
        with safe_open(folder / WEIGHTS, framework="pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name).clone()


def child_naive(output: Path, inputs: list[Path]) -> None:
    """What one writes first: load every state dict, then average."""
    from safetensors.torch import load_file, save_file

    state_dicts = [load_file(folder / WEIGHTS) for folder in inputs]
    merged = {}
    for name, first in state_dicts[0].items():
        if first.is_floating_point():
            merged[name] = (sum(sd[name].float() for sd in state_dicts) / len(state_dicts)).to(first.dtype)
        else:
            merged[name] = first
    output.mkdir(parents=True, exist_ok=True)
    save_file(merged, output / WEIGHTS, metadata={"format": "pt"})


CHILDREN = {"floor": child_floor, "naive": child_naive}


# -- harness ----------------------------------------------------------------------------------------


def generate_checkpoints(count: int) -> None:
    """Write missing checkpoints; each lands whole (staged folder), so a killed run is never reused."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from ratatouille_hub.io import staged_folder

    for folder in [*checkpoint_folders(count), base_folder()]:
        if not (folder / WEIGHTS).is_file():
            print(f"generating {folder.name}", flush=True)
            torch.manual_seed(int(folder.name.rsplit("-", 1)[1]))
            model = ResNetForImageClassification(ResNetConfig(num_labels=1000))
            with staged_folder(folder) as staging:
                model.save_pretrained(staging)


def checkpoint_folders(count: int) -> list[Path]:
    return [CHECKPOINTS / f"resnet50-{seed:02d}" for seed in range(count)]  # seeds 0..count-1


def base_folder() -> Path:
    return CHECKPOINTS / f"resnet50-{BASE_SEED:02d}"


def print_max_abs_difference(first: Path, second: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(second)
    diff = (
        float("inf")
        if a.keys() != b.keys()
        else max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    )
    print(json.dumps(diff))


def warm_page_cache(folders: list[Path]) -> None:
    buffer = bytearray(16 << 20)
    for folder in folders:
        with open(folder / WEIGHTS, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def ensure_mergekit() -> str | None:
    """Install mergekit beside the project (own folder, --no-deps: torch untouched); the reason if impossible."""
    if (MERGEKIT_PACKAGES / "mergekit").is_dir():
        return None
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(MERGEKIT_PACKAGES)]
    result = subprocess.run(command + MERGEKIT_INSTALL, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(MERGEKIT_PACKAGES, ignore_errors=True)
        return f"pip install --no-deps mergekit failed: {result.stderr.strip().splitlines()[-1:]}"
    return None


def mergekit_command(method: str, output: Path, inputs: list[Path]) -> list[str]:
    """mergekit's raw-safetensors entry (mergekit-pytorch), `method` with equal weights, fp32."""
    parameters, anchored = MERGEKIT_METHODS[method]
    config = OUTPUTS / f"mergekit-{method}-{len(inputs)}.yml"
    models = [{"model": str(folder / WEIGHTS), "parameters": parameters} for folder in inputs]
    spec = {"merge_method": method, "dtype": "float32", "models": models}
    if anchored:
        spec["base_model"] = str(base_folder() / WEIGHTS)
    config.write_text(json.dumps(spec))
    script = "from mergekit.scripts.merge_raw_pytorch import main; main()"
    return [sys.executable, "-c", script, str(config), str(output)]


def spawn_measured(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    """Run argv to completion; (wall s, peak RSS MiB of that child alone, exit code)."""
    with open(log, "wb") as sink:
        actions = [(os.POSIX_SPAWN_DUP2, sink.fileno(), 1), (os.POSIX_SPAWN_DUP2, sink.fileno(), 2)]
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
    return wall, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def helper(*args: str) -> str:
    """Run a step that imports torch in a child: the parent must stay small, because a spawned child's
    ru_maxrss starts from its parent's peak RSS (Linux carries it across exec)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True).stdout


def run_benchmark(sizes: list[int], repeats: int, saved: dict) -> dict:
    """Measure each size in `sizes` into `saved` (the results so far): rows of other sizes are kept, so sizes
    can be measured in separate sessions (N=100 alone takes about 20 minutes on 2 cores)."""
    print(f"checkpoints: {CHECKPOINTS.relative_to(ROOT)} (generated once, about 1 s each)", flush=True)
    helper("--generate", str(max(sizes)))
    folders = checkpoint_folders(max(sizes))
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    mergekit_problem = ensure_mergekit()
    results = {"machine": {}, "repeats": {}, "rows": [], **saved}
    results["checkpoint_mb"] = round((folders[0] / WEIGHTS).stat().st_size / 1e6, 1)
    results.pop("not_measured", None)
    for n in sizes:
        print(f"measuring N={n}", flush=True)
        load_before = os.getloadavg()
        rows = measure_size(folders[:n], repeats, mergekit_problem)
        results["rows"] = sorted([row for row in results["rows"] if row["n"] != n] + rows, key=lambda row: row["n"])
        results["repeats"][str(n)] = repeats
        results["machine"][str(n)] = {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # each size as it lands
    return results


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def our_command(method: str, output: Path, inputs: list[Path]) -> list[str]:
    """`ratatouille-hub merge --method METHOD`, with what the method needs (the base, one weight per run)."""
    from ratatouille_hub.merge_methods import MERGE_METHODS

    needs = MERGE_METHODS[method].needs
    argv = [sys.executable, "-m", "ratatouille_hub.cli", "merge", *map(str, inputs), "--output", str(output)]
    argv += ["--method", method]
    if "base" in needs:
        argv += ["--base", str(base_folder())]
    if "weights" in needs:
        argv += ["--weights", *(str(1 + k % 3) for k in range(len(inputs)))]
    return argv


def our_methods() -> list[str]:
    from ratatouille_hub.merge_methods import MERGE_METHODS

    return [name for name, method in MERGE_METHODS.items() if "validation" not in method.needs]


def measure_size(inputs: list[Path], repeats: int, mergekit_problem: str | None) -> list[dict]:
    """One row per method for N = len(inputs): median and best wall over the repeats, max peak RSS, and
    whether it meets the goal against the floor."""
    n = len(inputs)
    warm_page_cache([*inputs, base_folder()])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_HOME": str(HF_HOME)}
    subprocess.run(  # the inputs' digests remembered (hashing.remembered_sha256), as after a first merge of them
        [sys.executable, "-c", REMEMBER, *(str(folder / WEIGHTS) for folder in [*inputs, base_folder()])],
        env=env,
        check=True,
    )
    commands = {"floor": [sys.executable, __file__, "--child", "floor", str(OUTPUTS / f"floor-{n}"), *map(str, inputs)]}
    for method in our_methods():
        commands[f"ours:{method}"] = our_command(method, OUTPUTS / f"ours-{method}-{n}", inputs)
    commands[FIRST_MERGE] = our_command("uniform", OUTPUTS / f"ours-uniform-first-{n}", inputs)
    commands["naive"] = [sys.executable, __file__, "--child", "naive", str(OUTPUTS / f"naive-{n}"), *map(str, inputs)]
    for method in MERGEKIT_METHODS:
        if mergekit_problem is None:
            commands[f"mergekit:{method}"] = mergekit_command(method, OUTPUTS / f"mergekit-{method}-{n}", inputs)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    failures = {f"mergekit:{m}": mergekit_problem for m in MERGEKIT_METHODS} if mergekit_problem else {}
    for _ in range(repeats):  # interleaved, so drift in machine load hits every method alike
        for name, argv in commands.items():
            if name in failures:
                continue
            folder = name.replace(":", "-")
            shutil.rmtree(OUTPUTS / f"{folder}-{n}", ignore_errors=True)
            log = OUTPUTS / f"{folder}-{n}.log"
            child_env = {**env, "PYTHONPATH": f"{MERGEKIT_PACKAGES}:{ROOT}"} if name.startswith("mergekit") else env
            if name == FIRST_MERGE:  # an empty digest cache: every input hashed, as the first merge of new runs
                shutil.rmtree(WORK / "hf-home-first", ignore_errors=True)
                child_env = {**env, "HF_HOME": str(WORK / "hf-home-first")}
            wall, rss, code = spawn_measured(argv, child_env, log)
            if code != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                failures[name] = f"exit code {code}: {tail[0] if tail else 'no output'}"
            else:
                samples[name].append((wall, rss))
    floor_wall = statistics.median(w for w, _ in samples["floor"])
    floor_rss = max(r for _, r in samples["floor"])
    rows = []
    for name in commands:
        if name in failures:
            rows.append({"method": name, "n": n, "not_measured": failures[name]})
            continue
        walls = [w for w, _ in samples[name]]
        wall_ratio, rss = statistics.median(walls) / floor_wall, max(r for _, r in samples[name])
        rows.append(
            {
                "method": name,
                "n": n,
                "wall_s": round(statistics.median(walls), 3),
                "best_wall_s": round(min(walls), 3),
                "peak_rss_mib": round(rss, 1),
                "wall_over_floor": round(wall_ratio, 3),
                "rss_over_floor_mib": round(rss - floor_rss, 1),
                "meets_goal": wall_ratio <= WALL_GOAL and rss - floor_rss <= RSS_GOAL_MIB,
                "wall_samples_s": [round(w, 3) for w in walls],
            }
        )
    if "ours:uniform" not in failures and "naive" not in failures:
        ours = OUTPUTS / f"ours-uniform-{n}" / WEIGHTS
        diff = helper("--compare", str(ours), str(OUTPUTS / f"naive-{n}" / WEIGHTS))
        rows.append({"method": "check", "n": n, "max_abs_diff_ours_vs_naive": json.loads(diff)})
    return rows


def table_lines(results: dict) -> list[str]:
    """The results as the README shows them: one row per method and N, the goal met or not."""
    lines = [
        "| method | N | wall s | best s | peak RSS MiB | wall / floor | RSS - floor MiB | goal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in results["rows"]:
        if row["method"] == "check":
            continue
        if "not_measured" in row:
            lines.append(f"| {row['method']} | {row['n']} | not measured: {row['not_measured']} | | | | | |")
            continue
        goal = "-" if row["method"] == "floor" else ("yes" if row["meets_goal"] else "no")
        lines.append(
            f"| {row['method']} | {row['n']} | {row['wall_s']:.2f} | {row['best_wall_s']:.2f} | "
            f"{row['peak_rss_mib']:.0f} | {row['wall_over_floor']:.2f} | {row['rss_over_floor_mib']:+.0f} | {goal} |"
        )
    checks = [row for row in results["rows"] if row["method"] == "check"]
    lines += [
        f"\nmax |ours:uniform - naive| at N={row['n']}: {row['max_abs_diff_ours_vs_naive']:.3g}" for row in checks
    ]
    return lines


def print_table(results: dict) -> None:
    print("\n" + "\n".join(table_lines(results)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[8, 20, 100],
        help="numbers of checkpoints to merge (each replaces its saved rows)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per method and size")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the table of the saved results and exit")
    parser.add_argument("--fresh", action="store_true", help="drop the saved rows of other sizes")
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)  # --child: OUTPUT INPUT...
    args = parser.parse_args(argv)
    if args.child:
        CHILDREN[args.child](args.paths[0], args.paths[1:])
    elif args.generate:
        generate_checkpoints(args.generate)
    elif args.compare:
        print_max_abs_difference(*args.paths)
    elif args.table:
        print_table(json.loads(RESULTS.read_text()))
    else:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.fresh else {}
        results = run_benchmark(args.sizes, args.repeats, saved)
        print_table(results)
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
