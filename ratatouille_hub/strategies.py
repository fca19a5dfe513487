"""Strategies: where each run of a recipe starts, and whether the result is an average or the best run.

One `@strategy` entry per strategy of docs/method.md. An entry returns each run's init (the base, a recycled
fine-tune, or a fusion of several) from the plan's context alone: no training, no weight is read, so a
plan lists its runs before anything runs. CLI choices, config validation and card wording come from here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .fetch import Ingredient
from .hashing import check_content_key, stable_hash, stable_int
from .registry import Registry


@dataclass(frozen=True)
class FusionSpec:
    """A run's init made by mixing checkpoints (the base first) with convex weights; built when executed."""

    members: tuple[Ingredient, ...]
    weights: tuple[float, ...]
    head_seed: int  # the members' re-initialised heads (replaced by the shared probe head anyway)
    key: str

    def __post_init__(self) -> None:
        check_content_key(self.key)

    @property
    def source(self) -> str:
        return f"fusion:{self.key}"

    @property
    def revision(self) -> str:
        return f"fused:{self.key}"

    @property
    def reference(self) -> str:
        return f"{self.source}@{self.revision}"


Init = Ingredient | FusionSpec


@dataclass(frozen=True)
class InitContext:
    """What a strategy may look at: the recipe's size and seed, the base, the vetted recycled fine-tunes."""

    runs: int
    seed: int
    base: Ingredient
    recycled: tuple[Ingredient, ...]
    datasets_of: Callable[[Ingredient], str]  # the auxiliary dataset a recycled fine-tune was trained on
    id2label: dict[int, str]


@dataclass(frozen=True)
class Strategy:
    name: str
    help: str
    averages: bool  # the result is the runs' weight average; otherwise the best run by validation
    recycles: bool  # its runs start from recycled fine-tunes (given by --aux or discovered)
    needs_recycled: bool  # refuses to run without any
    card_sentence: str  # how its runs start, in the card's words
    card_title: str  # how the card names a non-averaged result
    inits: Callable[[InitContext], list[Init]]


STRATEGIES = Registry[Strategy]("strategy")


def strategy(
    name: str,
    *,
    help: str,
    averages: bool,
    card_sentence: str,
    card_title: str = "",
    recycles: bool = False,
    needs_recycled: bool = False,
):
    def register(inits: Callable[[InitContext], list[Init]]):
        STRATEGIES.add(name, Strategy(name, help, averages, recycles, needs_recycled, card_sentence, card_title, inits))
        return inits

    return register


@strategy(
    "ratatouille",
    help="run 0 from the base, runs 1..len(aux) from one recycled fine-tune each, the rest from the base, "
    "averaged (docs/method.md: 4 + 16)",
    averages=True,
    recycles=True,
    card_sentence="one run from each recycled fine-tune of the base, the others from the base itself",
)
def _ratatouille(context: InitContext) -> list[Init]:
    recycled = context.recycled
    return [recycled[index - 1] if 1 <= index <= len(recycled) else context.base for index in range(context.runs)]


@strategy(
    "soup",
    help="every run from the base, averaged (model soups)",
    averages=True,
    card_sentence="all starting from the base",
)
def _soup(context: InitContext) -> list[Init]:
    return [context.base] * context.runs


@strategy(
    "erm",
    help="every run from the base, the best run by validation kept (ERM with LP init)",
    averages=False,
    card_sentence="all starting from the base",
    card_title="An **ERM**",
)
def _erm(context: InitContext) -> list[Init]:
    return [context.base] * context.runs


@strategy(
    "fusing",
    help="each run from a random convex combination of the base and one recycled fine-tune per auxiliary "
    "dataset, the best run kept",
    averages=False,
    recycles=True,
    needs_recycled=True,
    card_sentence="each starting from a random convex combination of the base and one recycled fine-tune "
    "per auxiliary dataset",
    card_title="A **Fusing**",
)
def _fusing(context: InitContext) -> list[Init]:
    groups = _by_dataset(context.recycled, context.datasets_of)
    return [_fusion(context, index, groups) for index in range(context.runs)]


def _by_dataset(recycled: Sequence[Ingredient], datasets_of) -> list[list[Ingredient]]:
    """Recycled fine-tunes grouped by the dataset their card names, groups in sorted order."""
    groups: dict[str, list[Ingredient]] = {}
    for ingredient in recycled:
        groups.setdefault(datasets_of(ingredient), []).append(ingredient)
    return [groups[name] for name in sorted(groups)]


def _fusion(context: InitContext, index: int, groups: list[list[Ingredient]]) -> FusionSpec:
    """The base and one fine-tune per auxiliary dataset, mixed with weights exp(4U) / sum (docs/method.md),
    drawn from the run's own seed."""
    rng = random.Random(stable_int(f"{context.seed}:{index}:fusing"))
    members = [context.base] + [group[rng.randrange(len(group))] for group in groups]
    raw = [math.exp(4 * rng.random()) for _ in members]
    weights = [w / sum(raw) for w in raw]
    key = stable_hash({"members": [m.revision for m in members], "weights": weights, "labels": context.id2label})
    return FusionSpec(tuple(members), tuple(weights), stable_int(f"{context.seed}:{index}:fusing-heads"), key)
