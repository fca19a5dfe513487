"""`ratatouille-hub demo`, the README's first command, as typed: its --smoke world runs every stage of the
demo (the world, the local Hub, four recycles, vetting, the push, the reload from the Hub) in under a minute.
The full world's numbers are docs/demo-output.md's, written by `benchmarks/readme.py --demo`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ratatouille_hub.errors import RecipeError
from ratatouille_hub.toy.design import DESIGN, DESIGN_FILE, SMOKE, check_design, record_design

ENTRY_POINT = Path(sys.executable).parent / "ratatouille-hub"
CAREFUL = [
    "community-dots/resnet-tiny-dots",
    "community-polygons/resnet-tiny-polygons",
    "community-stripes/resnet-tiny-stripes",
]


def demo(*argv: str) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.exists():
        pytest.skip(f"{ENTRY_POINT} is not installed")
    return subprocess.run([str(ENTRY_POINT), "demo", *argv], capture_output=True, text=True, timeout=900)


def test_the_demo_runs_every_stage_then_refuses_to_reuse_its_world_with_another_design(tmp_path):
    out = tmp_path / "demo"
    done = demo("--smoke", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = done.stdout
    parts = ["Held out (sketch), never seen", "on training-domain validation", "method ", "The careless fine-tune, "]
    assert [result.index(part) for part in parts] == sorted(result.index(part) for part in parts)
    # vetting flagged the careless fine-tune alone, so the last recycle recycled the three careful ones
    again = next(line for line in done.stderr.splitlines() if line.startswith("== ratatouille again"))
    assert sorted(re.findall(r"(community-\w+/resnet-tiny-\w+)@[0-9a-f]{40}", again)) == CAREFUL
    assert "quick-finetunes" not in again and "The careless fine-tune, quick-finetunes/resnet-tiny-polygons" in result
    # the soup written and pushed is that last recycle's: its record names the careful fine-tunes and the
    # table prints its uniform average's scores
    record = json.loads((out / "recycle" / "soup" / "results.json").read_text())
    assert sorted(ingredient["source"] for ingredient in record["ingredients"][1:]) == CAREFUL
    val, test = (100 * record["soup_uniform"][key] for key in ("val_accuracy", "test_accuracy"))
    assert re.search(rf"^Ratatouille without the flagged, uniform +{val:.1f}% +{test:.1f}%$", result, re.M)
    assert f"soup written to {out / 'recycle' / 'soup'} and pushed to the local Hub as demo/ratatouille-soup" in result
    assert "AutoModelForImageClassification and pipeline load demo/ratatouille-soup from the Hub" in result
    # the same folder without --smoke: the full design's recipe never reuses the smoke world's checkpoints
    refused = demo("--output", str(out))
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith(f"error: {out} holds a demo of another design")


def test_a_demo_folder_is_reused_with_its_own_design_only(tmp_path):
    demo_folder = tmp_path / "demo"
    (demo_folder / ".design.json.1234.tmp").parent.mkdir()
    (demo_folder / ".design.json.1234.tmp").write_text("{")  # a write stopped before its rename: not a demo
    check_design(demo_folder, SMOKE)
    record_design(demo_folder, SMOKE)
    check_design(demo_folder, SMOKE)  # the same design: its world is reused
    with pytest.raises(RecipeError, match="holds a demo of another design"):
        check_design(demo_folder, DESIGN)
    assert json.loads((demo_folder / DESIGN_FILE).read_text())["image_size"] == SMOKE.image_size


def test_a_demo_folder_from_before_designs_were_recorded_is_refused(tmp_path):
    (tmp_path / "demo" / "hub").mkdir(parents=True)
    with pytest.raises(RecipeError, match=f"holds files but no {DESIGN_FILE}"):
        check_design(tmp_path / "demo", DESIGN)


def test_the_demo_vets_every_fine_tune_offered_even_one_no_run_starts_from(tiny_world, tmp_path):
    """The last recycle takes what vetting did not flag: a fine-tune no run started from must still be
    counted, or an empty --aux would discover (and recycle) the flagged one again."""
    from ratatouille_hub.recipe import plan_recipe
    from ratatouille_hub.testing import tiny_recipe
    from ratatouille_hub.toy.demo import vet_recycled

    (plan,) = plan_recipe(tiny_recipe(tiny_world, tmp_path / "out").replace(runs=2), echo=lambda line: None)
    started_from = {spec.init.source for spec in plan.runs}
    assert str(tiny_world.aux[1]) not in started_from  # run 0 from the base, run 1 from the first fine-tune
    assert list(vet_recycled(plan)) == [str(a) for a in tiny_world.aux]
