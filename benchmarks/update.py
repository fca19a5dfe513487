"""Update benchmark: an exact soup update against a full re-merge, in seconds and bytes downloaded.

    python benchmarks/update.py [--runs 20] [--smoke]

Runs are random fp32 ResNet-50s (ResNetConfig defaults, a 3-class head, 94 MB each): one seed's weights,
perturbed per run, generated once into benchmarks/scratch/update-runs/ and reused. A LocalHub on a temporary
folder gets runs 0..N as bench/run-<i> and the uniform soup of runs 0..N-1 as bench/soup (its ingredients,
Hub ids at their commits, in its safetensors metadata, so it is updatable); that setup is not measured.
Then each case runs alone in a fresh child process with its own empty HF cache, as a user would run it:

  update         `python -m ratatouille_hub update bench/soup --add bench/run-N`: downloads the soup and the
                 added run, computes the new mean and pushes it back in one commit;
  full re-merge  what one does without update: download all N + 1 runs and average them again (not pushed).

Wall seconds are the child's whole life (interpreter, imports, downloads, the work, an update's push).
Bytes downloaded are the sizes of the blobs the case left in its cache; files downloaded are its GETs of
/resolve, commits its POSTs to /commit, both from the hub's request record. The two results must agree:
per tensor, max |updated - re-merged| / max |re-merged| within (N + 1 + 2) float32 eps (updating.py's bound).
Children use 1 torch thread (OMP_NUM_THREADS=1) and the product's allocator settings. About a minute on
2 cores, 35 s of it setup (generating the runs the first time, pushing them).
Results: benchmarks/results/update.json; `--smoke` (tiny ResNets, a soup of 3 runs, under 30 s) writes
benchmarks/scratch/update-smoke.json instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ratatouille_hub.allocator import SETTINGS as MALLOC_SETTINGS
from ratatouille_hub.localhub.server import LocalHub, hub_environment

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "benchmarks" / "scratch"
RESULTS = ROOT / "benchmarks" / "results" / "update.json"
SMOKE_RESULTS = SCRATCH / "update-smoke.json"
WEIGHTS = "model.safetensors"
DOWNLOADED_FILES = (WEIGHTS, "config.json", "preprocessor_config.json")  # what a re-merge needs of a run
LABELS = {0: "a", 1: "b", 2: "c"}
RUN_CARD = "---\nlicense: apache-2.0\n---\n# run\n"
USER, TOKEN = "bench", "tok-bench"
SOUP = f"{USER}/soup"
THREADS = 1  # the work streams tensors through memory; a second thread on a shared 2-core machine only contends
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
CHILD_ENV = {
    **{name: str(value) for name, (_, value) in MALLOC_SETTINGS.items()},
    **QUIET_ENV,
    "OMP_NUM_THREADS": str(THREADS),
    "PYTHONPATH": str(ROOT),
}


def run_repo(index: int) -> str:
    return f"{USER}/run-{index}"


# -- runs: generated once, reused -----------------------------------------------------------------


def generate_runs(folder: Path, count: int, smoke: bool) -> list[Path]:
    """Run folders 0..count-1 (weights, config, a card); each lands whole, so a killed run is never reused."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from ratatouille_hub.testing import write_perturbed_runs

    runs = [folder / f"run-{index:02d}" for index in range(count)]
    missing = [run for run in runs if not (run / WEIGHTS).is_file()]
    if not missing:
        return runs
    tiny = {"embedding_size": 8, "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "layer_type": "basic"}
    labels = {"id2label": LABELS, "label2id": {name: i for i, name in LABELS.items()}}
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(**labels, **(tiny if smoke else {})))
    write_perturbed_runs(model, missing, card=RUN_CARD)
    return runs


def publish(runs: list[Path], soup_folder: Path) -> None:
    """Push every run, then the uniform soup of all but the last, recording Hub ingredients as `merge` would."""
    from ratatouille_hub.card import grown_soup_card
    from ratatouille_hub.merge_engine import merge_model_folders
    from ratatouille_hub.provenance import SoupIngredient, SoupRecord, file_sha256
    from ratatouille_hub.publish import push_folder

    ingredients = []
    for index, run in enumerate(runs):
        print(f"pushing {run_repo(index)}", flush=True)
        pushed = push_folder(run, run_repo(index), token=TOKEN, commit_message=f"run {index}")
        ingredients.append(SoupIngredient(file_sha256(run / WEIGHTS), f"{run_repo(index)}@{pushed.oid}"))
    record = SoupRecord(tuple(ingredients[:-1]), "")
    print(f"merging and pushing {SOUP} ({len(record.ingredients)} runs)", flush=True)
    merge_model_folders(runs[:-1], soup_folder, metadata=record.to_metadata())
    grown_soup_card(record).save(soup_folder / "README.md")
    push_folder(soup_folder, SOUP, token=TOKEN, commit_message="soup")


# -- cases: each alone in a child process with a fresh cache ---------------------------------------


def remerge_child(count: int, output: Path) -> None:
    """Download runs 0..count-1 into this process's empty cache and average them; print the phases' seconds."""
    import torch
    from huggingface_hub import snapshot_download

    from ratatouille_hub.merge_engine import merge_model_folders

    start = time.perf_counter()
    folders = [snapshot_download(run_repo(i), allow_patterns=list(DOWNLOADED_FILES)) for i in range(count)]
    downloaded = time.perf_counter()
    merge_model_folders(folders, output)
    done = time.perf_counter()
    print(
        json.dumps({"download_s": downloaded - start, "merge_s": done - downloaded, "threads": torch.get_num_threads()})
    )


def measure(hub: LocalHub, case: str, command: list[str], home: Path) -> tuple[dict, str]:
    """Run one case's child against the hub with HF_HOME=`home` (new and empty); its row and its stdout."""
    env = {**os.environ, **hub_environment(hub.url, home), **CHILD_ENV, "HF_HUB_CACHE": str(home / "hub")}
    env.pop("HF_TOKEN", None)
    first_request = len(hub.requests)
    start = time.perf_counter()
    child = subprocess.run(command, env=env, cwd=home.parent, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"{case} failed ({child.returncode}):\n{child.stdout}{child.stderr}")
    requests = hub.requests[first_request:]
    blobs = [path for path in (home / "hub").glob("*/blobs/*") if path.is_file()]
    row = {
        "case": case,
        "wall_s": wall,
        "mb_downloaded": sum(path.stat().st_size for path in blobs) / 1e6,
        "files_downloaded": sum(r.method == "GET" and r.route == "_resolve" and r.status < 300 for r in requests),
        "commits": sum(r.method == "POST" and r.route == "_commit" and r.status < 300 for r in requests),
    }
    return row, child.stdout


def agreement(updated: Path, merged: Path, ingredients: int) -> dict:
    """The worst per-tensor max |updated - merged| / max |merged|, in float32 eps, against updating.py's bound."""
    import torch
    from safetensors.torch import load_file

    eps = torch.finfo(torch.float32).eps
    soup, reference = load_file(updated), load_file(merged)
    if soup.keys() != reference.keys():
        raise SystemExit("the updated soup and the re-merge hold different tensors")
    worst, worst_name = 0.0, ""
    for name, tensor in reference.items():
        difference = (soup[name].double() - tensor.double()).abs().max().item()
        ratio = difference / max(tensor.abs().max().item(), 1e-30) / eps if difference else 0.0
        if ratio > worst:
            worst, worst_name = ratio, name
    bound = ingredients + 2
    return {"worst_ratio_eps": worst, "worst_tensor": worst_name, "bound_eps": bound, "within_bound": worst <= bound}


# -- harness ---------------------------------------------------------------------------------------


def run_benchmark(count: int, smoke: bool) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ratatouille-update-bench-") as temporary:
        work = Path(temporary)
        with LocalHub(work / "hub", users={TOKEN: USER}) as hub:
            # The HF clients read their endpoint once, at import: set it before this process imports them.
            os.environ.update({**hub_environment(hub.url, work / "setup-home"), **QUIET_ENV})
            os.environ.pop("HF_TOKEN", None)
            import torch
            from huggingface_hub import hf_hub_download

            from ratatouille_hub.merge_engine import read_safetensors_metadata
            from ratatouille_hub.provenance import SoupRecord

            torch.set_num_threads(THREADS)
            runs = generate_runs(SCRATCH / ("update-smoke-runs" if smoke else "update-runs"), count + 1, smoke)
            publish(runs, work / "soup")
            setup_s = time.perf_counter() - started

            print(f"measuring update (+{run_repo(count)})", flush=True)
            update_command = [sys.executable, "-m", "ratatouille_hub", "update", SOUP, "--add", run_repo(count)]
            update, _ = measure(hub, "update", [*update_command, "--token", TOKEN], work / "update-home")
            print(f"measuring full re-merge ({count + 1} runs)", flush=True)
            merged = work / "re-merged"
            remerge_command = [sys.executable, __file__, "--remerge-child", str(count + 1), str(merged)]
            remerge, stdout = measure(hub, "full re-merge", remerge_command, work / "remerge-home")
            phases = json.loads(stdout.splitlines()[-1])
            remerge.update(download_s=phases["download_s"], merge_s=phases["merge_s"])

            updated = Path(hf_hub_download(SOUP, WEIGHTS, cache_dir=work / "check-cache"))
            ingredients = len(SoupRecord.from_metadata(read_safetensors_metadata(updated), SOUP).ingredients)
            check = agreement(updated, merged / WEIGHTS, count + 1)
            run_mb = (runs[0] / WEIGHTS).stat().st_size / 1e6
    rows = [update, remerge]
    return {
        "protocol": {"soup_runs": count, "added_runs": 1, "smoke": smoke, "ingredients_after_update": ingredients},
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": phases["threads"],
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "run_mb": round(run_mb, 1),
        "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
        "speedup": round(remerge["wall_s"] / update["wall_s"], 2),
        "bytes_ratio": round(remerge["mb_downloaded"] / update["mb_downloaded"], 2),
        "agreement": {k: round(v, 3) if isinstance(v, float) else v for k, v in check.items()},
        "setup_s": round(setup_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def print_table(results: dict) -> None:
    protocol, machine = results["protocol"], results["machine"]
    print(
        f"\nsoup of {protocol['soup_runs']} runs ({results['run_mb']} MB each) + 1 run; "
        f"{machine['cpu']}, {machine['cpus']} cores, torch {machine['torch']} on {machine['torch_threads']} thread(s)"
    )
    print(f"{'case':<15}{'wall s':>8}{'MB downloaded':>15}{'files downloaded':>18}{'commits':>9}")
    for row in results["rows"]:
        print(
            f"{row['case']:<15}{row['wall_s']:>8.1f}{row['mb_downloaded']:>15.1f}"
            f"{row['files_downloaded']:>18}{row['commits']:>9}"
        )
    check = results["agreement"]
    print(
        f"speed-up {results['speedup']}x, {results['bytes_ratio']}x fewer bytes; re-merge phases: download "
        f"{results['rows'][1]['download_s']} s, merge {results['rows'][1]['merge_s']} s"
    )
    print(
        f"agreement: worst {check['worst_ratio_eps']} eps ({check['worst_tensor']}), bound {check['bound_eps']} eps: "
        f"{'within' if check['within_bound'] else 'OUTSIDE'}; setup {results['setup_s']} s, total {results['total_s']} s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs in the soup before the update (default: 20)")
    parser.add_argument("--smoke", action="store_true", help="tiny ResNets and a soup of 3 runs, JSON in scratch/")
    parser.add_argument("--remerge-child", nargs=2, metavar=("COUNT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.remerge_child:
        remerge_child(int(args.remerge_child[0]), Path(args.remerge_child[1]))
        return
    results = run_benchmark(3 if args.smoke else args.runs, args.smoke)
    destination = SMOKE_RESULTS if args.smoke else RESULTS
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {destination.relative_to(ROOT)}")
    if not results["agreement"]["within_bound"]:
        sys.exit("the updated soup and the re-merge disagree beyond the bound")


if __name__ == "__main__":
    main()
