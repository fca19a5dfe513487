"""Diagnose: METHOD.md's three criteria for weight averaging, measured on a set of runs.

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

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def ratio_error(predictions_a: torch.Tensor, predictions_b: torch.Tensor, labels: torch.Tensor) -> float:
    """Errors made by exactly one model divided by errors made by both (higher: more diverse).

    Infinite when the models never err together on a sample both get wrong.
    """
    wrong_a, wrong_b = predictions_a != labels, predictions_b != labels
    different = int((wrong_a ^ wrong_b).sum())
    simultaneous = int((wrong_a & wrong_b).sum())
    return different / simultaneous if simultaneous else float("inf")


def barrier(accuracies: Sequence[float], alphas: Sequence[float] = ALPHAS) -> float:
    """Largest drop of accuracy along the path below the straight line between its endpoints (>= 0)."""
    start, end = accuracies[0], accuracies[-1]
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
    from .evaluation import predict_logits
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
    model = load_classifier(ingredients[0].path, target.id2label)  # its own tensors: loading a state into it
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
    lines.append("pairs:  ratio-error (diversity)  barrier (averageability)  accuracy along the path " + str(ALPHAS))
    for pair in diagnosis.pairs:
        path = " ".join(f"{100 * a:5.1f}" for a in pair.path_accuracies)
        lines.append(f"  [{pair.a}]-[{pair.b}]  {pair.ratio_error:8.2f}  {100 * pair.barrier:8.1f} pts   {path}")
    return "\n".join(lines)


def plot_paths(diagnosis: Diagnosis, path: Path, size: tuple[int, int] = (820, 480)) -> None:
    """A PNG of accuracy along each pair's interpolation path, readable without the text: each line is named
    by its two models, the axes say what they measure (Pillow only: no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 20, 56, 60
    legend_height = 14 * len(diagnosis.pairs) + 10
    image = Image.new("RGB", (width, height + legend_height), "white")
    draw = ImageDraw.Draw(image)
    values = [a for p in diagnosis.pairs for a in p.path_accuracies] or [0.0, 1.0]
    low, high = max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05)
    high = high if high > low else low + 0.1

    def xy(alpha: float, accuracy: float) -> tuple[float, float]:
        return (left + alpha * (width - left - right), top + (high - accuracy) / (high - low) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for alpha in ALPHAS:
        x, _ = xy(alpha, low)
        draw.text((x - 10, height - bottom + 8), f"{alpha:.2f}", fill="black")
    for k in range(5):
        accuracy = low + (high - low) * k / 4
        _, y = xy(0, accuracy)
        draw.text((8, y - 6), f"{100 * accuracy:.0f}%", fill="black")
    draw.text(
        (left, 8), "Averaging two runs: accuracy of (1 - t) x A + t x B on training-domain validation", fill="black"
    )
    draw.text((8, top - 30), "validation accuracy", fill="black")
    draw.text(
        (left, height - 30),
        "t: weight path from run A (t = 0) to run B (t = 1); a dip in the middle is a barrier",
        fill="black",
    )
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    names = diagnosis.names
    for index, pair in enumerate(diagnosis.pairs):
        points = [xy(alpha, acc) for alpha, acc in zip(ALPHAS, pair.path_accuracies)]
        colour = palette[index % len(palette)]
        draw.line(points, fill=colour, width=2)
        label = f"A = {names[pair.a]}   B = {names[pair.b]}   barrier {100 * pair.barrier:.1f} points"
        draw.text((left, height + 4 + 14 * index), label, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def plot_scores(points: Sequence[tuple[str, str, float, float, str]], test_domain: str, path: Path) -> None:
    """A PNG of each model's training-domain validation accuracy (x) against its held-out accuracy (y):
    `points` are (tag, name, validation, held-out, kind), kind `run`, `soup` or `ensemble`; the tag marks the
    point, the legend gives its name. Above-right of the runs is where a soup should land; the ensemble is
    the reference it approximates (Pillow only)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 520, 70, 340, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[2] for p in points], [p[3] for p in points]
    x_low, x_high = min(xs) - 0.02, max(xs) + 0.02
    y_low, y_high = min(ys) - 0.02, max(ys) + 0.02

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * (width - left - right),
            top + (y_high - y) / (y_high - y_low) * (height - top - bottom),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        x, y = x_low + (x_high - x_low) * k / 4, y_low + (y_high - y_low) * k / 4
        draw.text((xy(x, y_low)[0] - 12, height - bottom + 8), f"{100 * x:.1f}%", fill="black")
        draw.text((8, xy(x_low, y)[1] - 6), f"{100 * y:.1f}%", fill="black")
    draw.text((left, 8), f"Each model: training-domain validation (x) against held-out {test_domain} (y)", fill="black")
    draw.text((left, height - 28), "training-domain validation accuracy (what model selection sees)", fill="black")
    draw.text((8, top - 16), f"{test_domain} accuracy", fill="black")
    colours = {"run": "#1f77b4", "soup": "#d62728", "ensemble": "#2ca02c"}
    draw.text((width - right + 10, top - 16), "validation / held-out, %", fill="black")
    for index, (tag, name, x, y, kind) in enumerate(points):
        cx, cy = xy(x, y)
        radius = 4 if kind == "run" else 6
        shape = draw.ellipse if kind != "ensemble" else draw.rectangle
        shape([cx - radius, cy - radius, cx + radius, cy + radius], fill=colours[kind])
        draw.text((cx + 8, cy - 6), tag, fill=colours[kind])
        line = f"{tag}: {name}"[:44] + f"  {100 * x:.1f} / {100 * y:.1f}"
        draw.text((width - right + 10, top + 14 * index), line, fill=colours[kind])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
