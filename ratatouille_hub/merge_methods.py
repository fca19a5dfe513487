"""Merge methods: which checkpoints go into the average, and with which weights.

One `@merge_method` entry per method. An entry declares what it needs: `validation` (it ranks or selects on
the target's training-domain validation), `weights` (given by the user). `recycle` offers every method it
can feed (it has validation, not user weights); `merge` offers them all. CLI choices, config validation,
the results keys (`soup_<name>`) and the card's rows come from this table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .registry import Registry

RECYCLE_PROVIDES = frozenset({"validation"})


@dataclass(frozen=True)
class MergeInputs:
    count: int
    ranking: Sequence[int] | None = None  # candidates best first, by their own validation accuracy
    score: Callable[[list[int]], float] | None = None  # validation accuracy of the average of a subset
    weights: Sequence[float] | None = None  # the user's, one per candidate


@dataclass(frozen=True)
class Mixture:
    members: tuple[int, ...]
    weights: tuple[float, ...] | None = None  # None: the uniform mean of the members


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
