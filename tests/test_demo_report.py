"""The demo's first lines: the held-out verdict and the three criteria, computed from the results and the bands
of their gaps as they come (the bands themselves: tests/test_demo_evidence.py)."""

from __future__ import annotations

from types import SimpleNamespace

from ratatouille_hub.toy.demo import VETTED, criteria_reading, criteria_table, headline
from ratatouille_hub.toy.evidence import Band, Evidence, Gaps


def _results(runs_val, barriers, ratios, uniform_val, uniform_test, runs_test):
    runs = [SimpleNamespace(val_accuracy=v, test_accuracy=t) for v, t in zip(runs_val, runs_test, strict=True)]
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
        "soup": _results([0.90, 0.94, 0.92], [0.01, 0.03], [1.0, 3.0], 0.93, 0.85, [0.83, 0.80, 0.74]),
        VETTED: _results([0.88, 0.96], [0.05], [2.5], 0.91, 0.80, [0.70, 0.78]),
        "ratatouille": _results([0.85, 0.95], [0.02], [float("inf")], 0.80, 0.7951, [0.81, 0.82]),
    }


ABOVE, LEVEL, BELOW = Band(1.0, 0.4, 1.6), Band(0.5, -0.2, 1.2), Band(-2.0, -2.9, -1.1)


def _evidence(soup=(ABOVE, ABOVE), careful=(ABOVE, ABOVE), careless=(LEVEL, BELOW), diversity=(0.2, 0.05, 0.4)):
    """Each recycle's (validation, held-out) gap bands, and the diversity band."""
    return Evidence(
        gaps={"soup": Gaps(*soup), VETTED: Gaps(*careful), "ratatouille": Gaps(*careless)},
        diversity=Band(*diversity, decimals=2),
    )


def test_headline_says_first_whether_averaging_paid_then_each_gap_with_its_band_then_erm():
    world = _world()
    evidence = _evidence(soup=(ABOVE, BELOW), careful=(ABOVE, Band(-0.04, -0.9, 0.04)), careless=(LEVEL, ABOVE))
    assert headline(world, evidence).splitlines() == [
        "Held out (sketch), never seen in training or selection. Averaging does not pay here: neither the soup's nor "
        "the careful Ratatouille's average lands clearly above its runs' mean (each gap in points, then where it "
        "falls on 90% of 2,000 resamplings of the images):",
        "- Model soup (every run from the base), uniform average 85.0%: -2.0 (-2.9 to -1.1) against its runs' mean "
        "(runs 74.0-83.0%)",
        "- Ratatouille (the careful fine-tunes), uniform average 80.0%: +0.0 (-0.9 to +0.0) against its runs' mean "
        "(runs 70.0-78.0%)",
        "- Ratatouille (with the careless one), uniform average 79.5%: +1.0 (+0.4 to +1.6) against its runs' mean "
        "(runs 81.0-82.0%)",
        "Against ERM (the best run from the base by validation, 80.0%): soup +5.0, careful Ratatouille +0.0, with the "
        "careless one -0.5 points. ERM is one run: where it falls among the runs moves with the CPU's kernels, and "
        "these gaps with it.",
    ]  # the careless recipe's gain is its own line's, not the verdict's
    first = "Held out (sketch), never seen in training or selection. "
    for evidence, verdict in [
        (
            _evidence(soup=(ABOVE, ABOVE), careful=(ABOVE, LEVEL)),
            "Averaging pays for the soup only: of the two uniform averages, only its lands clearly above its runs' "
            "mean (each gap",
        ),
        (
            _evidence(soup=(LEVEL, ABOVE), careful=(LEVEL, ABOVE)),
            "Averaging pays here: the soup's and the careful Ratatouille's uniform averages each land clearly above "
            "their runs' mean (each gap",
        ),
    ]:
        assert headline(world, evidence).splitlines()[0].startswith(first + verdict)


def test_criteria_table_gives_each_recycle_its_runs_barriers_diversity_and_uniform_average_on_validation():
    lines = criteria_table(_world()).splitlines()
    assert [line.split(" (")[0] for line in lines[2:]] == [
        "Model soup",
        "Ratatouille",
        "Ratatouille",
    ]
    assert lines[2].endswith("90.0-94.0 (92.0)              2.0, 3.0        2.00       93.0%")
    assert lines[4].endswith("85.0-95.0 (90.0)              2.0, 2.0         inf       80.0%")


def test_criteria_that_hold_on_validation_and_a_held_out_domain_that_follows_or_not():
    world = _world()
    assert criteria_reading(world, _evidence()).splitlines() == [
        "Why, from the criteria on training-domain validation (the table below; bands as above):",
        "- each uniform average against its runs' mean: soup +1.0 (+0.4 to +1.6), careful Ratatouille +1.0 (+0.4 to "
        "+1.6) points: both above their runs' mean",
        "- median ratio-error 2.50 between the careful Ratatouille's runs, 2.00 between the soup's; the recycled "
        "inits add +0.20 (+0.05 to +0.40): diversity beyond the noise",
        "- with the careless fine-tune, the one vetting flags: +0.5 (-0.2 to +1.2) points: level with its runs' mean",
        "So the criteria hold on validation, and the held-out domain follows them: there too each average lands "
        "clearly above its runs' mean.",
    ]
    level = criteria_reading(world, _evidence(careful=(ABOVE, LEVEL))).splitlines()[-1]
    assert level == (  # a level gap is a gain not shown, not a loss
        "So the criteria hold on validation, but on the held-out domain the careful Ratatouille's average does not "
        "land clearly above its runs' mean: validation did not foretell that."
    )
    both = criteria_reading(world, _evidence(soup=(ABOVE, BELOW), careful=(ABOVE, LEVEL))).splitlines()[-1]
    assert both.startswith(
        "So the criteria hold on validation, but on the held-out domain neither the soup's nor the careful "
        "Ratatouille's average lands clearly above its runs' mean: "
    )


def test_criteria_within_the_noise_and_what_the_held_out_domain_did():
    """The reading of both CPU types measured (docs/demo-output.md): every validation gap level, the runs sharing
    most of their errors, no diversity beyond the noise, no clear gain on the held-out domain."""
    world = _world()
    for result, ratios in zip(world.values(), ([0.72, 0.70], [0.77], [0.73]), strict=True):
        for pair, ratio in zip(result.diagnostics, ratios):
            pair.ratio_error = ratio
    evidence = _evidence(soup=(LEVEL, BELOW), careful=(LEVEL, LEVEL), diversity=(0.05, -0.15, 0.23))
    assert criteria_reading(world, evidence).splitlines()[1:] == [
        "- each uniform average against its runs' mean: soup +0.5 (-0.2 to +1.2), careful Ratatouille +0.5 (-0.2 to "
        "+1.2) points: both level with their runs' mean",
        "- median ratio-error 0.77 between the careful Ratatouille's runs, 0.71 between the soup's (under 1: the runs "
        "make most of their errors together); the recycled inits add +0.05 (-0.15 to +0.23): no diversity beyond the "
        "noise",
        "- with the careless fine-tune, the one vetting flags: +0.5 (-0.2 to +1.2) points: level with its runs' mean",
        "So the criteria are not all met beyond the noise on validation (neither the soup's nor the careful "
        "Ratatouille's average clearly above its runs' mean; no diversity added beyond the noise), and on the "
        "held-out domain neither the soup's nor the careful Ratatouille's average lands clearly above its runs' "
        "mean.",
    ]
    evidence = _evidence(soup=(ABOVE, ABOVE), careful=(BELOW, BELOW), diversity=(0.3, 0.1, 0.5))
    lines = criteria_reading(world, evidence).splitlines()
    assert lines[1].endswith("points: soup above its runs' mean; careful Ratatouille below its runs' mean")
    assert lines[-1] == (
        "So the criteria are not all met beyond the noise on validation (the careful Ratatouille's average not "
        "clearly above its runs' mean); on the held-out domain the soup's average lands clearly above its runs' "
        "mean all the same."
    )
    evidence = _evidence(diversity=(-0.2, -0.4, -0.05))  # the recycled inits clearly less diverse
    lines = criteria_reading(world, evidence).splitlines()
    assert lines[2].endswith(
        "the recycled inits add -0.20 (-0.40 to -0.05): less diversity than the base's inits, beyond the noise"
    )
    assert lines[-1] == (
        "So the criteria are not all met beyond the noise on validation (less diversity); on the held-out domain the "
        "soup's and the careful Ratatouille's averages land clearly above their runs' mean all the same."
    )
