"""The demo's first lines: the held-out verdict and the three criteria, computed from the results as they come."""

from __future__ import annotations

from types import SimpleNamespace

from ratatouille_hub.toy.demo import VETTED, criteria_reading, criteria_table, headline


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


def test_headline_compares_each_uniform_average_with_erm_on_the_held_out_domain():
    assert headline(_world()).splitlines() == [
        "Held out (sketch), never seen in training or selection: ERM (best run from the base) 80.0%",
        "- Model soup (every run from the base), uniform average: 85.0%, 5.0 points above ERM; +6.0 against its "
        "runs' mean (runs 74.0-83.0%)",
        "- Ratatouille (the careful fine-tunes), uniform average: 80.0%, level with ERM; +6.0 against its runs' mean "
        "(runs 70.0-78.0%)",
        "- Ratatouille (with the careless one), uniform average: 79.5%, 0.5 points below ERM; -2.0 against its runs' "
        "mean (runs 81.0-82.0%)",
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


def test_the_reading_says_which_criteria_hold_on_validation_and_what_that_predicts():
    """The soup's and the careful Ratatouille's uniform averages against their runs' mean, the recycled inits'
    diversity against the soup's, the careless fine-tune's recipe as the case vetting flags, and the conclusion
    that follows: computed, since which side a world lands on can change with the CPU."""
    world = _world()
    assert criteria_reading(world).splitlines() == [
        "Why, from the criteria on training-domain validation (the table below):",
        "- each uniform average against its runs' mean: soup +1.0, careful Ratatouille -1.0 points "
        "(careful Ratatouille: not above)",
        "- the recycled inits add diversity: median ratio-error 2.50 between the careful Ratatouille's runs, 2.00 "
        "between the soup's",
        "- with the careless fine-tune, the one vetting flags: -10.0 points (not above its runs' mean)",
        "So the criteria fail on validation already: this world does not meet the method's conditions, and its "
        "held-out column, whichever way it falls, does not test the method.",
    ]
    held = {
        "soup": _results([0.90, 0.94], [0.01], [1.0], 0.93, 0.85, [0.83, 0.84]),
        VETTED: _results([0.88, 0.96], [0.01], [1.5], 0.93, 0.83, [0.84, 0.85]),
        "ratatouille": _results([0.85, 0.95], [0.02], [1.2], 0.91, 0.70, [0.80, 0.80]),
    }
    lines = criteria_reading(held).splitlines()
    assert lines[1].endswith("soup +1.0, careful Ratatouille +1.0 points (both above)")
    assert lines[2].startswith("- the recycled inits add diversity: median ratio-error 1.50 ")
    assert lines[3] == "- with the careless fine-tune, the one vetting flags: +1.0 points (above its runs' mean)"
    assert lines[4] == (
        "So the criteria hold on validation, and the held-out domain breaks them anyway: there an average lands at "
        "or below its runs' mean, which validation did not foretell."
    )  # the careful Ratatouille's 83.0% on the held-out domain, 1.5 points under its runs' 84.5%
    held[VETTED].averages["uniform"].test_accuracy = 0.855
    assert criteria_reading(held).splitlines()[4] == (
        "So the criteria hold on validation, and the held-out domain follows them: there too each average lands "
        "above its runs' mean."
    )  # the careless recipe's 70.0% under its runs' 80.0% is its own line's business, not the verdict's
    held[VETTED].averages["uniform"].test_accuracy = 0.845  # level with its runs' mean: not above
    assert criteria_reading(held).splitlines()[4].startswith("So the criteria hold on validation, and the held-out")
    assert "breaks them anyway" in criteria_reading(held).splitlines()[4]
    held[VETTED].averages["uniform"].test_accuracy = 0.855
    held["ratatouille"].averages["uniform"].val_accuracy = 0.85
    assert criteria_reading(held).splitlines()[3].endswith("-5.0 points (not above its runs' mean)")
    assert criteria_reading(held).splitlines()[4].startswith("So the criteria hold on validation")
    for result in held.values():
        result.averages["uniform"].val_accuracy = 0.8
    assert criteria_reading(held).splitlines()[1].endswith("careful Ratatouille -12.0 points (neither above)")
    for result, val in zip(held.values(), (0.93, 0.93, 0.91), strict=True):
        result.averages["uniform"].val_accuracy = val
    held[VETTED].diagnostics[0].ratio_error = 1.0
    assert (
        criteria_reading(held)
        .splitlines()[2]
        .startswith("- the recycled inits add no diversity: median ratio-error 1.00")
    )
    assert criteria_reading(held).splitlines()[4].startswith("So the criteria fail on validation already")


def test_the_soup_alone_below_or_off_on_the_held_out_domain_decides_the_verdict_too():
    held = {
        "soup": _results([0.90, 0.94], [0.01], [1.0], 0.91, 0.86, [0.83, 0.84]),  # -1.0 on validation
        VETTED: _results([0.88, 0.96], [0.01], [1.5], 0.93, 0.86, [0.84, 0.85]),
        "ratatouille": _results([0.85, 0.95], [0.02], [1.2], 0.91, 0.86, [0.80, 0.80]),
    }
    lines = criteria_reading(held).splitlines()
    assert lines[1].endswith("soup -1.0, careful Ratatouille +1.0 points (soup: not above)")
    assert lines[4].startswith("So the criteria fail on validation already")
    held["soup"].averages["uniform"].val_accuracy = 0.93
    held["soup"].averages["uniform"].test_accuracy = 0.835  # the runs' mean on the held-out domain, to the point
    assert "breaks them anyway" in criteria_reading(held).splitlines()[4]


def test_a_gap_that_rounds_to_zero_prints_as_plus_zero_and_is_not_above():
    """-0.04 points would print "-0.0" with a plain format; it is level, so not above, whichever its sign."""
    held = {
        "soup": _results([0.90, 0.94], [0.01], [1.0], 0.93, 0.86, [0.83, 0.84]),
        VETTED: _results([0.88, 0.96], [0.01], [1.5], 0.93, 0.86, [0.84, 0.85]),
        "ratatouille": _results([0.85, 0.95], [0.02], [1.2], 0.8996, 0.86, [0.80, 0.80]),  # -0.04 points
    }
    assert criteria_reading(held).splitlines()[3] == (
        "- with the careless fine-tune, the one vetting flags: +0.0 points (not above its runs' mean)"
    )
    held["soup"].averages["uniform"].test_accuracy = 0.8346  # -0.04 points against its runs' mean there
    assert headline(held).splitlines()[1].endswith("; +0.0 against its runs' mean (runs 83.0-84.0%)")
    assert "breaks them anyway" in criteria_reading(held).splitlines()[4]
    held["soup"].averages["uniform"].test_accuracy = 0.8354  # +0.04 points: "+0.0" too, so level, not followed
    assert headline(held).splitlines()[1].endswith("; +0.0 against its runs' mean (runs 83.0-84.0%)")
    assert "breaks them anyway" in criteria_reading(held).splitlines()[4]
    held["soup"].averages["uniform"].test_accuracy = 0.86
    held["soup"].averages["uniform"].val_accuracy = 0.9204  # +0.04 on validation: level, so not above
    assert (
        criteria_reading(held).splitlines()[1].endswith("soup +0.0, careful Ratatouille +1.0 points (soup: not above)")
    )
    assert criteria_reading(held).splitlines()[4].startswith("So the criteria fail on validation already")


def test_diversity_is_judged_as_printed():
    """Two medians that print alike (0.77 and 0.77) are not diversity added, whatever their third decimal."""
    held = {
        "soup": _results([0.90, 0.94], [0.01], [0.7701], 0.93, 0.86, [0.83, 0.84]),
        VETTED: _results([0.88, 0.96], [0.01], [0.7704], 0.93, 0.86, [0.84, 0.85]),
        "ratatouille": _results([0.85, 0.95], [0.02], [1.2], 0.91, 0.86, [0.80, 0.80]),
    }
    assert (
        criteria_reading(held)
        .splitlines()[2]
        .startswith("- the recycled inits add no diversity: median ratio-error 0.77")
    )
    assert criteria_reading(held).splitlines()[4].startswith("So the criteria fail on validation already")
