"""The tensor math merge methods share (merge_methods.py's entries call it), and the errors of merging:
pure functions of tensors, no files. Apart from merge_engine.py so that the registry imports it lazily without an
import cycle (merge_engine.py runs the registry's rules)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import RatatouilleError


class MergeError(RatatouilleError, ValueError):
    """Inputs that cannot be averaged: corrupt files, models that differ, non-finite weights."""


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Mixing weights that sum to one; None means the uniform soup."""
    if n < 1:
        raise MergeError("nothing to merge: need at least one input")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} inputs")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise MergeError(f"weights must be finite and non-negative (weight {index} is {weight})")
    total = sum(weights)
    if total == 0:
        raise MergeError("weights sum to zero")
    if not math.isfinite(total):
        raise MergeError(f"--weights sum past the largest float ({weights}): give them on a smaller scale")
    return [w / total for w in weights]


def accumulator_for(first: Tensor) -> Tensor:
    """Zeros in the accumulator dtype of a floating tensor: float32, or float64 for float64 tensors."""
    if first.is_complex():
        raise MergeError("complex tensors are not supported")
    return torch.zeros(first.shape, dtype=_accumulator_dtype(first.dtype), device=first.device)


def greedy_select(candidates: Sequence[int], score: Callable[[list[int]], float]) -> list[int]:
    """Greedy soup: walk the best-first candidates, keep each one whose addition does not lower the score."""
    if not candidates:
        raise ValueError("greedy selection needs at least one candidate")
    selected = [candidates[0]]
    best = score(selected)
    for candidate in candidates[1:]:
        trial = score(selected + [candidate])
        if trial >= best:
            selected.append(candidate)
            best = trial
    return selected


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def model_stock_ratio(cosine: float, k: int) -> float:
    """Model Stock's weight of the fine-tunes' mean against the base, t = k cos / (1 + (k - 1) cos)."""
    return k * cosine / (1 + (k - 1) * cosine)


def model_stock_ratio_of(all_runs: Sequence[Tensor], base: Tensor) -> float:
    """Model Stock's t for one tensor from the runs in memory (the engine accumulates the same Gram matrix
    chunk by chunk: `model_stock_ratio_from_gram`)."""
    deltas = torch.stack([run.double().flatten() - base.double().flatten() for run in all_runs])
    return model_stock_ratio_from_gram(deltas @ deltas.T)


def model_stock_ratio_from_gram(gram: Tensor) -> float:
    """Model Stock's t from the Gram matrix of the deltas w_i - w_0 (float64), by the mean of the pairwise
    angles, as the authors do for more than two models (mergekit averages the pairwise cosines instead).
    Pairs whose delta is zero have no angle and are left out; no angle at all (one input, no delta) gives
    t = 1, the mean. A mean angle past 90 degrees (cos < 0) would give t < 0, and t -> infinity as
    cos -> -1/(k - 1): the formula assumes fine-tunes of one base whose deltas agree more than they oppose,
    so cos is kept >= 0 (the base)."""
    count = len(gram)
    norms = gram.diagonal().sqrt()
    pairs = torch.triu(torch.ones_like(gram, dtype=torch.bool), diagonal=1) & (norms[:, None] > 0) & (norms > 0)
    if not pairs.any():
        return 1.0
    cosines = (gram / (norms[:, None] * norms[None, :]))[pairs].clamp(-1.0, 1.0)
    mean_angle = torch.acos(cosines).mean().item()
    return model_stock_ratio(max(0.0, math.cos(mean_angle)), count)


def toward(anchor: Tensor, target: Tensor, ratio: float) -> Tensor:
    """anchor + ratio * (target - anchor), in the accumulator dtype, cast back to the target's dtype; ratio 1
    is the target itself, bit for bit (WiSE-FT's interpolation, Model Stock's pull toward the base)."""
    if ratio == 1.0:
        return target
    dtype = _accumulator_dtype(target.dtype)
    start = anchor.to(dtype)
    moved = target.to(dtype, copy=True).sub_(start).mul_(ratio).add_(start)  # in place: one temporary
    return moved.to(target.dtype)


def seeded_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A generator seeded by (seed, tensor name, member index): a random rule (DARE's drop mask) gives the
    same bytes on every replay and in any tensor order."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
