"""The demo's first lines: the held-out verdict and the three criteria, computed from the results as they come."""

from __future__ import annotations

from types import SimpleNamespace

from ratatouille_hub.toy.demo import VETTED, criteria_table, headline


def _results(runs_val, barriers, ratios, uniform_val, uniform_test, best_test=0.0):
    runs = [SimpleNamespace(val_accuracy=v, test_accuracy=best_test) for v in runs_val]
    best = max(range(len(runs)), key=lambda i: runs_val[i])
    return SimpleNamespace(
        runs=runs,
        best_single=runs[best],
        test_domain="sketch",
        diagnostics=[SimpleNamespace(barrier=b, ratio_error=r) for b, r in zip(barriers, ratios)],
        averages={"uniform": SimpleNamespace(val_accuracy=uniform_val, test_accuracy=uniform_test)},
    )


def _world():
    return {
        "soup": _results([0.90, 0.94, 0.92], [0.01, 0.03], [1.0, 3.0], 0.93, 0.85, best_test=0.80),
        VETTED: _results([0.88, 0.96], [0.05], [2.5], 0.91, 0.80),
        "ratatouille": _results([0.85, 0.95], [0.02], [float("inf")], 0.80, 0.7951),
    }


def test_headline_compares_each_uniform_average_with_erm_on_the_held_out_domain():
    assert headline(_world()).splitlines() == [
        "Held out (sketch), never seen in training or selection: ERM (best run from the base) 80.0%",
        "- Model soup (every run from the base), uniform average: 85.0%, 5.0 points above ERM",
        "- Ratatouille (the careful fine-tunes), uniform average: 80.0%, level with ERM",
        "- Ratatouille (with the careless one), uniform average: 79.5%, 0.5 points below ERM",
    ]


def test_criteria_table_gives_each_recycle_its_runs_barriers_diversity_and_uniform_average_on_validation():
    lines = criteria_table(_world()).splitlines()
    assert [line.split(" (")[0] for line in lines[2:]] == [
        "Model soup",
        "Ratatouille",
        "Ratatouille",
    ]
    assert lines[2].endswith("90.0-94.0 (92.0)              2.0, 3.0        2.00       93.0%")
    assert lines[4].endswith("85.0-95.0 (90.0)              2.0, 2.0         inf       80.0%")
