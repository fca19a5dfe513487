"""How far the demo's gaps stand from the noise of its images: which images each run and each uniform average
got right, and a paired bootstrap over those images for every gap the demo's reading judges.

A toy world's validation holds a few hundred images: a gap of half a point is two or three of them, and which
side of zero it lands on changes with the CPU's kernels. The reading says "above" or "below" only where the
band (where the gap falls on 90% of the resamplings of the images) keeps clear of zero, so its words do not
turn on an image or two. The band is the images' noise only: the runs' own spread (seeds, kernels) is not in it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diagnostics import error_ratio

BAND = 0.90  # the share of resamplings a band holds
RESAMPLES = 2000  # enough that a band's ends move by less than the 0.1 point they are printed to
SEED = 0  # one fixed stream: the same images, the same bands


@dataclass(frozen=True)
class Band:
    """A gap in points, and where it falls on BAND of the resamplings of the images."""

    estimate: float
    low: float
    high: float
    decimals: int = 1  # as printed: points to 0.1, ratio-errors to 0.01

    @property
    def side(self) -> str:
        """ "above" or "below" zero where the band, as printed, keeps clear of it; else "level"."""
        if round(self.low, self.decimals) > 0:
            return "above"
        if round(self.high, self.decimals) < 0:
            return "below"
        return "level"

    def __str__(self) -> str:
        if self.low == float("-inf"):
            return f"{self.signed(self.estimate)} (band unbounded: some resamplings share no error)"
        return f"{self.signed(self.estimate)} ({self.signed(self.low)} to {self.signed(self.high)})"

    def signed(self, value: float) -> str:
        return signed(value, self.decimals)


def signed(value: float, decimals: int = 1) -> str:
    """`value` as printed: signed, never "-0.0"."""
    return f"{round(value, decimals) + 0.0:+.{decimals}f}"


@dataclass(frozen=True)
class Correct:
    """Which images each run (rows) and the uniform average of all of them got right, on one split."""

    runs: torch.Tensor  # bool, (runs, images)
    average: torch.Tensor  # bool, (images,)

    @property
    def above_runs(self) -> torch.Tensor:
        """Per image: the average's score minus the runs' mean score (its mean over images is the gap)."""
        return self.average.float() - self.runs.float().mean(0)


def bootstrap(statistic: Callable[[torch.Tensor], float], images: int, decimals: int = 1) -> Band:
    """`statistic(indices)` on every image, and its band over RESAMPLES resamplings of the images with
    replacement; the same resamplings for every call, so two statistics of the same images are paired."""
    generator = torch.Generator().manual_seed(SEED)
    values = torch.tensor([statistic(torch.randint(images, (images,), generator=generator)) for _ in range(RESAMPLES)])
    estimate = statistic(torch.arange(images))
    if not torch.isfinite(values).all():
        return Band(estimate, float("-inf"), float("inf"), decimals)
    tail = (1 - BAND) / 2
    low, high = torch.quantile(values.double(), torch.tensor([tail, 1 - tail], dtype=torch.double)).tolist()
    return Band(estimate, low, high, decimals)


def gap_band(correct: Correct) -> Band:
    """Points by which the uniform average beats the mean of its runs, with its band."""
    per_image = correct.above_runs
    return bootstrap(lambda indices: 100 * float(per_image[indices].mean()), per_image.numel())


def median_error_ratio(correct: torch.Tensor, pairs: Sequence[tuple[int, int]], indices: torch.Tensor) -> float:
    """docs/method.md's diversity on the images `indices`: the median ratio-error over `pairs` of runs."""
    if not pairs:
        raise ValueError("diversity needs at least one pair of runs")
    wrong = ~correct[:, indices]
    return statistics.median(error_ratio(wrong[a], wrong[b]) for a, b in pairs)


def diversity_band(
    recycled: torch.Tensor, recycled_pairs: Sequence[tuple[int, int]], base: torch.Tensor, base_pairs
) -> Band:
    """The recycled runs' median ratio-error minus the base-initialised runs', on the same images resampled
    together: the diversity the recycled inits add, with its band."""
    if recycled.shape[1] != base.shape[1]:
        raise ValueError(
            f"the two recycles were scored on {recycled.shape[1]} and {base.shape[1]} images: not the same"
        )
    return bootstrap(
        lambda indices: (
            median_error_ratio(recycled, recycled_pairs, indices) - median_error_ratio(base, base_pairs, indices)
        ),
        recycled.shape[1],
        decimals=2,
    )


@dataclass(frozen=True)
class Gaps:
    """A recycle's uniform average against the mean of its runs, with bands."""

    val: Band  # training-domain validation: the criterion
    test: Band  # the held-out domain: what the demo reports first


@dataclass(frozen=True)
class Evidence:
    gaps: Mapping[str, Gaps]  # by recycle
    diversity: Band  # the careful Ratatouille's median ratio-error minus the soup's, on validation


def correct_per_image(plan, output: Path, results) -> dict[str, Correct]:
    """Which images each of the recycle's runs and its uniform average got right, on pooled training-domain
    validation ("val") and on the held-out domain ("test"): the runs' logits as recycle stored them, the
    average rebuilt by recycle's own averager. Each count must be the accuracy recycle recorded."""
    from ..artifacts import RunRecord
    from ..merge_methods import Mixture
    from ..recipe import decode_target
    from ..recipe.assembly import RunAverager
    from ..target import predict_target

    target = decode_target(plan, output)
    labels = {
        "val": torch.cat([images.labels for images in target.data.val]),
        "test": target.test.labels,
    }

    def correct(logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pooled = torch.cat([logits[f"val/{domain}"] for domain in target.train_domains])
        return {"val": pooled.argmax(1) == labels["val"], "test": logits["test"].argmax(1) == labels["test"]}

    records = [RunRecord(output / spec.folder) for spec in plan.runs]
    runs = [correct(record.predictions()) for record in records]
    averager = RunAverager([record.model_folder for record in records], target, plan.config.bn_policy)
    average = correct(predict_target(averager.model(Mixture(tuple(range(len(records))))), target))
    scored = [("the uniform average", results.averages["uniform"], average)]
    scored += [(f"run {i}", run, mask) for i, (run, mask) in enumerate(zip(results.runs, runs, strict=True))]
    for name, recorded, mask in scored:
        for split in labels:
            if round(getattr(recorded, f"{split}_accuracy") * labels[split].numel()) != int(mask[split].sum()):
                raise RuntimeError(f"{name} as the reading rebuilt it is not the one recycle scored ({split})")
    return {split: Correct(torch.stack([run[split] for run in runs]), average[split]) for split in labels}


def gather_evidence(correct: Mapping[str, Mapping[str, Correct]], results, soup: str, careful: str) -> Evidence:
    """Every band the demo's reading judges: each recycle's gaps, and the diversity the careful recycled inits
    add over the soup's base inits, over the same pairs as the criteria table (the best run with each other)."""

    def pairs(name: str) -> list[tuple[int, int]]:
        return [(pair.runs[0], pair.runs[1]) for pair in results[name].diagnostics]

    everything = torch.arange(correct[soup]["val"].runs.shape[1])
    for name in (soup, careful):  # the runs' stored logits against the predictions diagnose made from their weights
        recorded = statistics.median(pair.ratio_error for pair in results[name].diagnostics)
        if median_error_ratio(correct[name]["val"].runs, pairs(name), everything) != recorded:
            raise RuntimeError(f"{name}: the runs' stored predictions disagree with diagnose's ratio-errors")
    gaps = {name: Gaps(gap_band(splits["val"]), gap_band(splits["test"])) for name, splits in correct.items()}
    diversity = diversity_band(correct[careful]["val"].runs, pairs(careful), correct[soup]["val"].runs, pairs(soup))
    return Evidence(gaps, diversity)
