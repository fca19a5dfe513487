"""The README's measured blocks, rebuilt from the files that produce them, so no number in them is typed by hand.

    python benchmarks/readme.py            # rewrite README.md's generated blocks from their sources
    python benchmarks/readme.py --check    # exit 1 naming the blocks that differ (tests/test_readme_blocks.py)
    python benchmarks/readme.py --demo     # first run `ratatouille-hub demo` and rewrite docs/demo-output.md

A generated block is the text between `<!-- generated from SOURCE -->` and `<!-- end generated -->`, SOURCE being
a path relative to the repository; the producer registered for SOURCE below turns that file into the block.
A benchmark writes its source (merge.json, pacs.md); `--demo` writes docs/demo-output.md from a real run of the
console script, with its wall time and the machine in the heading.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO_OUTPUT = ROOT / "docs" / "demo-output.md"
BLOCK = re.compile(r"(<!-- generated from (?P<source>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)
PRODUCERS: dict[str, Callable[[Path], str]] = {}


def produces(*sources: str):
    """Register a producer: the function that turns one of these source files into its README block."""

    def register(function):
        for source in sources:
            PRODUCERS[source] = function
        return function

    return register


@produces("benchmarks/results/merge.json")
def merge_table(path: Path) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from merge import table_lines  # the benchmark's own table, the one it prints

    return "\n".join(table_lines(json.loads(path.read_text()))) + "\n"


@produces("benchmarks/results/pacs-64px/pacs.md", "benchmarks/results/pacs-128px/pacs.md")
def pacs_table(path: Path) -> str:
    """The report's held-out table: its first markdown table, whole."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


@produces("benchmarks/results/target.json")
def target_table(path: Path) -> str:
    """Planning and preparing a target of N generated images, cached and streamed (benchmarks/target.py)."""
    sizes = json.loads(path.read_text())["sizes"]
    lines = [
        "| N images | plan s | plan peak MB | cached: prepare s | CPU s | peak MB | cache MB | streamed: prepare s "
        "| peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count in sorted(sizes, key=int):
        plan, cached, streamed = sizes[count]["plan"], sizes[count]["cached"], sizes[count]["streamed"]
        lines.append(
            f"| {int(count):,} | {plan['seconds']:.1f} | {plan['peak_rss_mb']:.0f} | {cached['seconds']:.1f} "
            f"| {cached['cpu_seconds']:.1f} | {cached['peak_rss_mb']:.0f} | {cached['cache_bytes'] / 1e6:.0f} "
            f"| {streamed['seconds']:.2f} | {streamed['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


@produces("benchmarks/results/pipeline.json")
def pipeline_table(path: Path) -> str:
    """The host's share of a training step at 224 px, before and after the device took the per-pixel work."""
    results = json.loads(path.read_text())
    lines = ["| path | images / CPU s | images / wall s | ms a step |", "| --- | ---: | ---: | ---: |"]
    for row in results["rows"]:
        lines.append(
            f"| {row['path']} | {row['images_per_cpu_s']:,.0f} | {row['images_per_wall_s']:,.0f} "
            f"| {row['ms_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


MODEL_NAMES = {"efficientnet-lite0": "EfficientNet-Lite0", "resnet-18": "ResNet-18 (random init)"}


@produces("benchmarks/results/precision.json")
def precision_table(path: Path) -> str:
    """fp32 against bf16 autocast, ms a training step (benchmarks/precision.py)."""
    rows = json.loads(path.read_text())["speed"]["rows"]
    lines = ["| model | px | fp32 ms a step | bf16 ms a step | bf16 speed-up |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(
            f"| {MODEL_NAMES.get(row['model'], row['model'])} | {row['px']} | {row['fp32_step_ms']:.0f} "
            f"| {row['bf16_step_ms']:.0f} | {row['bf16_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


@produces("docs/demo-output.md")
def demo_result(path: Path) -> str:
    """The demo's result as it printed it: its table and the careless fine-tune's lesson (stdout, up to the soup
    line)."""
    text = path.read_text()
    result = text.split("## result (stdout)", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    shown = result.strip("\n").split("\nsoup written to", 1)[0].rstrip("\n")
    return f"```text\n{shown}\n```\n"


def rebuilt(readme: str) -> tuple[str, list[str]]:
    """README text with every generated block rebuilt, and the sources whose block changed."""
    changed = []

    def rebuild(match: re.Match) -> str:
        source = match["source"]
        if source not in PRODUCERS:
            raise SystemExit(f"README.md: no producer for a block generated from {source!r} (benchmarks/readme.py)")
        body = PRODUCERS[source](ROOT / source)
        if body != match["body"]:
            changed.append(source)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(rebuild, readme), changed


def record_demo() -> None:
    """Run the demo as the README tells users to (the console script, a fresh output folder) and write its whole
    output to docs/demo-output.md, streams apart, the local Hub's port and commit shas made stable."""
    output = ROOT / "demo-output"
    command = [str(Path(sys.executable).parent / "ratatouille-hub"), "demo", "--output", "demo-output"]
    started = time.monotonic()
    ran = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    seconds = time.monotonic() - started
    if ran.returncode != 0:
        raise SystemExit(f"the demo failed (exit {ran.returncode}):\n{ran.stderr[-4000:]}")
    from ratatouille_hub.toy.demo import demo_processes

    heading = (
        f"# `ratatouille-hub demo --output demo-output`: its whole output ({os.cpu_count()}-core {cpu_model()}, "
        f"{demo_processes()} processes of one thread, {datetime.date.today().isoformat()}; {seconds:.0f} s)"
    )
    DEMO_OUTPUT.write_text(
        f"{heading}\n\n## progress (stderr)\n\n```text\n{stable(ran.stderr).strip()}\n```\n\n"
        f"## result (stdout)\n\n```text\n{stable(ran.stdout).rstrip()}\n```\n"
    )
    print(f"docs/demo-output.md written ({seconds:.0f} s); the run is in {output}")


def stable(text: str) -> str:
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    parser.add_argument("--demo", action="store_true", help="run the demo and rewrite docs/demo-output.md first")
    args = parser.parse_args(argv)
    if args.demo:
        record_demo()
    text, changed = rebuilt(README.read_text())
    if args.check:
        if changed:
            raise SystemExit(f"README.md is out of date for: {', '.join(changed)} (run python benchmarks/readme.py)")
        print("README.md's generated blocks match their sources")
        return
    README.write_text(text)
    print(f"README.md: rebuilt {', '.join(changed) or 'nothing (already up to date)'}")


if __name__ == "__main__":
    main()
