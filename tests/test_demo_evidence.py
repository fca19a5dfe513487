"""The demo's bands: a paired bootstrap over the images, for the gaps and the diversity its reading judges, and
the per-image record they resample, which must be the one recycle scored."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from ratatouille_hub.toy.evidence import (
    Band,
    Correct,
    correct_per_image,
    diversity_band,
    gap_band,
    gather_evidence,
    median_error_ratio,
)


def _mask(bits: str) -> torch.Tensor:
    return torch.tensor([bit == "1" for bit in bits])


def test_a_gap_the_same_on_every_image_has_a_band_of_that_gap_alone():
    """Two runs, one right everywhere and one wrong everywhere; the average right everywhere: +50 points on
    every image, so on every resampling."""
    correct = Correct(runs=torch.stack([_mask("1111"), _mask("0000")]), average=_mask("1111"))
    assert gap_band(correct) == Band(50.0, 50.0, 50.0)
    assert gap_band(correct).side == "above"


def test_a_gap_band_is_the_spread_of_a_mean_over_resampled_images():
    """400 images, the average right where the one run is wrong on 40 of them: a gap of 10 points whose 90%
    band is, by the normal approximation of a mean, 10 +- 1.645 * sqrt(0.1 * 0.9 / 400) * 100 = 10 +- 2.47."""
    run = torch.ones(400, dtype=torch.bool)
    run[:40] = False
    band = gap_band(Correct(runs=run[None], average=torch.ones(400, dtype=torch.bool)))
    assert band.estimate == pytest.approx(10.0)
    assert band.low == pytest.approx(10 - 2.47, abs=0.35) and band.high == pytest.approx(10 + 2.47, abs=0.35)
    assert gap_band(Correct(runs=run[None], average=torch.ones(400, dtype=torch.bool))) == band  # one fixed stream


def test_the_diversity_band_resamples_both_recycles_on_the_same_images():
    """The same runs on both sides: every resampling gives a difference of exactly zero, which only a paired
    resampling does (two independent ones would spread it)."""
    generator = torch.Generator().manual_seed(1)
    correct = torch.rand(3, 200, generator=generator) > 0.3
    pairs = [(0, 1), (0, 2)]
    assert diversity_band(correct, pairs, correct, pairs) == Band(0.0, 0.0, 0.0, decimals=2)


def test_the_median_ratio_error_counts_errors_made_by_one_run_against_errors_made_by_both():
    wrong_in = {"a": "110100", "b": "011100", "c": "000001"}  # a, b: 2 apart, 2 together; a, c: 4 apart, 0 together
    correct = torch.stack([~_mask(bits) for bits in wrong_in.values()])
    everything = torch.arange(6)
    assert median_error_ratio(correct, [(0, 1)], everything) == 1.0
    assert median_error_ratio(correct, [(0, 2)], everything) == float("inf")
    assert median_error_ratio(correct, [(0, 1), (0, 1), (0, 2)], everything) == 1.0
    assert median_error_ratio(correct, [(0, 1)], torch.tensor([0, 0, 1, 3])) == 2 / 2  # a twice apart, twice together


def test_a_band_that_some_resamplings_leave_without_shared_errors_is_unbounded_and_never_decides():
    correct = torch.stack([~_mask("1000000000"), ~_mask("1100000000")])  # one shared error in ten images
    band = diversity_band(correct, [(0, 1)], correct[[1, 0]], [(0, 1)])
    assert (band.low, band.high) == (float("-inf"), float("inf"))
    assert band.side == "level"
    assert str(band) == "+0.00 (band unbounded: some resamplings share no error)"


def test_recycles_scored_on_other_images_or_without_pairs_are_refused():
    correct = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="scored on 5 and 4 images"):
        diversity_band(correct, [(0, 1)], correct[:, :4], [(0, 1)])
    with pytest.raises(ValueError, match="at least one pair"):
        median_error_ratio(correct, [], torch.arange(5))


def _diagnosed(pairs, ratios):
    return SimpleNamespace(diagnostics=[SimpleNamespace(runs=list(p), ratio_error=r) for p, r in zip(pairs, ratios)])


def test_the_evidence_reads_each_recycles_diagnosed_pairs_and_refuses_predictions_that_disagree_with_them():
    """Runs wrong on 1100, 1010 and 1111 (ratio-errors 2 for runs 0 and 1, 1 with run 2). The soup's diagnose
    measured pairs (2, 0) and (2, 1), the careful recycle's (0, 1) and (0, 2): medians 1.0 and 1.5."""
    runs = ~torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    split = Correct(runs=runs, average=torch.ones(4, dtype=torch.bool))  # the average right on every image
    correct = {name: {"val": split, "test": split} for name in ("soup", "careful")}
    results = {"soup": _diagnosed([(2, 0), (2, 1)], [1.0, 1.0]), "careful": _diagnosed([(0, 1), (0, 2)], [2.0, 1.0])}
    evidence = gather_evidence(correct, results, soup="soup", careful="careful")
    assert evidence.diversity.estimate == 0.5
    assert evidence.gaps["soup"].val.estimate == pytest.approx(100 * (1 - (2 + 2 + 0) / 12))
    results["careful"].diagnostics[1].ratio_error = 2.0  # diagnose saw other predictions than the stored ones
    with pytest.raises(RuntimeError, match="careful: the runs' stored predictions disagree"):
        gather_evidence(correct, results, soup="soup", careful="careful")


@pytest.mark.parametrize(
    ("band", "side", "printed"),
    [
        (Band(0.5, 0.04, 1.0), "level", "+0.5 (+0.0 to +1.0)"),  # its low end prints as zero: not clear of it
        (Band(0.5, 0.06, 1.0), "above", "+0.5 (+0.1 to +1.0)"),
        (Band(-0.5, -1.0, -0.04), "level", "-0.5 (-1.0 to +0.0)"),
        (Band(-0.5, -1.0, -0.06), "below", "-0.5 (-1.0 to -0.1)"),
        (Band(0.05, 0.004, 0.2, decimals=2), "level", "+0.05 (+0.00 to +0.20)"),
        (Band(0.05, 0.006, 0.2, decimals=2), "above", "+0.05 (+0.01 to +0.20)"),
    ],
)
def test_a_band_decides_its_side_as_printed(band, side, printed):
    assert band.side == side
    assert str(band) == printed


@pytest.fixture(scope="module")
def recycled(tiny_world, tmp_path_factory):
    from ratatouille_hub.recipe import plan_recipe, recycle
    from ratatouille_hub.testing import tiny_recipe

    output = tmp_path_factory.mktemp("evidence") / "out"
    config = tiny_recipe(tiny_world, output)
    (plan,) = plan_recipe(config, echo=lambda line: None)
    return plan, output, recycle(config, echo=lambda line: None)


def test_the_images_each_run_and_the_uniform_average_got_right_are_those_recycle_scored(recycled):
    plan, output, results = recycled
    correct = correct_per_image(plan, output, results)
    for split in ("val", "test"):
        accuracy = f"{split}_accuracy"
        assert correct[split].runs.float().mean(1).tolist() == pytest.approx(
            [getattr(run, accuracy) for run in results.runs], abs=1e-6
        )
        assert float(correct[split].average.float().mean()) == pytest.approx(
            getattr(results.averages["uniform"], accuracy), abs=1e-6
        )


def test_a_record_that_is_not_what_the_reading_rebuilt_is_refused(recycled):
    plan, output, results = recycled
    uniform = results.averages["uniform"]
    for split in ("val", "test"):
        scores = replace(uniform, **{f"{split}_accuracy": 1.5})
        wrong = replace(results, averages={**results.averages, "uniform": scores})
        with pytest.raises(RuntimeError, match=rf"the uniform average as the reading rebuilt it is not .* \({split}\)"):
            correct_per_image(plan, output, wrong)
    runs = [*results.runs]
    runs[1] = replace(runs[1], val_accuracy=runs[1].val_accuracy + 0.5)
    with pytest.raises(RuntimeError, match=r"run 1 as the reading rebuilt it is not the one recycle scored \(val\)"):
        correct_per_image(plan, output, replace(results, runs=runs))
