"""Merge methods: one `@merge_method` entry each, a function of ONE tensor name that the streaming engine
(merge_engine.merge_sources) calls for every floating tensor of the model.

The function's signature declares what it needs, as mergekit's `easy_define` and PEFT's `merge_utils` do:
- `runs`: the members' tensors as a one-pass iterator, each read when the loop reaches it (memory flat in
  N); `all_runs` instead, for rules that compare the runs (sign election, pairwise angles): a re-readable
  `merge_engine.RunTensors`, iterated once per pass (the members read again, one at a time) or taken in
  `chunks` (the same slice of every member at once, CHUNK_BYTES in all): memory stays flat in N too;
- `weights`: the mixing weights, one per member, summing to one;
- `base`: the base model's tensor (the method is anchored: it needs --base; tensors the base lacks or
  shapes otherwise, such as a head for other labels, take the weighted mean instead);
- `name`: the tensor's name (DARE seeds its drop mask with it);
- keyword-only arguments with defaults: the method's typed parameters (`--alpha`, density, ...), each
  described in `parameters=` with its help and its valid range.
The function returns the merged tensor in the members' dtype. Integer buffers never reach it: the engine
copies them from the first member. Selection (greedy) is a separate step: `select` picks the members, then
the function merges them. CLI choices, config validation, the results keys (`soup_<name>`) and the card's
rows come from this table; `recycle` offers every method it can feed (validation, the base and --alpha).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .errors import RatatouilleError
from .registry import Registry

if TYPE_CHECKING:  # torch stays unimported until a merge runs: config and --help read this table
    from torch import Tensor


class RunTensors(Protocol):
    """What `all_runs` is (merge_engine.RunTensors, which runs these rules: named here without importing it)."""

    shape: tuple[int, ...]
    numel: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Tensor]: ...

    def chunks(self, itemsize: int = 8) -> Iterator[list[Tensor]]: ...


RECYCLE_PROVIDES = frozenset({"validation", "base", "alpha"})
TENSOR_ARGUMENTS = ("runs", "all_runs", "weights", "base", "name")


class MergeParameterError(RatatouilleError, ValueError):
    """A method parameter outside its range (a density of 2, a drop rate of 1)."""


@dataclass(frozen=True)
class MergeInputs:
    count: int
    ranking: Sequence[int] | None = None  # candidates best first, by their own validation accuracy
    score: Callable[[list[int]], float] | None = None  # validation accuracy of the average of a subset
    weights: Sequence[float] | None = None  # the user's, one per candidate
    alpha: float | None = None  # the user's ratio between the base (0) and the mean (1)
    parameters: Mapping[str, object] = field(default_factory=dict)  # the user's values of typed parameters


@dataclass(frozen=True)
class Parameter:
    """A typed parameter of a method: its type and default come from the function's signature."""

    name: str
    type: type
    default: object
    help: str
    valid: Callable[[object], bool]
    expected: str  # what `valid` accepts, for the error line

    def bind(self, value: object) -> object:
        value = self.default if value is None else self.type(value)
        if not self.valid(value):
            raise MergeParameterError(f"{self.name} must be {self.expected} (got {value})")
        return value


@dataclass(frozen=True)
class TensorRule:
    """A method's per-tensor function with its parameters bound: what the engine calls for each tensor."""

    function: Callable[..., Tensor]
    arguments: frozenset[str]  # which of TENSOR_ARGUMENTS the function takes
    parameters: tuple[tuple[str, object], ...] = ()

    @property
    def needs_base(self) -> bool:
        return "base" in self.arguments

    @property
    def holds_all_runs(self) -> bool:
        return "all_runs" in self.arguments

    def __call__(self, name: str, runs, weights: Sequence[float], base: Tensor | None) -> Tensor:
        given = {"runs": runs, "all_runs": runs, "weights": weights, "base": base, "name": name}
        return self.function(**{key: given[key] for key in self.arguments}, **dict(self.parameters))


@dataclass(frozen=True)
class Mixture:
    members: tuple[int, ...]
    weights: tuple[float, ...] | None = None  # None: every member weighs the same
    rule: TensorRule | None = None  # None: the weighted mean
    parameters: tuple[tuple[str, object], ...] = ()  # what the card and results record about the method

    @property
    def tensor_rule(self) -> TensorRule:
        return self.rule or MEAN

    @property
    def anchored(self) -> TensorRule | None:
        """The rule when it needs the base (then `merge_engine.merge_anchored_folders` runs it), else None."""
        return self.rule if self.rule is not None and self.rule.needs_base else None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    help: str
    needs: frozenset[str]
    function: Callable[..., Tensor]
    parameters: tuple[Parameter, ...]
    select: Callable[[MergeInputs], Sequence[int]] | None = None
    record: tuple[tuple[str, object], ...] = ()  # fixed facts the card states (Model Stock's angle)

    @property
    def in_recycle(self) -> bool:
        return self.needs <= RECYCLE_PROVIDES

    def mix(self, inputs: MergeInputs) -> Mixture:
        """The members (all, or the selection's), their weights and the rule with the user's parameters."""
        from .merge_math import normalize_weights

        members = tuple(sorted(self.select(inputs))) if self.select else tuple(range(inputs.count))
        weights = tuple(normalize_weights(inputs.weights, inputs.count)) if "weights" in self.needs else None
        given = {"alpha": inputs.alpha, **inputs.parameters}
        try:
            bound = tuple((p.name, p.bind(given.get(p.name))) for p in self.parameters)
        except (TypeError, ValueError) as error:
            raise MergeParameterError(f"{self.name}: {error}") from None
        arguments = frozenset(inspect.signature(self.function).parameters) & frozenset(TENSOR_ARGUMENTS)
        rule = None if self.function is weighted_mean else TensorRule(self.function, arguments, bound)
        return Mixture(members, weights, rule, (*bound, *self.record))


MERGE_METHODS = Registry[MergeMethod]("merge method")


def merge_method(
    name: str,
    *,
    help: str,
    needs: Sequence[str] = (),
    parameters: Mapping[str, tuple[str, Callable[[object], bool], str]] | None = None,
    select: Callable[[MergeInputs], Sequence[int]] | None = None,
    record: tuple[tuple[str, object], ...] = (),
):
    """Register `function` (a per-tensor rule, see the module's docstring) as method `name`. `needs`: what
    the method needs besides its signature (`validation` for a selection, `weights` for the user's);
    `parameters`: for each keyword-only argument, (help, valid, what valid accepts)."""

    def register(function: Callable[..., Tensor]):
        signature = inspect.signature(function)
        unknown = [
            p
            for p, spec in signature.parameters.items()
            if spec.kind != spec.KEYWORD_ONLY and p not in TENSOR_ARGUMENTS
        ]
        if unknown or not {"runs", "all_runs"} & signature.parameters.keys():
            raise TypeError(f"merge method {name}: takes {unknown or 'no runs'}; expected {TENSOR_ARGUMENTS}")
        typed = tuple(
            Parameter(p.name, type(p.default), p.default, *(parameters or {})[p.name])
            for p in signature.parameters.values()
            if p.kind == p.KEYWORD_ONLY
        )
        declared = {*needs, *(p.name for p in typed), *(["base"] if "base" in signature.parameters else [])}
        MERGE_METHODS.add(name, MergeMethod(name, help, frozenset(declared), function, typed, select, record))
        return function

    return register


def recycle_methods() -> tuple[str, ...]:
    return MERGE_METHODS.names(lambda method: method.in_recycle)


def weighted_mean(runs: Iterator[Tensor], weights: Sequence[float]) -> Tensor:
    """sum(w_i x run_i), accumulated in float32 (float64 for float64 runs) in member order, cast back."""
    from .merge_math import accumulator_for

    total = None
    for run, weight in zip(runs, weights):
        total = accumulator_for(run) if total is None else total
        total.add_(run, alpha=weight)
    return total.to(run.dtype)


def _greedy(inputs: MergeInputs) -> list[int]:
    from .merge_math import greedy_select

    return greedy_select(inputs.ranking, inputs.score)


def _fraction(low_open: bool) -> tuple[Callable[[float], bool], str]:
    return (lambda x: 0 < x <= 1, "in (0, 1]") if low_open else (lambda x: 0 <= x <= 1, "in [0, 1]")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


SCALING = ("lambda, the factor on the merged task vector (Ilharco et al.)", _finite, "a finite number")


merge_method("uniform", help="the plain mean of every run")(weighted_mean)
merge_method(
    "greedy",
    help="add runs best first by validation accuracy, keeping each only if the average does not lose accuracy",
    needs=("validation",),
    select=_greedy,
)(weighted_mean)
merge_method("weighted", help="the mean weighted by --weights (normalised to sum to one)", needs=("weights",))(
    weighted_mean
)


@merge_method(
    "model-stock",
    help="Model Stock (Jang et al., ECCV 2024): per tensor, the mean pulled toward the base by the mean pairwise "
    "angle of the runs' deltas (the authors' choice; mergekit averages cosines)",
    record=(("angle", "mean of the pairwise angles"),),
)
def _model_stock(all_runs: RunTensors, weights: Sequence[float], base: Tensor) -> Tensor:
    import torch

    from .merge_math import model_stock_ratio_from_gram, toward

    flat_base = base.reshape(-1).double()
    gram = torch.zeros((len(all_runs), len(all_runs)), dtype=torch.float64)  # the deltas' dot products
    mean, start = None, 0
    for pieces in all_runs.chunks(itemsize=8):
        stop = start + pieces[0].numel()
        deltas = torch.stack([piece.double() - flat_base[start:stop] for piece in pieces])
        gram += deltas @ deltas.T
        piece_mean = weighted_mean(iter(pieces), weights)  # elementwise: the same bytes as over whole tensors
        mean = torch.empty(all_runs.numel, dtype=piece_mean.dtype) if mean is None else mean
        mean[start:stop] = piece_mean
        start = stop
    return toward(base, mean.view(all_runs.shape), model_stock_ratio_from_gram(gram))


@merge_method(
    "interpolate",
    help="WiSE-FT: (1 - alpha) x base + alpha x the uniform mean (--alpha; 1 is the uniform soup)",
    parameters={"alpha": ("from the base (0) to the uniform mean (1)", *_fraction(low_open=False))},
)
def _interpolate(runs: Iterator[Tensor], weights: Sequence[float], base: Tensor, *, alpha: float = 0.5) -> Tensor:
    from .merge_math import toward

    return toward(base, weighted_mean(runs, weights), alpha)


@merge_method(
    "task-arithmetic",
    help="task arithmetic (Ilharco et al., ICLR 2023): base + scaling x the sum of the runs' deltas to the base",
    parameters={"scaling": SCALING},
)
def _task_arithmetic(runs: Iterator[Tensor], base: Tensor, *, scaling: float = 1.0) -> Tensor:
    import torch

    start = base.to(torch.float64 if base.dtype == torch.float64 else torch.float32)
    total = torch.zeros_like(start)
    for run in runs:
        total.add_(run).sub_(start)
        dtype = run.dtype
    return total.mul_(scaling).add_(start).to(dtype)


@merge_method(
    "ties",
    help="TIES (Yadav et al., NeurIPS 2023): each delta trimmed to its top density fraction by magnitude, a sign "
    "elected per entry by the summed deltas, the agreeing deltas averaged, base + scaling x that",
    parameters={
        "density": ("fraction of each delta's entries kept, the largest by magnitude", *_fraction(True)),
        "scaling": SCALING,
    },
)
def _ties(all_runs: RunTensors, base: Tensor, *, density: float = 0.2, scaling: float = 1.0) -> Tensor:
    """Two passes over the runs, one delta in memory at a time: the first finds each delta's threshold and
    sums the trimmed deltas (the sign election), the second averages the trimmed entries that agree."""
    import torch

    start = base.to(torch.float64 if base.dtype == torch.float64 else torch.float32).reshape(-1)
    keep = int(density * start.numel())

    def trimmed(run: Tensor, threshold: float) -> Tensor:
        delta = run.reshape(-1).to(start.dtype, copy=True).sub_(start)
        return delta.masked_fill_(delta.abs() < threshold, 0.0)

    thresholds, elected = [], torch.zeros_like(start)
    for run in all_runs:
        magnitude = run.reshape(-1).to(start.dtype, copy=True).sub_(start).abs_()
        # the keep largest magnitudes (entries tied with the last one kept stay too); none when keep is 0
        thresholds.append(torch.kthvalue(magnitude, start.numel() - keep + 1).values.item() if keep else math.inf)
        elected.add_(trimmed(run, thresholds[-1]))
        dtype = run.dtype
    elected = torch.sign(elected)
    total, agreeing = torch.zeros_like(start), torch.zeros_like(start)
    for run, threshold in zip(all_runs, thresholds):
        delta = trimmed(run, threshold)
        agree = (torch.sign(delta) == elected) & (delta != 0)
        total.add_(delta.mul_(agree))
        agreeing.add_(agree)
    merged = total.div_(agreeing.clamp_(min=1))
    return merged.view(all_runs.shape).mul_(scaling).add_(start.view(all_runs.shape)).to(dtype)


@merge_method(
    "dare",
    help="DARE (Yu et al., ICML 2024) with task arithmetic: each delta's entries dropped with probability "
    "drop_rate, the rest rescaled by 1 / (1 - drop_rate), base + scaling x their sum; the drop mask is seeded "
    "by (seed, tensor name, run) so a merge replays to the same bytes",
    parameters={
        "drop_rate": ("probability of dropping each delta entry", lambda p: 0 <= p < 1, "in [0, 1)"),
        "scaling": SCALING,
        "seed": ("the drop masks' seed", lambda s: s >= 0, "a non-negative integer"),
    },
)
def _dare(
    runs: Iterator[Tensor], base: Tensor, name: str, *, drop_rate: float = 0.9, scaling: float = 1.0, seed: int = 0
) -> Tensor:
    import torch

    from .merge_math import seeded_generator

    start = base.to(torch.float64 if base.dtype == torch.float64 else torch.float32)
    total = torch.zeros_like(start)
    for index, run in enumerate(runs):
        kept = torch.rand(start.shape, generator=seeded_generator(seed, name, index)) >= drop_rate
        delta = run.to(start.dtype, copy=True).sub_(start).mul_(kept)  # x 0, not a fill: NaN stays NaN
        total.add_(delta, alpha=1 / (1 - drop_rate))
        dtype = run.dtype
    return total.mul_(scaling).add_(start).to(dtype)


MEAN = TensorRule(weighted_mean, frozenset({"runs", "weights"}))
