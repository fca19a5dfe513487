"""Diagnose: docs/method.md's three criteria for weight averaging, measured on a set of runs.

1. individual accuracy; 2. diversity: ratio of different errors to simultaneous errors of two
models (Aksela, 2003; used by DiWA); 3. averageability: accuracy along the straight line between two
models' weights, and the barrier, how far it dips below the line joining the endpoints.
All measured on training-domain validation, never the test domain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from .merge_engine import average_state_dicts

PATH_POINTS = 11  # each pair costs PATH_POINTS - 2 evaluations (the ends are the models' own); a dip shows


def evenly_spaced(count: int) -> tuple[float, ...]:
    """`count` points from 0 to 1, both included: where a path of `count` accuracies was measured (so a
    record of accuracies alone, results.json's, says where each was taken)."""
    return tuple(k / (count - 1) for k in range(count))


ALPHAS = evenly_spaced(PATH_POINTS)


def ratio_error(predictions_a: torch.Tensor, predictions_b: torch.Tensor, labels: torch.Tensor) -> float:
    """Errors made by exactly one model divided by errors made by both (higher: more diverse).

    Infinite when the models never err together on a sample both get wrong.
    """
    return error_ratio(predictions_a != labels, predictions_b != labels)


def error_ratio(wrong_a: torch.Tensor, wrong_b: torch.Tensor) -> float:
    """`ratio_error` from which images each model gets wrong (bool masks)."""
    different = int((wrong_a ^ wrong_b).sum())
    simultaneous = int((wrong_a & wrong_b).sum())
    return different / simultaneous if simultaneous else float("inf")


def barrier(accuracies: Sequence[float]) -> float:
    """Largest drop of accuracy along the path below the straight line between its endpoints (>= 0); the
    accuracies are taken at evenly spaced points from 0 to 1."""
    start, end = accuracies[0], accuracies[-1]
    alphas = evenly_spaced(len(accuracies))
    return max(0.0, *((1 - a) * start + a * end - acc for a, acc in zip(alphas, accuracies)))


def interpolate(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], alpha: float) -> dict:
    """(1 - alpha) * a + alpha * b, tensor by tensor; integer buffers kept from `a`."""
    return average_state_dicts([state_a, state_b], weights=[1 - alpha, alpha])


@dataclass(frozen=True)
class PairDiagnosis:
    """Models `a` and `b` (indices into the names): diversity, and accuracy along the weight path between them."""

    a: int
    b: int
    ratio_error: float  # infinite when they never err on the same image
    path_accuracies: tuple[float, ...]  # at each of the diagnosis's alphas
    barrier: float = field(init=False)  # a field, not a property: the JSON record carries it

    def __post_init__(self) -> None:
        object.__setattr__(self, "barrier", barrier(self.path_accuracies))

    @property
    def alphas(self) -> tuple[float, ...]:
        return evenly_spaced(len(self.path_accuracies))


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` returns and `--format json` prints: every model's accuracy and every pair measured."""

    names: tuple[str, ...]
    accuracies: tuple[float, ...]
    pairs: tuple[PairDiagnosis, ...]
    alphas: tuple[float, ...] = ALPHAS  # where each path was measured, from model a (0) to model b (1)


def diagnose_states(
    names: Sequence[str],
    states: Sequence[Mapping[str, torch.Tensor]],
    predict: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    labels: torch.Tensor,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> Diagnosis:
    """All three criteria; `predict(state)` returns class ids on the validation images. `pairs`
    defaults to every pair (three evaluations each)."""
    return diagnose_loaded(names, states.__getitem__, predict, labels, pairs)


def diagnose_loaded(
    names: Sequence[str],
    load: Callable[[int], Mapping[str, torch.Tensor]],
    predict: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    labels: torch.Tensor,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> Diagnosis:
    """`diagnose_states` with state `i` loaded by `load(i)` when needed and dropped after use, so memory holds
    the pair being measured (and whatever `load` keeps), not every state."""
    predictions = [predict(load(index)) for index in range(len(names))]
    accuracies = tuple(float((p == labels).float().mean()) for p in predictions)
    diagnosed = []
    for i, j in pairs if pairs is not None else combinations(range(len(names)), 2):
        path = _path_accuracies(accuracies[i], accuracies[j], load(i), load(j), predict, labels)
        diagnosed.append(PairDiagnosis(i, j, ratio_error(predictions[i], predictions[j], labels), path))
    return Diagnosis(tuple(names), accuracies, tuple(diagnosed))


def _path_accuracies(start: float, end: float, state_a, state_b, predict, labels) -> tuple[float, ...]:
    """Accuracy at each of ALPHAS between two states whose endpoint accuracies are known."""
    return tuple(
        start
        if alpha == 0
        else end
        if alpha == 1
        else float((predict(interpolate(state_a, state_b, alpha)) == labels).float().mean())
        for alpha in ALPHAS
    )


def diagnose_models(models: Sequence[str], config, token=None) -> Diagnosis:
    """Diagnose checkpoints (folders or Hub ids) that classify the target's labels.

    The target is prepared exactly as `recycle` prepares it (same split from `config.seed`), and only
    its training-domain validation images are used.
    """
    from .errors import InputError
    from .evaluation import predict_logits, scoring_device
    from .fetch import resolve_model
    from .models import load_classifier
    from .provenance import declared_run, run_name
    from .target import prepare_target

    if len(models) < 2:
        raise InputError("diagnose needs at least two models")
    ingredients = [resolve_model(model, token=token) for model in models]
    names = [ingredient.reference for ingredient in ingredients]
    runs = [declared_run(ingredient.path) for ingredient in ingredients]
    if all(runs) and len({run[0] for run in runs}) == 1 and len({run[1] for run in runs}) == len(runs):
        order = sorted(range(len(runs)), key=lambda i: runs[i][1])  # runs of one recipe: in its plan's order
        ingredients = [ingredients[i] for i in order]
        names = [run_name(runs[i][1], runs[i][2]) for i in order]
    target = prepare_target(config, ingredients[0], token)
    expected = list(target.id2label.values())
    states = []
    for ingredient in ingredients:
        saved = _label_names(ingredient.path)
        if saved != expected:
            raise InputError(
                f"{ingredient.source} classifies {saved[:4]}..., not the target's labels {expected[:4]}..."
            )
        states.append(load_classifier(ingredient.path, target.id2label).state_dict())
    model = load_classifier(ingredients[0].path, target.id2label).to(scoring_device())  # its own tensors
    validation = target.data.pooled_val  # must never write into one of `states`

    def predict(state) -> torch.Tensor:
        model.load_state_dict(state)
        return predict_logits(model, validation, target.data.normalize).argmax(dim=1)

    return diagnose_states(names, states, predict, validation.labels)


def _label_names(folder: Path) -> list[str]:
    """The class names a saved checkpoint predicts (`id2label`, or `label_names` for timm-wrapped models)."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    if "label_names" in config:
        return list(config["label_names"])
    id2label = config.get("id2label", {})
    return [id2label[key] for key in sorted(id2label, key=int)]


def format_diagnosis(diagnosis: Diagnosis) -> str:
    lines = ["model accuracies (training-domain validation):"]
    lines += [
        f"  [{i}] {100 * acc:5.1f}%  {name}" for i, (name, acc) in enumerate(zip(diagnosis.names, diagnosis.accuracies))
    ]
    lines.append(
        "pairs:  ratio-error (diversity)  barrier (averageability)  accuracy along the path at t = "
        + ", ".join(f"{alpha:g}" for alpha in ALPHAS)
    )
    for pair in diagnosis.pairs:
        path = " ".join(f"{100 * a:5.1f}" for a in pair.path_accuracies)
        lines.append(f"  [{pair.a}]-[{pair.b}]  {pair.ratio_error:8.2f}  {100 * pair.barrier:8.1f} pts   {path}")
    return "\n".join(lines)
