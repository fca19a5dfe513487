"""Scaling benchmark: runs per hour of `recycle` over processes and threads, and its peak RSS per process.

    python benchmarks/scale.py [--part A|B|all] [--work $TMPDIR/scale-bench] [--force] [--smoke]

Part A, scaling. One plan (EfficientNet-Lite0 base, PACS target, --strategy erm, --test-domain sketch, 4 runs
of 100 steps at 16 images per training domain (48 a step) and 64 px, --eval-every 100, --lp-steps 50,
--warmup-steps 0) is executed three times, each into a fresh output folder, so each pays its own planning,
target decoding and linear probe:

  seq-2t   `ratatouille-hub recycle ...`, OMP_NUM_THREADS=2: 1 process, 2 threads;
  procs-2  `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
           --dynamo_backend no -m ratatouille_hub recycle ...`, OMP_NUM_THREADS=1: 2 processes, 1 thread each;
  seq-1t   `ratatouille-hub recycle ...`, OMP_NUM_THREADS=1: separates the thread-count effect.

Why these settings: on 2 idle cores they make part A take about 13 minutes (measured: 254 + 207 + 306 s). A
step of 48 images at 64 px is about 0.3 s with 2 threads, so a run is about 47 s with 2 threads and 54 s
with 1; each command also pays 60-90 s of start-up, planning, decoding at 64 px, probe features and
assembly, and the runs, the thing being spread, stay most of it. Evaluation cannot go below what every run
always does: the forced validation at its last step (1,211 images) and its predictions on validation and the
held-out domain (5,140 images); --eval-every 100 adds no other, so it is about a fifth of a run. The linear
probe is shared, trained once by one process (rank 0; the other waits), so its steps are kept few; under
accelerate, assembly too runs on rank 0 alone, with that rank's one thread. Under load from others the
whole takes longer (see `others` below).

What is measured: the whole command's wall seconds (from spawn to exit), and the time of every log line as
it arrives (stdout and stderr through one pipe, PYTHONUNBUFFERED=1), from which come the phases: planning
(to the last `[data]` line), decoding and the probe (to the first `[train] run i/N from` line), the training
phase (from the first run's start line to the last `[train] run i/N: best validation` line, whichever rank
prints them) and assembly (to the exit). Each run's duration is its start line to its best-validation line:
model load, training, validation, predictions and saving. Runs per hour come from the training phase (the
headline, decoding and planning excluded) and from the whole command. Efficiency = runs/h of procs-2 over
twice the runs/h of seq-1t; also procs-2 over seq-2t (processes against threads on the same 2 cores).
The sha256 of every soup/model.safetensors (erm: the best run, copied) and of every run's model are
compared between the three: 1 and 2 threads may differ (CPU kernels reduce in another order).

Part B, memory. Peak RSS of `recycle --strategy erm --runs 1 --steps 1 --lp-steps 1 --eval-every 1
--image-size 128 --test-domain sketch` (batch size the default 32) on the full PACS (9,991 images, all four
domains are decoded into OUTPUT/cache/ and memory-mapped), OMP_NUM_THREADS=2, the product's allocator
settings on (no MALLOC_* variables in the environment): cold (a fresh output folder, so decoding included),
then warm (the same folder with runs/, lp/ and soup/ deleted, cache/ kept: the same work but decoding), then
warm with --micro-batch 32, 16 and 8 (each step's 96 images in passes of that many, gradients accumulated;
the probe's features, validation and predictions in passes of as many).
Peak RSS is `/usr/bin/time -v`'s "Maximum resident set size" (a small wrapper's
getrusage(RUSAGE_CHILDREN) where it is missing); beside it, sampled twice a second from /proc, every
process's VmHWM and its peak RssAnon (private) and RssFile (file pages: the shared, memory-mapped cache among
them). The floor: `python -c "import torch, transformers, datasets, timm"` in the same venv. Goal: under
2 GB per process.

Resumable: a measurement whose entry is in the JSON with the same settings is skipped (--force redoes it).
Other engineers may use the CPU at the same time: each entry records os.getloadavg() before it, the CPU
seconds its own processes used over its wall seconds (`cpu/wall`), and `others`: the CPUs the rest of the
machine kept busy meanwhile (/proc/stat's busy time less its own, over its wall seconds; this script's
sampling is in it, a few hundredths). --smoke: tiny settings, results in the work folder.
Results: benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
VENV_BIN = Path(sys.executable).parent
BASE = ROOT.parent / "shared" / "models" / "efficientnet-lite0-imagenet"  # read in place, never copied
PACS = ROOT.parent / "shared" / "data" / "pacs"
TIME = Path("/usr/bin/time")
WEIGHTS = "model.safetensors"
GOAL_MIB = 2048
TIMEOUT_S = 3600  # any one command; a hang is killed and recorded, not waited on forever

# The plan of part A, and --smoke's tiny one (which writes its results into the work folder).
A_SETTINGS = {
    "runs": 4,
    "steps": 100,
    "batch_size": 16,
    "image_size": 64,
    "eval_every": 100,
    "lp_steps": 50,
    "warmup_steps": 0,
}
A_SMOKE = {"runs": 2, "steps": 4, "batch_size": 4, "image_size": 32, "eval_every": 4, "lp_steps": 2, "warmup_steps": 0}
B_SETTINGS = {"runs": 1, "steps": 1, "lp_steps": 1, "eval_every": 1, "image_size": 128, "threads": 2}
B_SMOKE = {**B_SETTINGS, "image_size": 32}

# name: (processes, threads per process)
A_CASES = {"seq-2t": (1, 2), "procs-2": (2, 1), "seq-1t": (1, 1)}
# warm-microN: warm with --micro-batch N (a step's 96 images in passes of N)
B_CASES = ("import-floor", "cold", "warm", "warm-micro32", "warm-micro16", "warm-micro8")

RUN_START = re.compile(r"(?:\[rank (\d+)/\d+\] )?\[train\] (run \d+/\d+) from ")
RUN_END = re.compile(r"(?:\[rank (\d+)/\d+\] )?\[train\] (run \d+/\d+): best validation")
TRACEBACK = "Traceback (most recent call last)"


# -- spawning and measuring one command ---------------------------------------------------------------


class ProcessSampler(threading.Thread):
    """Twice a second: every descendant of `root`, its VmHWM and its peak RssAnon / RssFile (KiB)."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peaks: dict[int, dict] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        parents = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        family, frontier = set(), {self.root}
        while frontier:
            family |= frontier
            frontier = {pid for pid, parent in parents.items() if parent in frontier} - family
        for pid in family:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            kib = {k: int(fields[k].split()[0]) for k in ("VmHWM", "RssAnon", "RssFile", "RssShmem") if k in fields}
            if not kib:
                continue  # a zombie: its numbers are gone
            peak = self.peaks.setdefault(pid, {"command": cmdline.strip()[:160]})
            for key, value in kib.items():
                peak[key] = max(peak.get(key, 0), value)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process's, /proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def spawn_measured(argv: list[str], env: dict[str, str], log: Path) -> dict:
    """Run argv to completion with its output stamped line by line into `log`: wall s, exit code, CPU s
    (it and its reaped descendants), ru_maxrss (MiB), the stamped lines, the sampled per-process peaks, and
    how many CPUs everything else on the machine kept busy meanwhile (other engineers, this script)."""
    lines: list[tuple[float, str]] = []
    busy_before = busy_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, cwd="/tmp"
    )
    sampler = ProcessSampler(proc.pid)
    sampler.start()
    timer = threading.Timer(TIMEOUT_S, lambda: os.killpg(proc.pid, 9))
    timer.start()
    with open(log, "w") as sink:
        for raw in proc.stdout:
            stamp = time.perf_counter() - start
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append((stamp, line))
            sink.write(f"{stamp:9.3f} {line}\n")
            sink.flush()
    sampler.sample()  # a last look while the processes may still be there
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    others = (busy_cpu_seconds() - busy_before - usage.ru_utime - usage.ru_stime) / wall
    proc.returncode = os.waitstatus_to_exitcode(status)
    timer.cancel()
    sampler.stopped.set()
    sampler.join()
    return {
        "wall_s": wall,
        "exit_code": proc.returncode,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "others_busy_cpus": max(0.0, others),
        "ru_maxrss_mib": usage.ru_maxrss / 1024,
        "lines": lines,
        "processes": list(sampler.peaks.values()),
    }


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measured command: thread count, no MALLOC_* (the product's own settings apply)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def failure(result: dict, argv: list[str], log: Path) -> dict | None:
    """None on success; else what a reader needs: the command, exit code and the traceback (or last lines)."""
    if result["exit_code"] == 0:
        return None
    text = [line for _, line in result["lines"]]
    first = next((i for i, line in enumerate(text) if TRACEBACK in line), max(0, len(text) - 15))
    return {"command": " ".join(argv), "exit_code": result["exit_code"], "log": str(log), "output": text[first:][-40:]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# -- part A: scaling ----------------------------------------------------------------------------------


def recycle_flags(settings: dict, output: Path) -> list[str]:
    flags = ["--base", str(BASE), "--target", str(PACS), "--strategy", "erm", "--test-domain", "sketch"]
    for key in ("runs", "steps", "batch_size", "image_size", "eval_every", "lp_steps", "warmup_steps"):
        if key in settings:
            flags += [f"--{key.replace('_', '-')}", str(settings[key])]
    return [*flags, "--output", str(output)]


def a_command(processes: int, settings: dict, output: Path) -> list[str]:
    if processes == 1:
        return [str(VENV_BIN / "ratatouille-hub"), "recycle", *recycle_flags(settings, output)]
    launch = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]  # another launch on this machine may hold 29500
    return [*launch, "-m", "ratatouille_hub", "recycle", *recycle_flags(settings, output)]


def phases(lines: list[tuple[float, str]], wall: float) -> dict:
    """Phase boundaries (s from spawn) and each run's duration, from the stamped log lines."""
    starts, ends, ranks = {}, {}, {}
    data_end = probe_start = merge_start = None
    for stamp, line in lines:
        if "[data] " in line:
            data_end = stamp
        if "[train] linear probe on the frozen base" in line and probe_start is None:
            probe_start = stamp
        if (match := RUN_START.search(line)) and match[2] not in starts:
            starts[match[2]] = stamp
            ranks[match[2]] = int(match[1] or 0)
            probe_start = probe_start or stamp
        if match := RUN_END.search(line):
            ends[match[2]] = stamp
        if "[merge] " in line and merge_start is None:
            merge_start = stamp
    runs = {
        label: {
            "rank": ranks[label],
            "start_s": round(starts[label], 2),
            "duration_s": round(ends[label] - starts[label], 2),
        }
        for label in starts
        if label in ends
    }
    first_run = min(starts.values(), default=None)
    training = max(ends.values()) - first_run if ends and first_run is not None else None
    rounded = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {
        "planning_end_s": rounded(data_end),
        "probe_start_s": rounded(probe_start),
        "first_run_start_s": rounded(first_run),
        "training_phase_s": rounded(training),
        "assembly_start_s": rounded(merge_start),
        "assembly_s": rounded(wall - merge_start) if merge_start is not None else None,
        "runs": dict(sorted(runs.items(), key=lambda item: int(item[0].split()[1].split("/")[0]))),
    }


def run_hashes(output: Path) -> dict[str, str | None]:
    """sha256 of every run's model, by run folder key (the same plan gives the same keys)."""
    runs = output / "runs"
    folders = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    return {p.name: sha256(p / "model" / WEIGHTS) for p in folders}


def measure_a(name: str, settings: dict, work: Path) -> dict:
    processes, threads = A_CASES[name]
    output = work / f"A-{name}"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    argv = a_command(processes, settings, output / "out")
    load = load_average()
    print(f"[A] {name}: {processes} process(es) x {threads} thread(s); load before {load}", flush=True)
    result = spawn_measured(argv, child_env(threads), output / "log.txt")
    entry = {
        "processes": processes,
        "threads_per_process": threads,
        "command": f"OMP_NUM_THREADS={threads} " + " ".join(argv),
        "load_average_before": load,
        "load_average_after": load_average(),
        "wall_s": round(result["wall_s"], 2),
        "exit_code": result["exit_code"],
        "cpu_s": round(result["cpu_s"], 1),
        "cpu_per_wall": round(result["cpu_s"] / result["wall_s"], 2),
        "others_busy_cpus": round(result["others_busy_cpus"], 2),
        "ru_maxrss_mib": round(result["ru_maxrss_mib"], 1),
        "log": str(output / "log.txt"),
    }
    if problem := failure(result, argv, output / "log.txt"):
        entry["failure"] = problem
        return entry
    entry.update(phases(result["lines"], result["wall_s"]))
    runs = settings["runs"]
    durations = [run["duration_s"] for run in entry["runs"].values()]
    entry["median_run_s"] = round(statistics.median(durations), 2) if durations else None
    entry["runs_per_hour_training"] = round(runs / entry["training_phase_s"] * 3600, 2)
    entry["runs_per_hour_wall"] = round(runs / result["wall_s"] * 3600, 2)
    entry["process_peaks_mib"] = [
        {"command": p["command"], "vm_hwm": mib(p.get("VmHWM")), "rss_anon": mib(p.get("RssAnon"))}
        for p in result["processes"]
        if "ratatouille_hub" in p["command"] or "ratatouille-hub" in p["command"]
    ]
    entry["soup_sha256"] = sha256(output / "out" / "soup" / WEIGHTS)
    entry["run_sha256"] = run_hashes(output / "out")
    results_file = output / "out" / "soup" / "results.json"
    if results_file.is_file():
        soup = json.loads(results_file.read_text()).get("soup", {})
        entry["soup"] = {k: soup.get(k) for k in ("method", "members", "val_accuracy", "test_accuracy")}
    return entry


def summarize_a(measurements: dict) -> dict:
    ok = {name: m for name, m in measurements.items() if "failure" not in m}
    summary: dict = {}
    rph = {name: m["runs_per_hour_training"] for name, m in ok.items()}
    wall_rph = {name: m["runs_per_hour_wall"] for name, m in ok.items()}
    if "procs-2" in rph and "seq-1t" in rph:
        summary["efficiency_vs_2x_seq_1t"] = round(rph["procs-2"] / (2 * rph["seq-1t"]), 3)
        summary["efficiency_vs_2x_seq_1t_wall"] = round(wall_rph["procs-2"] / (2 * wall_rph["seq-1t"]), 3)
    if "procs-2" in rph and "seq-2t" in rph:
        summary["speedup_vs_seq_2t"] = round(rph["procs-2"] / rph["seq-2t"], 3)
        summary["speedup_vs_seq_2t_wall"] = round(wall_rph["procs-2"] / wall_rph["seq-2t"], 3)
    if "seq-2t" in rph and "seq-1t" in rph:
        summary["thread_efficiency_seq_2t_vs_2x_seq_1t"] = round(rph["seq-2t"] / (2 * rph["seq-1t"]), 3)
    hashes = {name: m.get("soup_sha256") for name, m in ok.items()}
    summary["soup_sha256_equal"] = {
        f"{a} == {b}": hashes[a] is not None and hashes[a] == hashes[b]
        for i, a in enumerate(hashes)
        for b in list(hashes)[i + 1 :]
    }
    summary["runs_equal"] = {
        f"{a} == {b}": identical_runs(ok[a]["run_sha256"], ok[b]["run_sha256"])
        for i, a in enumerate(ok)
        for b in list(ok)[i + 1 :]
    }
    summary["soup_conclusion"] = soup_conclusion(hashes)
    return summary


def identical_runs(first: dict[str, str | None], second: dict[str, str | None]) -> int:
    """How many run folders (same key) hold bit-identical models in both measurements."""
    return sum(1 for key, digest in first.items() if digest is not None and second.get(key) == digest)


def soup_conclusion(hashes: dict[str, str | None]) -> str:
    if len(hashes) < 2:
        return "fewer than two soups measured"
    if len(set(hashes.values())) == 1:
        return "every soup/model.safetensors is bit-identical"
    one_thread = [hashes[n] for n in ("procs-2", "seq-1t") if n in hashes]
    if len(one_thread) == 2 and one_thread[0] == one_thread[1] and hashes.get("seq-2t") not in one_thread:
        return (
            "procs-2 and seq-1t (1 thread per process) are bit-identical; seq-2t (2 threads) differs: "
            "the thread count changes the CPU kernels' reduction order, the process count changes nothing"
        )
    return "soups differ: " + ", ".join(f"{n} {(h or 'missing')[:12]}" for n, h in hashes.items())


# -- part B: memory -----------------------------------------------------------------------------------


def timed(argv: list[str]) -> list[str]:
    """argv under /usr/bin/time -v, or (where it is missing) under this script's getrusage wrapper."""
    if TIME.exists():
        return [str(TIME), "-v", *argv]
    return [sys.executable, __file__, "--rusage-wrapper", *argv]


def rusage_wrapper(argv: list[str]) -> None:
    """Stand-in for /usr/bin/time -v: run argv, then print its peak RSS as time -v does."""
    import resource

    code = subprocess.call(argv)
    print(f"\tMaximum resident set size (kbytes): {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
    sys.exit(code)


def b_command(name: str, settings: dict, output: Path) -> list[str]:
    if name == "import-floor":
        return [sys.executable, "-c", "import torch, transformers, datasets, timm"]
    flags = recycle_flags({k: v for k, v in settings.items() if k != "threads"}, output)
    _, _, micro = name.partition("-micro")
    return [str(VENV_BIN / "ratatouille-hub"), "recycle", *flags, *(["--micro-batch", micro] if micro else [])]


def measure_b(name: str, settings: dict, work: Path) -> dict:
    folder, logs = work / "B", work / "B-logs"
    output = folder / "out"
    if name == "cold":
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    notes = []
    if name.startswith("warm"):
        if not any((output / "cache").glob("*/done")):
            print("[B] warm: no decoded cache in the work folder; priming it with an unrecorded cold run", flush=True)
            shutil.rmtree(output, ignore_errors=True)
            subprocess.run(b_command("cold", settings, output), env=child_env(settings["threads"]), capture_output=True)
            notes.append("cache primed by an unrecorded cold run")
        for sub in ("runs", "lp", "soup"):
            shutil.rmtree(output / sub, ignore_errors=True)
        for saved in ("recipe.yaml", "plan.json"):  # a --micro-batch case is another recipe
            (output / saved).unlink(missing_ok=True)
    argv = timed(b_command(name, settings, output))
    load = load_average()
    print(f"[B] {name}; load before {load}", flush=True)
    log = logs / f"{name}.log"
    result = spawn_measured(argv, child_env(settings["threads"]), log)
    text = "\n".join(line for _, line in result["lines"])
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    entry = {
        "command": f"OMP_NUM_THREADS={settings['threads']} " + " ".join(argv),
        "load_average_before": load,
        "load_average_after": load_average(),
        "wall_s": round(result["wall_s"], 2),
        "exit_code": result["exit_code"],
        "cpu_per_wall": round(result["cpu_s"] / result["wall_s"], 2),
        "others_busy_cpus": round(result["others_busy_cpus"], 2),
        "peak_rss_mib": mib(int(found[1])) if found else None,
        "peak_rss_source": str(TIME) + " -v" if TIME.exists() else "getrusage(RUSAGE_CHILDREN) wrapper",
        "log": str(log),
        "notes": notes,
    }
    measured = [p for p in result["processes"] if not p["command"].startswith(str(TIME))]
    if measured:
        biggest = max(measured, key=lambda p: p.get("VmHWM", 0))
        entry["sampled"] = {
            "vm_hwm_mib": mib(biggest.get("VmHWM")),
            "rss_anon_peak_mib": mib(biggest.get("RssAnon")),
            "rss_file_peak_mib": mib(biggest.get("RssFile")),
            "processes": len(measured),
        }
    if name != "import-floor":
        cache = sorted((output / "cache").glob("*/pixels.npy"))
        entry["cache_pixels_mib"] = round(cache[0].stat().st_size / 2**20, 1) if cache else None
    if problem := failure(result, argv, log):
        entry["failure"] = problem
    return entry


# -- harness ------------------------------------------------------------------------------------------


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "torch": torch_version(),
        "transformers": importlib.metadata.version("transformers"),
        "accelerate": importlib.metadata.version("accelerate"),
        "python": platform.python_version(),
    }


def torch_version() -> str:
    """torch.__version__ (with its local tag, e.g. +cu130), read in a child so this process stays small:
    a spawned command's ru_maxrss starts from its parent's peak RSS."""
    global _TORCH_VERSION
    if _TORCH_VERSION is None:
        script = "import torch; print(torch.__version__)"
        found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip()
        _TORCH_VERSION = found or importlib.metadata.version("torch")
    return _TORCH_VERSION


_TORCH_VERSION: str | None = None


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(portable(json.dumps(results, indent=2)) + "\n")
    staging.replace(path)


def portable(text: str) -> str:
    """Commands and logs as any checkout reads them: paths relative to the repository, ../shared, $TMPDIR."""
    for absolute, relative in (
        (f"{ROOT.parent / 'shared'}/", "../shared/"),
        (f"{ROOT}/", ""),
        (f"{tempfile.gettempdir()}/", "$TMPDIR/"),
    ):
        text = text.replace(absolute, relative)
    return text


def run_part(results: dict, path: Path, part: str, settings: dict, cases, measure, work: Path, force: bool) -> None:
    section = results.setdefault(f"part_{part.lower()}", {})
    if section.get("settings") != settings:
        if section.get("measurements"):
            print(f"[{part}] settings changed: measuring every case again", flush=True)
        section["measurements"] = {}
    section["settings"] = settings
    measurements = section.setdefault("measurements", {})
    for name in cases:
        if name in measurements and not force and "failure" not in measurements[name]:
            print(f"[{part}] {name}: measured earlier, kept (--force measures it again)", flush=True)
            continue
        measurements[name] = measure(name, settings, work)
        results["machine"] = machine()
        save_results(path, results)
        if "failure" in measurements[name]:
            print(f"[{part}] {name} FAILED: {json.dumps(measurements[name]['failure'], indent=2)}", flush=True)
    if part == "A":
        section["summary"] = summarize_a(measurements)
    save_results(path, results)


def print_part_a(section: dict) -> None:
    s = section["settings"]
    print(
        f"\nPart A: {s['runs']} runs x {s['steps']} steps, {s['batch_size']} images/domain/step, {s['image_size']} px, "
        f"eval every {s['eval_every']}, LP {s['lp_steps']} steps"
    )
    header = f"{'case':<9}{'procs x thr':>12}{'load 1/5/15':>17}{'wall s':>8}{'train s':>9}{'run s':>7}"
    print(
        header + f"{'runs/h train':>13}{'runs/h wall':>12}{'cpu/wall':>9}{'others':>7}{'max RSS MiB':>12}  soup sha256"
    )
    for name, m in section["measurements"].items():
        load = "/".join(f"{x:.1f}" for x in m["load_average_before"])
        left = f"{name:<9}{m['processes']:>6} x {m['threads_per_process']:<3}{load:>17}{m['wall_s']:>8.0f}"
        if "failure" in m:
            print(f"{left}  FAILED (exit {m['exit_code']}): {m['failure']['output'][-1:]}")
            continue
        print(
            f"{left}{m['training_phase_s']:>9.0f}{m['median_run_s']:>7.0f}{m['runs_per_hour_training']:>13.1f}"
            f"{m['runs_per_hour_wall']:>12.1f}{m['cpu_per_wall']:>9.2f}{m.get('others_busy_cpus', float('nan')):>7.2f}"
            f"{m['ru_maxrss_mib']:>12.0f}  "
            f"{(m['soup_sha256'] or 'missing')[:16]}"
        )
    summary = section.get("summary", {})
    for key, label in (
        ("efficiency_vs_2x_seq_1t", "efficiency: procs-2 / (2 x seq-1t), runs/h"),
        ("speedup_vs_seq_2t", "speedup: procs-2 / seq-2t, runs/h"),
        ("thread_efficiency_seq_2t_vs_2x_seq_1t", "threads: seq-2t / (2 x seq-1t), runs/h"),
    ):
        if key in summary:
            wall = summary.get(key + "_wall")
            print(f"  {label:<45} training phase {summary[key]:.3f}" + (f"   whole command {wall:.3f}" if wall else ""))
    for pair, equal in summary.get("soup_sha256_equal", {}).items():
        same_runs = summary.get("runs_equal", {}).get(pair)
        print(f"  soup {pair}: {'identical' if equal else 'different'}; run models identical: {same_runs}/{s['runs']}")
    if "soup_conclusion" in summary:
        print(f"  {summary['soup_conclusion']}")


def print_part_b(section: dict) -> None:
    s = section["settings"]
    print(
        f"\nPart B: peak RSS of a one-step recycle (erm, 1 run), full PACS at {s['image_size']} px, goal < {GOAL_MIB} MiB"
    )
    print(
        f"{'case':<13}{'load 1/5/15':>17}{'others':>7}{'wall s':>8}{'peak RSS MiB':>14}{'VmHWM':>8}{'anon':>8}{'file':>8}{'cache MiB':>11}  goal"
    )
    for name, m in section["measurements"].items():
        load = "/".join(f"{x:.1f}" for x in m["load_average_before"])
        sampled = m.get("sampled", {})
        cols = [sampled.get(k) for k in ("vm_hwm_mib", "rss_anon_peak_mib", "rss_file_peak_mib")]
        cells = "".join(f"{c:>8.0f}" if c is not None else f"{'-':>8}" for c in cols)
        rss = m.get("peak_rss_mib")
        cache = m.get("cache_pixels_mib")
        goal = "" if name == "import-floor" or rss is None else ("met" if rss < GOAL_MIB else "MISSED")
        status = f"  FAILED (exit {m['exit_code']})" if "failure" in m else ""
        print(
            f"{name:<13}{load:>17}{m.get('others_busy_cpus', float('nan')):>7.2f}{m['wall_s']:>8.0f}{rss if rss is not None else float('nan'):>14.0f}{cells}"
            f"{cache if cache is not None else '-':>11}  {goal}{status}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("A", "B", "all"), default="all")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "scale-bench", help="output folders and logs"
    )
    parser.add_argument("--force", action="store_true", help="measure again what the JSON already holds")
    parser.add_argument("--smoke", action="store_true", help="tiny settings; results in WORK/scale-smoke.json")
    parser.add_argument("--results", type=Path, help=f"JSON file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--rusage-wrapper", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rusage_wrapper:
        rusage_wrapper(args.rusage_wrapper)
    work = args.work.resolve() / ("smoke" if args.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    path = args.results or (args.work.resolve() / "scale-smoke.json" if args.smoke else RESULTS)
    results = load_results(path)
    results["machine"] = machine()
    if args.part in ("A", "all"):
        run_part(results, path, "A", A_SMOKE if args.smoke else A_SETTINGS, A_CASES, measure_a, work, args.force)
    if args.part in ("B", "all"):
        run_part(results, path, "B", B_SMOKE if args.smoke else B_SETTINGS, B_CASES, measure_b, work, args.force)
    results["machine"] = machine()
    save_results(path, results)
    if "part_a" in results and results["part_a"].get("measurements"):
        print_part_a(results["part_a"])
    if "part_b" in results and results["part_b"].get("measurements"):
        print_part_b(results["part_b"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
