"""The figures: drawn from the very numbers diagnose and recycle report, at their stated size, with every name
legible (labels of coinciding points merged, no label over another, hostile names shown as text)."""

from itertools import combinations

import pytest
import torch
from PIL import Image

from ratatouille_hub import cli, figures
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.diagnostics import ALPHAS, diagnose_states, format_diagnosis
from ratatouille_hub.figures import LABEL_GID, ScorePoint, draw_paths, draw_scores
from ratatouille_hub.recipe import recycle
from ratatouille_hub.results import Results

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = torch.tensor([0, 0, 0, 0, 1, 1])


def predict(state):
    """A model whose answers depend on its one weight t: wrong on samples 2, 3 near t = 0, on 1, 2 near
    t = 1, and on 0-3 in between (a barrier of 2 samples in 6)."""
    t = float(state["t"])
    if t <= 0.25:
        return torch.tensor([0, 0, 1, 1, 1, 1])
    if t >= 0.75:
        return torch.tensor([0, 1, 1, 0, 1, 1])
    return torch.tensor([1, 1, 1, 1, 1, 1])


@pytest.fixture
def diagnosis():
    """Models at t = 0, 1, 0: pairs 0-1 and 1-2 have the same path, so the same barrier and ratio-error."""
    states = [{"t": torch.tensor(0.0)}, {"t": torch.tensor(1.0)}, {"t": torch.tensor(0.0)}]
    return diagnose_states(["run 0 from base", "run 1 from aux1", "run 2 from base"], states, predict, LABELS)


def drawn(figure, gid: str) -> list:
    return [line for ax in figure.axes for line in ax.get_lines() if line.get_gid() == gid]


def labels_of(figure) -> list:
    return [text for ax in figure.axes for text in ax.texts if text.get_gid() == LABEL_GID]


def assert_apart(figure, labels) -> None:
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    for (i, a), (j, b) in combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"{labels[i].get_text()!r} overlaps {labels[j].get_text()!r}"


def test_the_paths_figure_plots_every_number_of_the_diagnosis(diagnosis):
    first, flat, reverse = diagnosis.pairs
    assert first.path_accuracies == pytest.approx((4 / 6,) * 3 + (2 / 6,) * 5 + (4 / 6,) * 3)  # t = 0, .1, ..., 1
    assert first.barrier == pytest.approx(2 / 6) and first.ratio_error == 2.0  # wrong apart on 1, 3; together on 2
    assert flat.ratio_error == 0.0 and reverse.ratio_error == 2.0
    figure = draw_paths(diagnosis)
    paths = drawn(figure, "path")
    assert [tuple(line.get_xdata()) for line in paths] == [ALPHAS] * 3
    assert [tuple(line.get_ydata()) for line in paths] == [
        tuple(100 * a for a in pair.path_accuracies) for pair in diagnosis.pairs
    ]
    assert [line.get_label() for line in paths] == [
        "run 0 from base → run 1 from aux1: barrier 33.3 pts, ratio-error 2.00",
        "run 0 from base → run 2 from base: barrier 0.0 pts, ratio-error 0.00",
        "run 1 from aux1 → run 2 from base: barrier 33.3 pts, ratio-error 2.00",
    ]
    points = drawn(figure, "pair")
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in points] == [
        (pair.ratio_error, 100 * pair.barrier) for pair in diagnosis.pairs
    ]
    [bars] = [ax for ax in figure.axes if ax.patches]
    assert [bar.get_width() for bar in bars.patches] == [100 * a for a in diagnosis.accuracies]


def test_pairs_that_coincide_share_one_label_and_no_label_overlaps_another(diagnosis):
    figure = draw_paths(diagnosis)
    labels = labels_of(figure)
    assert sorted(label.get_text() for label in labels) == ["0–1, 1–2", "0–2"]
    assert_apart(figure, labels)


def test_an_infinite_ratio_error_is_drawn_at_the_tick_marked_infinity():
    states = [{"t": torch.tensor(0.0)}, {"t": torch.tensor(0.0)}]
    always_right = diagnose_states(["a", "b"], states, lambda state: LABELS, LABELS)
    assert always_right.pairs[0].ratio_error == float("inf")  # no error at all, so none in common
    figure = draw_paths(always_right)
    [point] = drawn(figure, "pair")
    diversity = point.axes
    ticks = dict(zip(diversity.get_xticks(), (t.get_text() for t in diversity.get_xticklabels())))
    assert ticks[point.get_xdata()[0]] == "∞"


def test_the_scores_figure_merges_the_labels_of_models_that_score_alike():
    points = [
        ScorePoint("0", "run 0 from base", 0.900, 0.880, "run"),
        ScorePoint("1", "run 1 from aux1", 0.951, 0.896, "run"),
        ScorePoint("2", "run 2 from aux2", 0.903, 0.880, "run"),  # 0.3 points right of runs 0 and 3
        ScorePoint("3", "run 3 from base", 0.900, 0.880, "run"),  # where run 0 is
        ScorePoint("uniform", "soup, uniform", 0.882, 0.800, "soup"),
        ScorePoint("greedy", "soup, greedy", 0.951, 0.896, "soup"),  # greedy kept run 1 alone
        ScorePoint("ensemble", "ensemble of the runs", 0.951, 0.917, "ensemble"),
    ]
    figure = draw_scores(points, "sketch")
    labels = labels_of(figure)
    assert sorted(label.get_text() for label in labels) == ["0, 3", "1, greedy", "2", "ensemble", "uniform"]
    assert_apart(figure, labels)
    markers = [line for kind in ("run", "soup", "ensemble") for line in drawn(figure, kind)]
    assert sorted((line.get_xdata()[0], line.get_ydata()[0]) for line in markers) == sorted(
        (100 * p.validation, 100 * p.held_out) for p in points
    )
    assert figure.legends[0].get_texts()[0].get_text() == "0: run 0 from base  90.0% / 88.0%"


def test_names_from_others_are_shown_as_written_and_never_parsed(tmp_path):
    hostile = "org/$\\frac{$ \x1b[2Jmodel"  # mathtext that does not parse, and a terminal escape
    states = [{"t": torch.tensor(0.0)}, {"t": torch.tensor(1.0)}]
    diagnosis = diagnose_states([hostile, "run 1 from aux1"], states, predict, LABELS)
    figures.plot_paths(diagnosis, tmp_path / "paths.png")  # drawing parsed mathtext would raise here
    [path] = drawn(draw_paths(diagnosis), "path")
    assert path.get_label().startswith("org/$\\frac{$ \\x1b[2Jmodel → run 1 from aux1")
    figures.plot_scores([ScorePoint("0", hostile, 0.5, 0.5, "run")], hostile, tmp_path / "scores.png")


@pytest.fixture(scope="module")
def recycled(tiny_world, tiny_checkpoints, tmp_path_factory):
    """A recycle of two runs, with what assembly passed to each figure recorded."""
    from ratatouille_hub.recipe import assembly

    output = tmp_path_factory.mktemp("figures") / "out"
    config = RecipeConfig(
        base=str(tiny_checkpoints["base"]),
        target=str(tiny_world.target),
        aux=(str(tiny_checkpoints["aux1"]),),
        runs=2,
        steps=3,
        eval_every=3,
        lp_steps=3,
        lp_lr=1e-2,
        warmup_steps=1,
        batch_size=2,
        lr=1e-3,
        image_size=16,
        output=str(output),
    )
    passed = {}

    def recording(name, draw):
        def record(data, *args):
            passed[name] = data
            draw(data, *args)

        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assembly, "plot_paths", recording("paths", assembly.plot_paths))
        patch.setattr(assembly, "plot_scores", recording("scores", assembly.plot_scores))
        recycle(config, echo=lambda line: None)
    return output, passed


def test_recycle_draws_the_numbers_results_json_records(recycled):
    output, passed = recycled
    results = Results.load(output / "soup" / "results.json")
    pairs = passed["paths"].pairs
    assert [(p.runs, p.ratio_error, p.barrier, p.path_accuracies) for p in results.diagnostics] == [
        ([p.a, p.b], p.ratio_error, p.barrier, list(p.path_accuracies)) for p in pairs
    ]
    assert len(pairs[0].path_accuracies) == 11
    assert passed["scores"] == [
        *(
            ScorePoint(str(r.index), f"run {r.index} from {name}", r.val_accuracy, r.test_accuracy, "run")
            for r, name in zip(results.runs, ("base", "aux1"))
        ),  # fmt: skip
        *(
            ScorePoint(m, f"soup, {a.label(m)}", a.val_accuracy, a.test_accuracy, "soup")
            for m, a in results.averages.items()
        ),  # fmt: skip
        ScorePoint(
            "ensemble",
            "ensemble of the runs",
            results.ensemble.val_accuracy,
            results.ensemble.test_accuracy,
            "ensemble",
        ),  # fmt: skip
    ]
    for name, size in (("diagnostics.png", (1200, 640 + 18)), ("accuracies.png", (1200, 640))):
        with Image.open(output / "soup" / name) as image:
            assert image.format == "PNG" and image.size == size
            image.verify()


def test_diagnose_plots_what_it_prints(recycled, tiny_world, capsys, tmp_path, monkeypatch):
    output, _ = recycled
    models = sorted(str(folder) for folder in output.glob("runs/*/model"))
    plotted = []
    draw = figures.plot_paths
    monkeypatch.setattr(
        figures, "plot_paths", lambda diagnosis, path: (plotted.append(diagnosis), draw(diagnosis, path))
    )
    plot = tmp_path / "paths.png"
    code = cli.main(
        ["diagnose", *models, "--target", str(tiny_world.target), "--image-size", "16", "--plot", str(plot)]
    )
    out = capsys.readouterr().out
    assert code == 0
    [diagnosis] = plotted
    assert out == format_diagnosis(diagnosis) + f"\nplot: {plot}\n"
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (1200, 640 + 18)  # one pair: one legend row
