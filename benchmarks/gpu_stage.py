"""Stage what benchmarks/gpu.py needs on a lent device machine: no internet there, and at most 64 MiB a call.

    python benchmarks/gpu_stage.py [--shared ../shared] [--aux-mb 8]

The device machine gets the repository's files and the paths a call carries, 64 MiB in all, and its Python
image lacks some of the product's packages; ../shared (about 190 MB) does not travel. So this writes, under
.gpu/ (ignored by git):

  wheels/                                 the packages the image lacks or holds at other versions, at
                                          requirements.lock's versions (pip download; pure Python)
  shared/models/efficientnet-lite0-imagenet   the base, copied
  shared/data/{caltech101,clothing,cifar10}   evenly spaced rows of each, about --aux-mb MB apiece, as one
                                          train split (the auxiliary fine-tunes of the PACS cell see a few
                                          thousand images each at most: a subset serves them)
  shared/data/pacs                        PACS, copied whole (53 MB: alone it nearly fills a call)

and prints the two calls that run the benchmark: the first carries everything but PACS and measures the
throughput part; the second, made at once (a machine stays warm 30 s after a call, and what a call left in
ignored folders stays there while it is warm), carries PACS and runs the PACS cell, sized from the first
call's throughput. Each call copies the JSON to $OUT.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".gpu"
WHEELS = (  # missing from the device image, or there at versions the product was not locked to
    "datasets",
    "evaluate",
    "dill",
    "multiprocess",
    "huggingface_hub",
    "httpx2",
    "httpcore2",
    "truststore",
    "transformers",
    "fsspec",
    "click",
)
AUX = ("caltech101", "clothing", "cifar10")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
FIRST_BUDGET_S, SECOND_BUDGET_S = 200, 400  # each call's --budget-s: about 10 minutes of device time in all
INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    ".gpu/wheels/*.whl && export PYTHONPATH=/tmp/site || exit 1; "
)


def locked_versions(names: tuple[str, ...]) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return {name: pins[name.lower().replace("_", "-")] for name in names}


def download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command += [f"{name}=={version}" for name, version in locked_versions(WHEELS).items()]
    subprocess.run(command, check=True)


def subset(source: Path, destination: Path, megabytes: float) -> int:
    """Evenly spaced rows of the dataset at `source` (its splits joined in sorted order, as the product joins
    them), their images about `megabytes` MB, written as one train split with the source's features; returns
    the rows kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((source / "data").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    image_bytes = sum(len(row["bytes"] or b"") for row in table.column("image").to_pylist())
    keep = max(1, min(len(table), int(len(table) * megabytes * 1e6 / image_bytes)))
    rows = [round(i * (len(table) - 1) / max(keep - 1, 1)) for i in range(keep)]
    (destination / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(rows), destination / "data" / "train-00000-of-00001.parquet")
    card = (source / "README.md").read_text(encoding="utf-8")
    header, _, _ = card.removeprefix("---\n").partition("\n---\n")
    features = header.split("configs:", 1)[0].rstrip()
    (destination / "README.md").write_text(
        f"---\n{features}\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        f"---\n\n# {source.name}: {keep} of {len(table)} rows, evenly spaced (benchmarks/gpu_stage.py)\n",
        encoding="utf-8",
    )
    return keep


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--aux-mb", type=float, default=8.0, help="images of each auxiliary dataset's subset, MB")
    args = parser.parse_args()
    if STAGE.exists():
        shutil.rmtree(STAGE)
    download_wheels(STAGE / "wheels")
    models = STAGE / "shared" / "models"
    shutil.copytree(args.shared / "models" / "efficientnet-lite0-imagenet", models / "efficientnet-lite0-imagenet")
    for name in AUX:
        kept = subset(args.shared / "data" / name, STAGE / "shared" / "data" / name, args.aux_mb)
        print(f"{name}: {kept} rows")
    shutil.copytree(args.shared / "data" / "pacs", STAGE / "shared" / "data" / "pacs")
    first = [".gpu/wheels", ".gpu/shared/models", *(f".gpu/shared/data/{name}" for name in AUX)]
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    repository = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    print(f"\nrepository files: {repository / 2**20:.1f} MiB (each call sends them)")
    print(
        f"first call carries {sum(size_mb(ROOT / p) for p in first):.1f} MiB, the second {size_mb(STAGE / 'shared' / 'data' / 'pacs'):.1f} MiB\n"
    )
    run = "PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --shared .gpu/shared --output .gpu/gpu.json"
    print("first call:  carry", first)
    print(f"  {INSTALL}{run} --part throughput --budget-s {FIRST_BUDGET_S}; cp .gpu/gpu.json $OUT/")
    print('second call, at once: carry [".gpu/shared/data/pacs"]')
    print(f"  export PYTHONPATH=/tmp/site; {run} --part pacs --budget-s {SECOND_BUDGET_S}; cp .gpu/gpu.json $OUT/")


if __name__ == "__main__":
    main()
