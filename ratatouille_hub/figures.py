"""The figures a reader looks at instead of the numbers: `diagnose --plot` and a soup's diagnostics.png (the
weight paths between runs, their barriers, diversity, each model's own accuracy), and a soup's accuracies.png
(each model's validation against held-out accuracy).

Drawn with matplotlib's object API on its Agg canvas: no pyplot state, no display, safe in any process.
Names come from datasets and Hub repos, so they are escaped (terminal_safe) and never parsed as mathtext.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import cycle
from pathlib import Path
from typing import NamedTuple

from .diagnostics import Diagnosis, PairDiagnosis
from .safe_text import terminal_safe

DPI = 100
PATHS_WIDTH_PX, PATHS_HEIGHT_PX = 1200, 640  # taller with many models (PATHS_PX_PER_MODEL), plus the legend
PATHS_PX_PER_MODEL = 47  # a readable bar for each model's accuracy
SCORES_WIDTH_PX, SCORES_HEIGHT_PX = 1200, 640
LEGEND_ROW_PX = 18
LONGEST_NAME = 60  # characters of a model's name a legend shows; longer ones keep their start and end
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
MARKER_RADIUS_PX = 9  # of the largest marker a label is placed beside (12 pt)
LABEL_GID = "point-label"  # the gid of every label placed next to a point (the tests find them by it)
LABEL_FONT_SIZE = 8.5
LEADER_LINE = {"arrowstyle": "-", "color": "#777777", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 5}
COLOURS = {"run": "#1f77b4", "soup": "#d62728", "ensemble": "#2ca02c"}
SHAPES = {"run": "o", "soup": "D", "ensemble": "*"}
TEXT_AS_WRITTEN = {"text.parse_math": False, "text.usetex": False}  # a `$` in a repo name is not math


class ScorePoint(NamedTuple):
    """One model of accuracies.png: `tag` marks its point, `name` says what it is in the legend."""

    tag: str
    name: str
    validation: float
    held_out: float
    kind: str  # "run", "soup" or "ensemble"


def shown_name(name: str) -> str:
    """`name` as a figure shows it: escaped, and at most LONGEST_NAME characters (start and end kept)."""
    name = terminal_safe(name)
    if len(name) <= LONGEST_NAME:
        return name
    head = LONGEST_NAME // 2
    return name[:head] + "…" + name[-(LONGEST_NAME - head - 1) :]


def pair_label(diagnosis: Diagnosis, pair: PairDiagnosis) -> str:
    """The legend entry of one pair: both models by name, its barrier and its ratio-error."""
    names = diagnosis.names
    return (
        f"{shown_name(names[pair.a])} → {shown_name(names[pair.b])}: barrier {100 * pair.barrier:.1f} pts, "
        f"ratio-error {pair.ratio_error:.2f}"
    )


def pair_tag(pair: PairDiagnosis) -> str:
    return f"{pair.a}–{pair.b}"


def draw_paths(diagnosis: Diagnosis):
    """The diagnose figure: accuracy along each pair's weight path with the straight line between its ends
    (the barrier is the gap), each model's own accuracy, and each pair's diversity against its barrier; every
    number is the diagnosis's. PATHS_WIDTH_PX wide, max(PATHS_HEIGHT_PX, 160 + PATHS_PX_PER_MODEL per model)
    + LEGEND_ROW_PX per legend row tall."""
    import matplotlib

    with matplotlib.rc_context({**TEXT_AS_WRITTEN, "font.size": 9}):
        labels = [pair_label(diagnosis, pair) for pair in diagnosis.pairs]
        columns = 2 if max(map(len, labels), default=0) <= 95 else 1
        rows = -(-len(labels) // columns)
        panels = max(PATHS_HEIGHT_PX, 160 + PATHS_PX_PER_MODEL * len(diagnosis.names))
        figure = _figure(PATHS_WIDTH_PX, panels + LEGEND_ROW_PX * rows)
        axes = figure.subplot_mosaic(
            [["paths", "accuracy"], ["paths", "diversity"]], width_ratios=[1.8, 1], height_ratios=[1, 1.3]
        )
        figure.suptitle(
            "Can these models be averaged? Accuracy on training-domain validation (the held-out domain is never used)",
            fontsize=11,
            fontweight="bold",
        )
        styles = _pair_styles(len(diagnosis.pairs))
        _draw_paths_panel(axes["paths"], diagnosis, styles, labels)
        _draw_accuracy_panel(axes["accuracy"], diagnosis)
        _draw_diversity_panel(axes["diversity"], diagnosis, styles)
        figure.legend(loc="outside lower center", ncols=columns, frameon=False, fontsize=8.5)
        _freeze_layout(figure)
        _label_points(
            axes["diversity"],
            [(_finite_ratio(diagnosis, p), 100 * p.barrier, pair_tag(p)) for p in diagnosis.pairs],
        )
    return figure


def _pair_styles(count: int) -> list[dict]:
    """A colour and a hollow marker per pair: pairs with the same path stay visible as overlaid shapes."""
    from matplotlib import colormaps

    colours = colormaps["tab10" if count <= 10 else "tab20"].colors
    return [
        {"color": colour, "marker": marker} for colour, marker, _ in zip(cycle(colours), cycle(MARKERS), range(count))
    ]


def _draw_paths_panel(ax, diagnosis: Diagnosis, styles: list[dict], labels: list[str]) -> None:
    from matplotlib.ticker import PercentFormatter

    for pair, style, label in zip(diagnosis.pairs, styles, labels):
        alphas, accuracies = pair.alphas, [100 * a for a in pair.path_accuracies]
        ax.plot(
            alphas,
            accuracies,
            label=label,
            color=style["color"],
            marker=style["marker"],
            markersize=6,
            markerfacecolor="none",
            linewidth=1.6,
            gid="path",
        )
        ax.plot(
            [0, 1],
            [accuracies[0], accuracies[-1]],
            color=style["color"],
            linestyle="--",
            linewidth=0.9,
            alpha=0.7,
            gid="chord",
        )
        if pair.barrier > 0:  # the barrier itself: the gap between the chord and the path where it is widest
            at = max(range(len(alphas)), key=lambda k: _below_chord(pair, k))
            chord = accuracies[at] + 100 * _below_chord(pair, at)
            ax.plot(
                [alphas[at]] * 2,
                [accuracies[at], chord],
                color=style["color"],
                linewidth=4,
                alpha=0.35,
                solid_capstyle="butt",
                gid="barrier",
            )
    ax.set_title("Barrier: how far accuracy dips below the dashed line joining a path's ends")
    ax.set_xlabel("t, the weight path (1 − t) × first model + t × second model (0 = first, 1 = second)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_xticks(diagnosis.pairs[0].alphas if diagnosis.pairs else [0, 1])
    ax.set_xlim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.grid(alpha=0.3)


def _below_chord(pair: PairDiagnosis, k: int) -> float:
    start, end = pair.path_accuracies[0], pair.path_accuracies[-1]
    alpha = pair.alphas[k]
    return (1 - alpha) * start + alpha * end - pair.path_accuracies[k]


def _draw_accuracy_panel(ax, diagnosis: Diagnosis) -> None:
    names = [f"[{i}] {shown_name(name)}" for i, name in enumerate(diagnosis.names)]
    accuracies = [100 * a for a in diagnosis.accuracies]
    bars = ax.barh(range(len(names)), accuracies, color="#8c8c8c", gid="accuracy")
    ax.bar_label(bars, labels=[f"{a:.1f}%" for a in accuracies], padding=3, fontsize=8)
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.invert_yaxis()  # model 0 on top, as the text lists them
    low = min(accuracies)
    ax.set_xlim(max(0.0, low - 10), min(100.0, max(accuracies) + 6))
    ax.set_title("Individual accuracy of each model")
    ax.set_xlabel("validation accuracy (%)")


def _finite_ratio(diagnosis: Diagnosis, pair: PairDiagnosis) -> float:
    """Where a pair's ratio-error is drawn: its value, or past every finite one when it is infinite (no
    error in common), at the tick marked ∞."""
    return pair.ratio_error if pair.ratio_error != float("inf") else _infinity_position(diagnosis)


def _infinity_position(diagnosis: Diagnosis) -> float:
    finite = [p.ratio_error for p in diagnosis.pairs if p.ratio_error != float("inf")]
    return 1.25 * max([*finite, 0.8])  # an axis to 1 at least, even when every pair errs alike (all 0)


def _draw_diversity_panel(ax, diagnosis: Diagnosis, styles: list[dict]) -> None:
    for pair, style in zip(diagnosis.pairs, styles):
        ax.plot(
            [_finite_ratio(diagnosis, pair)],
            [100 * pair.barrier],
            linestyle="none",
            markersize=8,
            markerfacecolor="none",
            markeredgewidth=1.6,
            gid="pair",
            **style,
        )
    right = _infinity_position(diagnosis)
    ax.set_xlim(0, 1.12 * right)
    ax.set_ylim(-0.1 * _top(diagnosis), _top(diagnosis))
    if any(p.ratio_error == float("inf") for p in diagnosis.pairs):
        ticks = [t for t in ax.get_xticks() if 0 <= t < 0.85 * right]
        ax.set_xticks([*ticks, right], labels=[f"{t:g}" for t in ticks] + ["∞"])
    ax.set_title("Diversity against barrier\n(pairs worth averaging sit low and right)")
    ax.set_xlabel("ratio-error (diversity):\nerrors of one model only / errors of both")
    ax.set_ylabel("barrier (accuracy points)")
    ax.grid(alpha=0.3)


def _top(diagnosis: Diagnosis) -> float:
    return max(1.0, 1.3 * max((100 * p.barrier for p in diagnosis.pairs), default=0.0))


def draw_scores(points: Sequence[ScorePoint], test_domain: str):
    """accuracies.png, SCORES_WIDTH_PX x SCORES_HEIGHT_PX: each model's training-domain validation (x) against
    its held-out accuracy (y), runs by index, soups by method, the ensemble as the reference a soup
    approximates; the legend names each tag and repeats its two numbers."""
    import matplotlib

    domain = shown_name(test_domain)
    with matplotlib.rc_context({**TEXT_AS_WRITTEN, "font.size": 9}):
        figure = _figure(SCORES_WIDTH_PX, SCORES_HEIGHT_PX)
        ax = figure.add_subplot()
        for point in points:
            ax.plot(
                [100 * point.validation],
                [100 * point.held_out],
                linestyle="none",
                gid=point.kind,
                marker=SHAPES[point.kind],
                color=COLOURS[point.kind],
                markersize=9 if point.kind == "run" else 12,
                label=f"{terminal_safe(point.tag)}: {shown_name(point.name)}  "
                f"{100 * point.validation:.1f}% / {100 * point.held_out:.1f}%",
            )
        ax.set_title(
            f"Individual accuracies on the held-out {domain}:\na soup that works lands above its runs",
            fontsize=11,
            fontweight="bold",
        )
        ax.set_xlabel("training-domain validation accuracy (%): the only axis model selection sees")
        ax.set_ylabel(f"held-out {domain} accuracy (%)")
        ax.margins(0.12)
        ax.grid(alpha=0.3)
        figure.legend(
            loc="outside right upper",
            title="validation / held-out",
            ncols=1 if len(points) <= 30 else 2,
            fontsize=8.5,
            frameon=False,
        )
        _freeze_layout(figure)
        _label_points(ax, [(100 * p.validation, 100 * p.held_out, terminal_safe(p.tag)) for p in points])
    return figure


def _figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _freeze_layout(figure) -> None:
    """Lay the figure out once and keep it: labels are then placed against the final axes, and saving does
    not move anything they were checked against. Laid out without rasterising: the pixels are drawn once, by
    the save (the same PNG bytes, a third less time)."""
    figure.draw_without_rendering()
    figure.set_layout_engine("none")


def _label_points(ax, points: Sequence[tuple[float, float, str]]) -> None:
    """Tag each point once, points that coincide on screen under one label ("0, 3"), each label at the
    nearest place inside the axes where it covers no other label and no point, joined to its point by a
    leader line when that place is not beside it.

    Hand-written: matplotlib places no labels, and adjustText's repulsion does not guarantee what the
    figure promises (no label over another)."""
    renderer = ax.figure.canvas.get_renderer()
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for x, y, tag in points:
        sx, sy = (float(v) for v in ax.transData.transform((x, y)))
        for (gx, gy), tags in groups:
            if abs(gx - sx) <= 6 and abs(gy - sy) <= 6:  # the markers cover each other: one label
                if tag not in tags:
                    tags.append(tag)
                break
        else:
            groups.append(((sx, sy), [tag]))
    r = MARKER_RADIUS_PX
    taken = [(x - r, y - r, x + r, y + r) for (x, y), _ in groups]
    area = ax.get_window_extent(renderer)
    for (x, y), tags in groups:
        text = ", ".join(tags)
        probe = ax.text(0, 0, text, fontsize=LABEL_FONT_SIZE)
        size = probe.get_window_extent(renderer)
        probe.remove()
        for dx, dy in _candidate_offsets(area, x, y):
            box = _label_box(x + dx, y + dy, size.width, size.height, dx, dy)
            inside = area.x0 <= box[0] and box[2] <= area.x1 and area.y0 <= box[1] and box[3] <= area.y1
            if inside and not any(_overlap(box, other) for other in taken):
                break
        else:
            continue  # nowhere free: the legend still names the point
        ax.annotate(
            text,
            ax.transData.inverted().transform((x, y)),
            xytext=(dx, dy),
            textcoords="offset pixels",
            ha=_align(dx, "left", "right"),
            va=_align(dy, "bottom", "top"),
            fontsize=LABEL_FONT_SIZE,
            gid=LABEL_GID,
            arrowprops=None if dx * dx + dy * dy <= (r + 4) ** 2 else LEADER_LINE,
        )
        taken.append(box)


def _align(offset: float, after: str, before: str) -> str:
    return after if offset > 0.5 else before if offset < -0.5 else "center"


def _label_box(x: float, y: float, width: float, height: float, dx: float, dy: float) -> tuple:
    """The screen box (x0, y0, x1, y1) of a label anchored at (x, y) and aligned away from its point, with
    2 px to spare on each side."""
    x0 = x if dx > 0.5 else x - width if dx < -0.5 else x - width / 2
    y0 = y if dy > 0.5 else y - height if dy < -0.5 else y - height / 2
    return (x0 - 2, y0 - 2, x0 + width + 2, y0 + height + 2)


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _candidate_offsets(area, x: float, y: float):
    """Offsets (pixels) to try for a label, nearest first: beside the point in 16 directions, then every
    place of a 12-px grid over the axes (with a leader line), so a free place is found if there is one."""
    from math import cos, pi, sin

    directions = [(cos(k * pi / 8), sin(k * pi / 8)) for k in (0, 4, 8, 12, 2, 6, 10, 14, 1, 3, 5, 7, 9, 11, 13, 15)]
    for distance in (MARKER_RADIUS_PX + 3, 22, 36):
        for cx, cy in directions:
            yield distance * cx, distance * cy
    grid = [
        (gx - x, gy - y) for gx in range(int(area.x0), int(area.x1), 12) for gy in range(int(area.y0), int(area.y1), 12)
    ]
    yield from sorted(grid, key=lambda d: d[0] * d[0] + d[1] * d[1])


def save_png(figure, path: Path) -> None:
    """Save at the figure's own size; texts drawn for the first time here are not parsed as math either."""
    import matplotlib

    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(TEXT_AS_WRITTEN):
        figure.savefig(path, format="png", dpi=DPI)


def plot_paths(diagnosis: Diagnosis, path: Path) -> None:
    """draw_paths, saved as a PNG at `path`."""
    save_png(draw_paths(diagnosis), path)


def plot_scores(points: Sequence[ScorePoint], test_domain: str, path: Path) -> None:
    """draw_scores, saved as a PNG at `path`."""
    save_png(draw_scores(points, test_domain), path)
