"""benchmarks/pacs.py's bookkeeping across sessions: which rebuilt ingredients it accepts and records."""

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture
def pacs(monkeypatch, tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "pacs.py"
    spec = importlib.util.spec_from_file_location("pacs_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    module.configure(128, work=tmp_path / "work", results=tmp_path / "results")
    return module


def weights(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(content)
    return folder


def test_a_rebuild_on_the_same_cpu_must_have_the_same_bytes_and_another_cpus_is_recorded_beside(pacs, tmp_path):
    first = weights(tmp_path / "first", b"xeon bytes")
    described: dict = {}
    build = {"distance_to_base": 0.02, "train_accuracy": 0.933, "sha256": pacs.weights_sha256(first)}
    pacs.add_build(described, "bench/ft-0", build, {"lr": 5e-05}, "Intel Xeon")
    assert described == {"bench/ft-0": build | {"hparams": {"lr": 5e-05}, "cpu": "Intel Xeon"}}

    assert pacs.undescribed_builds(described, {"bench/ft-0": first}, "Intel Xeon") == {}  # the same bytes: reused
    other = weights(tmp_path / "other", b"epyc bytes")
    with pytest.raises(SystemExit, match="bench/ft-0 was rebuilt on Intel Xeon with other weights"):
        pacs.undescribed_builds(described, {"bench/ft-0": other}, "Intel Xeon")

    assert pacs.undescribed_builds(described, {"bench/ft-0": other}, "AMD EPYC") == {"bench/ft-0": other}
    rebuild = {"distance_to_base": 0.021, "train_accuracy": 0.934, "sha256": pacs.weights_sha256(other)}
    pacs.add_build(described, "bench/ft-0", rebuild, {"lr": 5e-05}, "AMD EPYC")
    assert described["bench/ft-0"]["rebuilt_on"] == {"AMD EPYC": rebuild}
    assert described["bench/ft-0"]["sha256"] == build["sha256"]  # the first build, as the kept cells recycled it
    assert pacs.undescribed_builds(described, {"bench/ft-0": other}, "AMD EPYC") == {}
    with pytest.raises(SystemExit, match="rebuilt on AMD EPYC"):
        pacs.undescribed_builds(described, {"bench/ft-0": first}, "AMD EPYC")


def test_entries_and_cells_made_before_cpus_were_recorded_count_as_the_xeons(pacs):
    legacy = {"distance_to_base": 0.02, "train_accuracy": 0.9, "sha256": "ab", "hparams": {}}
    assert pacs.built_on(legacy, "Intel Xeon") is legacy
    assert pacs.built_on(legacy, "AMD EPYC") is None
    cells = pacs.DURABLE / "trial1"
    cells.mkdir(parents=True)
    pacs.save_json(cells / "photo-erm.cost.json", {"runs": [], "linear_probe_seconds": 1.0})
    pacs.save_json(cells / "photo-soup.cost.json", {"runs": [], "linear_probe_seconds": 1.0, "cpu": "AMD EPYC"})
    assert pacs.cpus_of(1) == {"Intel Xeon": 1, "AMD EPYC": 1}


@pytest.mark.parametrize(
    ("model_name", "kind"),
    [
        ("Intel(R) Xeon(R) Platinum 8488C", "Intel Xeon"),
        ("AMD EPYC", "AMD EPYC"),
        ("AMD EPYC 7R13 Processor", "AMD EPYC"),
        ("Intel(R) Core(TM) i7-1165G7 @ 2.80GHz", "Intel Core i7-1165G7 @ 2.80GHz"),
    ],
)
def test_the_cpu_kind_is_the_vendor_and_line_of_the_model_name(pacs, monkeypatch, model_name, kind):
    monkeypatch.setattr(pacs, "_cpuinfo", lambda: f"processor\t: 0\nmodel name\t: {model_name}\nflags\t\t: fpu\n")
    assert pacs.cpu_kind() == kind


def test_a_session_rebuilds_exactly_the_fine_tunes_its_trials_cells_recycle(pacs):
    from ratatouille_hub.sweep import cell_recipe, cells_of

    for trials in ([0], [1], [1, 2], [0, 1, 2]):
        runs_of = pacs.drawn_runs(trials)
        rebuilt = {pacs.recipe_finetune_id(name, run) for name, runs in runs_of.items() for run in runs}
        recycled = set()
        for trial in trials:
            for domain in pacs.DOMAINS:
                config = pacs.sweep_config(trial, domain)
                recycled |= {aux for c in cells_of(config) for aux in pacs.draw_finetunes(cell_recipe(config, c)).aux}
        assert rebuilt == recycled
        assert all(len(runs) == len(trials) * pacs.AUX_PER_TRIAL for runs in runs_of.values())  # trials draw apart
    assert pacs.drawn_runs(None) == {name: [0, 1, 2, 3] for name in ("caltech101", "clothing", "cifar10")}


def test_the_trainer_group_and_the_diagnosis_use_each_resolutions_own_trial(pacs):
    """64 px: trial 0, as its committed cells; 128 px: trial 2, the one whose runs a session still has to make."""
    assert pacs.HUB_STYLE_TRIALS == (2,)  # the fixture's configure(128)
    pacs.configure(64)
    assert pacs.HUB_STYLE_TRIALS == (0,)
    assert "trial 0 only, after the three trials (its art_painting runs are diagnosed as soon as" in pacs.protocol()


def test_the_report_names_each_rows_runs_and_costs_each_cpu_kind_apart(pacs, capsys):
    """Two complete trials from the committed 128 px trial 0 (the Xeon's): trial 1 a copy recorded on an EPYC at
    twice the seconds, and a diagnosis of trial 1; the Trainer group's cells are not made yet."""
    import json
    import shutil

    committed = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "pacs-128px" / "cells" / "trial0"
    shutil.copytree(committed, pacs.DURABLE / "trial0")
    shutil.copytree(committed, pacs.DURABLE / "trial1")
    for path in (pacs.DURABLE / "trial1").glob("*.cost.json"):
        cost = json.loads(path.read_text())
        cost["runs"] = [run | {"seconds": 2 * run["seconds"]} for run in cost["runs"]]
        cost |= {"linear_probe_seconds": 2 * cost["linear_probe_seconds"], "cpu": "AMD EPYC"}
        path.write_text(json.dumps(cost))
    diagnosis = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "pacs-64px" / "cells" / "trial0"
    shutil.copy(diagnosis / "diagnose-art_painting.json", pacs.DURABLE / "trial1")

    trainer_group = {"runs": [], "linear_probe_seconds": 1.0, "cpu": "Intel Xeon"}  # no table row reads it
    (pacs.DURABLE / "trial1" / "photo-hub-style.cost.json").write_text(json.dumps(trainer_group))

    pacs.report()
    capsys.readouterr()
    report = (pacs.RESULTS / "pacs.md").read_text()

    def seconds(strategy: str, recycled_only: bool = False) -> tuple[int, int, float]:
        """Runs, steps and seconds of a strategy's cells over the 4 domains, read from the committed files."""
        runs = steps = 0
        total = 0.0
        for domain in ("art_painting", "cartoon", "photo", "sketch"):
            cost = json.loads((committed / f"{domain}-{strategy}.cost.json").read_text())
            inits = [run["init"] for run in json.loads((committed / f"{domain}-{strategy}.json").read_text())["runs"]]
            total += cost["linear_probe_seconds"]
            for run, init in zip(cost["runs"], inits, strict=True):
                if recycled_only and init.startswith("bench/efficientnet-lite0-imagenet@"):
                    continue
                runs, steps, total = runs + 1, steps + run["steps"], total + run["seconds"]
        return runs, steps, total

    assert "| runs | steps | seconds, Intel Xeon (trial 0) | seconds, AMD EPYC (trial 1) |" in report
    for row, strategy, recycled_only in (("ERM (LP init)", "erm", False), ("Inter-training", "ratatouille", True)):
        runs, steps, spent = seconds(strategy, recycled_only)
        assert f"| {runs} | {steps} | {spent:.0f} | {2 * spent:.0f} |" in next(
            line for line in report.splitlines() if line.startswith(f"| {row} |")
        )
    assert seconds("ratatouille", recycled_only=True)[:2] == (12, 1920)  # 3 recycled runs of 120 + 40 warm-up steps

    # the committed trial 0, art_painting: ERM kept run 1 (from the base), Inter-training run 2 (clothing-2), ...
    named = "| 0 | art_painting | run 1 (base) | run 2 (clothing-2) | run 0 (fused 9096c72c2b77) | "
    assert (
        named + "run 0 (base), run 1 (base), run 2 (base) | run 0 (base), run 1 (caltech101-2), run 2 (clothing-2) |"
        in report
    )
    # trial 0's distinct runs (shared ones once) whose best validation step is their last (120), by init
    last: dict[tuple[str, str], bool] = {}
    kinds: dict[tuple[str, str], str] = {}
    for path in committed.glob("*.json"):
        if path.name.endswith(".cost.json") or path.name.startswith("diagnose-"):
            continue
        record = json.loads(path.read_text())
        for run in record["runs"]:
            key = (record["test_domain"], run["folder"])
            last[key] = run["best_step"] == 120
            kinds[key] = next(
                k
                for p, k in (("bench/efficientnet-lite0-imagenet@", "base"), ("fusion:", "fused"), ("", "recycled"))
                if run["init"].startswith(p)
            )
    counts = [
        (sum(last[k] for k in kinds if kinds[k] == kind), sum(kinds[k] == kind for k in kinds))
        for kind in ("base", "recycled", "fused")
    ]
    assert [total for _, total in counts] == [16, 12, 16]  # 11 distinct runs per test domain
    counts.append((sum(last.values()), len(last)))
    assert "| 0 | " + " | ".join(f"{a} of {b}" for a, b in counts) + " |" in report
    last_best, runs = counts[-1]
    assert f"In all, {2 * last_best} of {2 * runs} runs had not peaked" in report  # trial 1 is trial 0's copy
    assert "## Diagnose: every pair of the Ratatouille runs, trial 1, test domain art_painting" in report
    assert list(json.loads((pacs.RESULTS / "pacs.json").read_text())["diagnose"]) == ["trial1/diagnose-art_painting"]
    assert "Trainer group: fine-tunes" not in report  # none of its cells yet: no empty table
    assert "paired over trials; the paper: +3.6): not met on the mean" in report
