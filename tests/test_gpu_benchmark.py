"""benchmarks/gpu.py, the GPU benchmark, without a GPU: its `--smoke` run on CPU, its hard budget, and the
arithmetic it reports (the device's idle time per step from a profiler trace; the PACS cell's sizing)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _mark(ts: float, dur: float, name: str = "gpu-bench-step", cat: str = "user_annotation") -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}


def test_device_idle_is_the_time_no_device_work_ran_over_the_middle_steps(gpu):
    events = [_mark(t, 10_000) for t in (0, 10_000, 20_000, 30_000)]  # 4 steps of 10 ms; the middle two count
    events += [
        _mark(5_000, 7_000, "k1", "kernel"),  # 10-12 ms inside the window
        _mark(11_000, 4_000, "k2", "kernel"),  # overlaps k1: 10-15 ms counted once
        _mark(25_000, 2_000, "copy", "gpu_memcpy"),  # 25-27
        _mark(29_000, 6_000, "set", "gpu_memset"),  # 29-30 inside the window
        _mark(16_000, 8_000, "op", "cpu_op"),  # host work: not the device's
        _mark(16_000, 8_000, "gpu-bench-step", "gpu_user_annotation"),  # the mark's device copy: not a step
    ]
    found = gpu.device_idle(events, "gpu-bench-step")
    # window 10-30 ms, busy 5 + 2 + 1 = 8 ms: idle 12 ms over 2 steps
    assert found == {"ms_per_step": 6.0, "step_ms": 10.0, "device_busy": 0.4, "steps": 2}


def test_device_idle_needs_three_marked_steps(gpu):
    found = gpu.device_idle([_mark(0, 10), _mark(10, 10)], "gpu-bench-step")
    assert found["ms_per_step"] is None and found["steps"] == 2


def test_the_cell_takes_the_most_runs_that_keep_min_steps_then_the_steps_that_fit(gpu):
    # 40,000 steps of budget (0.4 x 1000 s / 0.01 s); a step of k costs 1.2 x (6k + 1) runs' steps + k
    fast = gpu.cell_size(1000, 0.01, "test", None, None)
    assert (fast.aux_per_dataset, fast.steps, fast.eval_every, fast.warmup, fast.lp_steps) == (4, 1175, 235, 200, 5001)
    # 2,000 steps of budget: no k reaches 1000 steps, so one fine-tune per dataset and 212 steps (210: 5 x 42)
    slow = gpu.cell_size(300, 0.06, "test", None, None)
    assert (slow.aux_per_dataset, slow.steps, slow.eval_every, slow.warmup) == (1, 210, 42, 42)
    chosen = gpu.cell_size(300, 0.06, "test", 500, 2)
    assert (chosen.aux_per_dataset, chosen.steps, chosen.eval_every) == (2, 500, 100)


def _smoke(tmp: Path, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    output = tmp / "out.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp / "work"), "--output", str(output), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, json.loads(output.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One whole --smoke run: both parts, on CPU, tiny."""
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    done, results = _smoke(tmp, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, results


def test_smoke_measures_both_loops_for_each_model_and_precision(smoke):
    _, results = smoke
    part = results["throughput"]
    assert part["status"] == "done" and part["device"]["type"] == "cpu"
    rows = {(row["model"], row["precision"]): row for row in part["rows"]}
    assert set(rows) == {(m, p) for m in ("efficientnet-lite0", "tiny-resnet") for p in ("bf16", "fp32")}
    for row in rows.values():
        assert row["px"] == 32 and row["batch"] == 12 and row["steps"] >= 2
        assert row["ours_images_per_s"] > 0 and row["bare_images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_images_per_s"] / row["bare_images_per_s"], abs=1e-3)
        # the profiled steps were marked (3; the middle one counts), but on CPU there is no device to idle
        assert row["ours_stall"]["ms_per_step"] is None and row["ours_stall"]["steps"] == 1
        assert row["bare_stall"]["steps"] == 1


def test_smoke_runs_the_pacs_cell_through_the_pacs_benchmarks_stages(smoke):
    _, results = smoke
    cell = results["pacs"]
    assert cell["status"] == "done"
    from ratatouille_hub.train import resolved_precision

    assert (cell["device"] == "cpu", cell["precision"]) == (not torch.cuda.is_available(), resolved_precision("auto"))
    assert (cell["test_domain"], cell["strategies"], cell["runs_per_strategy"]) == (
        "sketch",
        ["erm", "soup", "ratatouille"],
        4,
    )
    assert list(cell["stages_s"]) == [
        "seed the local Hub",
        "ingredients (intertrain, decoding included)",
        "the cell (sweep)",
    ]
    rows = cell["accuracy"]["rows"]
    assert {"ERM (LP init)", "Soups, uniform", "Ratatouille, uniform", "Ratatouille, greedy"} <= set(rows)
    assert "Fusing" not in rows  # not one of the cell's strategies
    for scores in rows.values():
        assert 0 <= scores["test_accuracy"] <= 1 and 0 <= scores["val_accuracy"] <= 1
    ratatouille = cell["accuracy"]["cost"]["ratatouille"]["runs"]
    assert len(ratatouille) == 4 and all(run["steps"] >= 2 for run in ratatouille)


def test_a_part_past_the_budget_is_stopped_and_the_json_says_so(smoke):
    tmp, _ = smoke  # its stand-in shared folder is reused
    started = time.monotonic()
    done, results = _smoke(tmp, "--part", "pacs", "--budget-s", "12", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 40  # the child was stopped at the budget, not left to finish
    assert results["pacs"]["status"] == "timed_out"
    assert results["throughput"]["status"] == "done"  # the other part's section, from the run before, is kept
