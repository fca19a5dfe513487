"""The README's measured blocks are what benchmarks/readme.py builds from their sources (no hand-typed numbers)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("readme_blocks", ROOT / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_blocks_match_their_sources():
    checked = subprocess.run(
        [sys.executable, "benchmarks/readme.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_source_has_a_block_and_a_stale_block_is_named():
    generator = load_generator()
    readme = (ROOT / "README.md").read_text()
    sources = [match["source"] for match in generator.BLOCK.finditer(readme)]
    assert sorted(sources) == sorted(
        [
            "benchmarks/results/merge.json",
            "benchmarks/results/pacs-128px/pacs.md",
            "benchmarks/results/pacs-64px/pacs.md",
            "benchmarks/results/pipeline.json",
            "benchmarks/results/precision.json",
            "benchmarks/results/target.json",
            "docs/demo-output.md",
        ]
    )
    for source in sources:  # one block edited by hand at a time: it alone is named, and rebuilt as it was
        block = next(match for match in generator.BLOCK.finditer(readme) if match["source"] == source)
        stale = readme[: block.start("body")] + "| typed | by hand |\n" + readme[block.start("body") :]
        rebuilt, changed = generator.rebuilt(stale)
        assert changed == [source]
        assert rebuilt == readme


def test_demo_block_is_the_table_and_lesson_without_the_soup_line(tmp_path):
    generator = load_generator()
    output = tmp_path / "demo-output.md"
    output.write_text(
        "# heading\n\n## progress (stderr)\n\n```text\n[hub] x\n```\n\n## result (stdout)\n\n```text\n\n"
        "method   val\nERM  9.0%\n\nlesson line\n\nsoup written to out/soup and pushed\nloaded back\n```\n"
    )
    assert generator.demo_result(output) == "```text\nmethod   val\nERM  9.0%\n\nlesson line\n```\n"
