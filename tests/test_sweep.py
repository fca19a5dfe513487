"""Issue 20, item 5: `sweep`, trials x strategies x held-out domains as one command and one table (mean ±
standard error over trials), resumable, and spread over `--index` tasks with the same table."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import refusals
import yaml

from ratatouille_hub import cli, testing
from ratatouille_hub.artifacts import ProbeRecord, RunRecord, replaced_builder
from ratatouille_hub.toy import world as toyworld

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DOMAINS = ["cartoon", "photo", "sketch"]
STRATEGIES = ["erm", "ratatouille"]
ROW_SCORES = {  # a row of the table -> where a soup's results.json holds its held-out accuracy
    "best single run (by validation)": "best_run",
    "soup, uniform": "soup_uniform",
    "soup, greedy": "soup_greedy",
    "soup, model-stock": "soup_model-stock",
    "soup, interpolate": "soup_interpolate",
    "ensemble (reference)": "ensemble",
}


@pytest.fixture(scope="module")
def sweep_recipe(tiny_world, tmp_path_factory) -> Path:
    """The tests' tiny recipe (2 runs) as a YAML file, on a 3-domain target (the tiny world without painting)."""
    root = tmp_path_factory.mktemp("sweep")
    target = testing.write_hub_dataset(
        toyworld.target_dataset(per_class_per_domain=6, size=16).filter(lambda row: row["domain"] != "painting"),
        root / "shapes3",
    )
    recipe = testing.tiny_recipe(tiny_world, root / "unused").replace(runs=2).to_dict()
    recipe = {k: v for k, v in recipe.items() if k not in ("output", "strategy", "test_domain")}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe | {"target": str(target)}))
    return root / "recipe.yaml"


@pytest.fixture(scope="module")
def swept(sweep_recipe) -> Path:
    out = sweep_recipe.parent / "sweep"
    argv = ["sweep", "--config", str(sweep_recipe), "--strategy", *STRATEGIES, "--trials", "2", "--output", str(out)]
    assert cli.main(argv) == 0
    return out


def expected_stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "stderr": statistics.stdev(values) / math.sqrt(len(values)),
        "per_trial": values,
    }


def test_the_table_is_the_mean_and_standard_error_over_trials_of_every_cell(swept):
    table = json.loads((swept / "results.json").read_text())
    assert table["trials"] == [0, 1] and table["test_domains"] == DOMAINS and table["strategies"] == STRATEGIES
    assert list(table["rows"]) == [f"{s}: {row}" for s in STRATEGIES for row in ROW_SCORES]
    for strategy in STRATEGIES:
        for row, key in ROW_SCORES.items():
            per_trial = {
                d: [
                    json.loads((swept / f"trial-{seed}/strategies/{strategy}/soups/{d}/results.json").read_text())[key][
                        "test_accuracy"
                    ]
                    for seed in (0, 1)
                ]
                for d in DOMAINS
            }
            averages = [sum(per_trial[d][t] for d in DOMAINS) / 3 for t in (0, 1)]
            cells = table["rows"][f"{strategy}: {row}"]["test_accuracy"]
            assert cells == {d: expected_stats(per_trial[d]) for d in DOMAINS} | {"average": expected_stats(averages)}
    soups = {
        json.loads(p.read_text())["soup_uniform"]["test_accuracy"]
        for p in swept.glob("trial-*/strategies/*/soups/*/results.json")
    }
    assert len(soups) > 1  # the cells differ: a table of one repeated number would pass the checks above


def run_folders(swept: Path, seed: int, strategy: str) -> list[str]:
    """The run folders of one cell, held-out domain by domain, as its soups' results.json name them."""
    cell = swept / f"trial-{seed}" / "strategies" / strategy
    return [
        run["folder"] for d in DOMAINS for run in json.loads((cell / f"soups/{d}/results.json").read_text())["runs"]
    ]


def test_strategies_of_a_trial_share_their_common_runs_and_the_cost_counts_each_strategys(swept):
    for seed in (0, 1):
        runs = [p for p in (swept / f"trial-{seed}" / "runs").iterdir() if not p.name.startswith(".")]
        assert len(runs) == 3 * 3  # per domain: erm's 2 runs from the base, and ratatouille's run from aux1
        erm, ratatouille = (set(run_folders(swept, seed, s)) for s in STRATEGIES)
        assert len(erm) == len(ratatouille) == 6 and len(erm & ratatouille) == 3  # run 0 of each domain, shared
    cost = json.loads((swept / "cost.json").read_text())
    assert list(cost) == STRATEGIES and all(cost[s]["runs"] == 6 for s in STRATEGIES)
    for strategy in STRATEGIES:
        seconds = [
            sum(json.loads((swept / f"trial-{seed}/{f}/metrics.json").read_text())["seconds"] for f in folders)
            for seed, folders in ((seed, run_folders(swept, seed, strategy)) for seed in (0, 1))
        ]
        assert cost[strategy]["run_seconds"]["per_trial"] == seconds


def test_a_rerun_trains_and_assembles_nothing_and_writes_the_same_table(swept, sweep_recipe, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr("ratatouille_hub.sweep.assemble", refuse)
    before = (swept / "results.json").read_bytes()
    argv = ["sweep", "--config", str(sweep_recipe), "--strategy", *STRATEGIES, "--trials", "2", "--output", str(swept)]
    with replaced_builder(RunRecord, refuse), replaced_builder(ProbeRecord, refuse):
        assert cli.main(argv) == 0
    assert (swept / "results.json").read_bytes() == before
    printed = capsys.readouterr().out
    assert "erm: soup, uniform" in printed and "ratatouille: ensemble (reference)" in printed


def test_spread_over_index_tasks_the_sweep_writes_the_same_table(swept, sweep_recipe, capsys):
    out = sweep_recipe.parent / "spread"
    plan = ["sweep", "--config", str(sweep_recipe), "--strategy", *STRATEGIES, "--trials", "2", "--output", str(out)]
    assert cli.main([*plan, "--plan-only"]) == 0
    assert "18 distinct runs (18 pending)" in capsys.readouterr().out
    assert not list(out.glob("trial-*/runs"))  # planned, nothing trained
    saved = ["sweep", "--config", str(out / "sweep.yaml")]
    places = {"<tmp>": out.parent}
    what = "sweep --assemble before every run is done"
    refusals.fails_cleanly(
        "sweep-unfinished", what, [*saved, "--assemble"], "18 runs of the sweep", out, capsys, places
    )
    for index in reversed(range(18)):  # any order: each task trains its own run (and the probe it needs)
        assert cli.main([*saved, "--index", str(index)]) == 0
    capsys.readouterr()
    what = "sweep --index past the sweep's flat run list"
    refusals.fails_cleanly(
        "sweep-index-past-the-end", what, [*saved, "--index", "18"], "--index 18", out, capsys, places
    )
    assert cli.main([*saved, "--assemble"]) == 0
    assert (out / "results.json").read_bytes() == (swept / "results.json").read_bytes()


def test_a_sweep_that_cannot_run_is_refused_before_anything_is_written(swept, sweep_recipe, tmp_path, capsys):
    recipe = ["sweep", "--config", str(sweep_recipe)]
    places = {"<tmp>": sweep_recipe.parent}
    for case, what, argv, culprit, out in (
        ("sweep-unknown-strategy", "sweep --strategy naming no strategy", [*recipe, "--strategy", "erm", "best"], "(got 'best')", tmp_path / "new"),
        ("sweep-no-trials", "sweep --trials 0", [*recipe, "--trials", "0"], "--trials must be at least 1", tmp_path / "new"),
        ("sweep-another-sweep", "sweep into a folder holding a sweep of other options", [*recipe, "--strategy", *STRATEGIES, "--steps", "5"], "differs in: steps", swept),
        ("sweep-unplanned", "sweep --index on a folder holding no sweep", [*recipe, "--index", "0"], "holds no sweep", tmp_path / "none"),
    ):  # fmt: skip
        argv = [*argv, "--output", str(out)]
        refusals.fails_cleanly(case, what, argv, culprit, out, capsys, places, watch=tmp_path)


def test_accelerate_launch_on_two_processes_trains_each_run_once_and_writes_the_same_table(swept, sweep_recipe):
    from test_scale_out import ACCELERATE, ENV, TIMEOUT

    out = sweep_recipe.parent / "launched"
    argv = ["sweep", "--config", str(sweep_recipe), "--strategy", *STRATEGIES, "--trials", "2", "--output", str(out)]
    done = subprocess.run([*ACCELERATE, *argv], capture_output=True, text=True, env=ENV, timeout=4 * TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    started = [
        line for line in done.stderr.splitlines() if re.match(r"\[rank [01]/2\] \[train\] run \d+ of \d+ from ", line)
    ]
    assert len(started) == 18  # each distinct run once (tiny runs: rank 0 may take over all of them)
    assert done.stdout.count("held-out accuracy (%)") == 1  # the table prints once
    assert (out / "results.json").read_bytes() == (swept / "results.json").read_bytes()


def unpinned(value):
    """`id@<40 hex>` as `id` (each of a list too); anything else as it is."""
    if isinstance(value, list):
        return [unpinned(v) for v in value]
    match = re.fullmatch(r"(.+)@[0-9a-f]{40}", value) if isinstance(value, str) else None
    return match[1] if match else value


def test_the_pacs_benchmarks_sweep_plans_the_committed_cells_recipes(monkeypatch):
    """benchmarks/pacs.py became a sweep per held-out domain: each committed cell (benchmarks/results/pacs-*px/
    cells, the earlier ones made by one sweep of every domain) must be the recipe its domain's sweep plans for
    it, but for `output`, which no run key reads, so its runs keep their keys."""
    import importlib.util
    from dataclasses import replace

    from ratatouille_hub.config import RecipeConfig
    from ratatouille_hub.recipe import recipe_differences
    from ratatouille_hub.results import Results
    from ratatouille_hub.sweep import cell_recipe, cells_of

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "pacs.py"
    spec = importlib.util.spec_from_file_location("pacs_benchmark", script)
    pacs = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, pacs)  # its dataclasses look their module up there
    spec.loader.exec_module(pacs)
    committed_cells = {64: 3 * 4 * 4 + 2 * 4}  # the three 64 px trials are complete; 128 px: what has landed
    for image_size in (64, 128):
        pacs.configure(image_size)
        checked = 0
        for trial in pacs.TRIALS:
            for domain in pacs.DOMAINS:
                config = pacs.sweep_config(trial, domain)
                recipes = {c.strategy: pacs.draw_finetunes(cell_recipe(config, c)) for c in cells_of(config)}
                for cell in pacs.HUB_STYLE_CELLS if trial in pacs.HUB_STYLE_TRIALS else ():
                    aux = pacs.recycled_in(trial, "hub-style")
                    recipes[cell.name] = replace(
                        recipes["ratatouille"], aux=aux, runs=1 + len(aux), bn_policy=cell.bn_policy
                    )
                for name, recipe in recipes.items():
                    if not pacs.cell_path(trial, domain, name).is_file():
                        continue
                    committed = Results.load(pacs.cell_path(trial, domain, name)).recipe  # options added: defaults
                    # cells made since plans pin what they read name base, target (PACS resolved) and aux
                    # as id@sha: a pinned base or target is the same recipe as the name (recipe_differences)
                    saved = RecipeConfig.from_dict(committed | {"aux": unpinned(committed["aux"])})
                    assert recipe_differences(saved, recipe, frozenset({"output"})) == []
                    checked += 1
        cells = [p for p in pacs.DURABLE.glob("trial*/*.json") if not p.name.endswith(".cost.json")]
        cells = [p for p in cells if not p.name.startswith("diagnose-")]
        assert checked == committed_cells.get(image_size, len(cells))  # every committed cell was checked
