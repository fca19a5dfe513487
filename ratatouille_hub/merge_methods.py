"""Merge methods: which checkpoints go into the average, and with which weights.

One `@merge_method` entry per method. An entry declares what it needs: `validation` (it ranks or selects on
the target's training-domain validation), `weights` (given by the user), `base` (it moves the members'
mean relative to the base they were fine-tuned from: `Mixture.anchored`), `alpha` (a user's mixing ratio).
`recycle` offers every method it can feed (it has validation, the base and --alpha, not user weights);
`merge` offers them all. CLI choices, config validation,
the results keys (`soup_<name>`) and the card's rows come from this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .registry import Registry

RECYCLE_PROVIDES = frozenset({"validation", "base", "alpha"})


@dataclass(frozen=True)
class MergeInputs:
    count: int
    ranking: Sequence[int] | None = None  # candidates best first, by their own validation accuracy
    score: Callable[[list[int]], float] | None = None  # validation accuracy of the average of a subset
    weights: Sequence[float] | None = None  # the user's, one per candidate
    alpha: float | None = None  # the user's ratio between the base (0) and the mean (1)


if TYPE_CHECKING:  # torch stays unimported until a merge runs: config and --help read this table
    from torch import Tensor

    # (load member k, member count, base state) -> merged state; loads one member at a time
    AnchoredMerge = Callable[[Callable[[int], Mapping[str, Tensor]], int, Mapping[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class Mixture:
    members: tuple[int, ...]
    weights: tuple[float, ...] | None = None  # None: the uniform mean of the members
    anchored: AnchoredMerge | None = None  # a rule toward the base instead of a weighted mean
    parameters: tuple[tuple[str, object], ...] = ()  # what the card and results record about the method


@dataclass(frozen=True)
class MergeMethod:
    name: str
    help: str
    needs: frozenset[str]
    mix: Callable[[MergeInputs], Mixture]

    @property
    def in_recycle(self) -> bool:
        return self.needs <= RECYCLE_PROVIDES


MERGE_METHODS = Registry[MergeMethod]("merge method")


def merge_method(name: str, *, help: str, needs: Sequence[str] = ()):
    def register(mix: Callable[[MergeInputs], Mixture]):
        MERGE_METHODS.add(name, MergeMethod(name, help, frozenset(needs), mix))
        return mix

    return register


def recycle_methods() -> tuple[str, ...]:
    return MERGE_METHODS.names(lambda method: method.in_recycle)


@merge_method("uniform", help="the plain mean of every run")
def _uniform(inputs: MergeInputs) -> Mixture:
    return Mixture(tuple(range(inputs.count)))


@merge_method(
    "greedy",
    help="add runs best first by validation accuracy, keeping each only if the average does not lose accuracy",
    needs=("validation",),
)
def _greedy(inputs: MergeInputs) -> Mixture:
    from .merge import greedy_select

    return Mixture(tuple(sorted(greedy_select(inputs.ranking, inputs.score))))


@merge_method("weighted", help="the mean weighted by --weights (normalised to sum to one)", needs=("weights",))
def _weighted(inputs: MergeInputs) -> Mixture:
    from .merge import normalize_weights

    return Mixture(tuple(range(inputs.count)), tuple(normalize_weights(inputs.weights, inputs.count)))


@merge_method(
    "model-stock",
    help="Model Stock (Jang et al., ECCV 2024): per tensor, the mean pulled toward the base by the mean pairwise "
    "angle of the runs' deltas (the authors' choice; mergekit averages cosines)",
    needs=("base",),
)
def _model_stock(inputs: MergeInputs) -> Mixture:
    from .merge import model_stock_streamed

    return Mixture(
        tuple(range(inputs.count)),
        anchored=lambda load, count, base: model_stock_streamed(load, count, base)[0],
        parameters=(("angle", "mean of the pairwise angles"),),
    )


@merge_method(
    "interpolate",
    help="WiSE-FT: (1 - alpha) x base + alpha x the uniform mean (--alpha; 1 is the uniform soup)",
    needs=("base", "alpha"),
)
def _interpolate(inputs: MergeInputs) -> Mixture:
    from .merge import average_streamed, interpolate

    alpha = inputs.alpha
    return Mixture(
        tuple(range(inputs.count)),
        anchored=lambda load, count, base: interpolate(base, average_streamed(load, count), alpha),
        parameters=(("alpha", alpha),),
    )
