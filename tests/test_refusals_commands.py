"""Every command's bad flags and missing inputs, refused in one line before anything is written: the commands
beside recycle and merge (push, contribute, diagnose, discover, assemble --from-hub, update, run, intertrain)
and recycle's options that only a combination makes impossible. Each line is documented in docs/errors.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import refusals

from ratatouille_hub import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    *("--runs", "1", "--steps", "2", "--eval-every", "2", "--lp-steps", "2", "--warmup-steps", "1"),
    *("--batch-size", "2", "--image-size", "16"),
]


def _argv(world, out: Path, *extra: str) -> list[str]:
    return ["recycle", "--base", str(world.base), "--aux", str(world.aux[0]), "--target", str(world.target),
            *TINY, "--output", str(out), *extra]  # fmt: skip


RECYCLE_FLAGS = {  # case: (what, extra flags, culprit)
    "holdout-fraction-one": ("--holdout-fraction 1", ("--holdout-fraction", "1"), "--holdout-fraction must be in (0, 1)"),
    "image-size-tiny": ("--image-size 4", ("--image-size", "4"), "--image-size must be at least 8"),
    "micro-batch-negative": ("--micro-batch -1", ("--micro-batch", "-1"), "--micro-batch must be at least 0"),
    "eval-every-zero": ("--eval-every 0", ("--eval-every", "0"), "--eval-every must be at least 1"),
    "dropout-one": ("--dropout 1", ("--dropout", "1"), "--dropout must be in [0, 1)"),
    "dropout-choices-one": ("--dropout-choices 0.1 1.0", ("--dropout-choices", "0.1", "1.0"), "--dropout-choices"),
    "alpha-above-one": ("--alpha 1.5", ("--alpha", "1.5"), "--alpha must be between 0 and 1"),
    "project-name-a-path": ("--project-name naming a path", ("--project-name", "../elsewhere"), "--project-name must be letters"),
    "aux-missing-folder": ("--aux naming a folder that does not exist", ("--aux", "/nonexistent/ft"), "/nonexistent/ft"),
    "target-missing": ("--target naming nothing that exists", ("--target", "./no/such/dataset"), "./no/such/dataset"),
    "test-domain-of-another-dataset": ("--test-domain naming no domain of the target", ("--test-domain", "clipart"), "clipart"),
    "license-not-an-id": ("--license that is no Hub license id", ("--license", "MIT License"), "license must be a Hub license identifier"),
    "base-model-not-a-hub-id": ("--base-model x/y/z", ("--base-model", "x/y/z"), "x/y/z"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RECYCLE_FLAGS))
def test_recycle_flags_that_cannot_run_are_refused_before_anything_is_written(case, tiny_world, tmp_path, capsys):
    what, extra, culprit = RECYCLE_FLAGS[case]
    out = tmp_path / "out"
    places = {"<tmp>": tmp_path, "<ckpt>": tiny_world.base.parent, "<world>": tiny_world.target.parent}
    refusals.fails_cleanly(f"recycle-{case}", what, _argv(tiny_world, out, *extra), culprit, out, capsys, places)


def test_push_refuses_what_is_not_a_soup_or_not_a_repo_id(tiny_world, tmp_path, capsys, hub_namespace):
    places = {"<tmp>": tmp_path, "<ckpt>": tiny_world.base.parent, "<ns>": hub_namespace}
    empty = tmp_path / "empty"
    empty.mkdir()
    for case, what, argv, culprit in (
        ("push-missing-folder", "push of a folder that does not exist", ["push", f"{hub_namespace}/x", str(tmp_path / "none")], "none"),
        ("push-not-a-soup", "push of a folder without weights", ["push", f"{hub_namespace}/x", str(empty)], str(empty)),
        ("push-bad-repo-id", "push to `../x` as repo id", ["push", "../x", str(tiny_world.aux[0])], "../x"),
        ("push-old-order", "push FOLDER REPO_ID, the order before hf upload's", ["push", str(tiny_world.aux[0]), f"{hub_namespace}/x"],
         f"push takes the repo id first, as hf upload does: ratatouille-hub push {hub_namespace}/x {tiny_world.aux[0]}"),
    ):  # fmt: skip
        refusals.fails_cleanly(case, what, argv, culprit, empty, capsys, places, watch=tmp_path)


def test_scheduler_and_community_commands_refuse_bad_arguments(tiny_world, tmp_path, capsys):
    places = {"<tmp>": tmp_path, "<ckpt>": tiny_world.base.parent}
    out = tmp_path / "planned"
    assert cli.main(["plan", *_argv(tiny_world, out)[1:]]) == 0
    capsys.readouterr()
    for case, what, argv, culprit in (
        ("run-negative-index", "run --index -1", ["run", str(out), "--index", "-1"], "--index must be at least 0"),
        ("contribute-bad-prefix", "contribute --to that is no Hub id", ["contribute", str(out), "--to", "not an id"], "not an id"),
        ("contribute-unplanned", "contribute from a folder no plan wrote", ["contribute", str(tmp_path / "none"), "--to", "me/x"], "holds no plan"),
        ("assemble-from-hub-bad-id", "assemble --from-hub with no Hub id", ["assemble", str(tmp_path / "soup"), "--from-hub", "a/b/c"], "a/b/c"),
        ("diagnose-one-model", "diagnose with a single model", ["diagnose", str(tiny_world.aux[0]), "--target", str(tiny_world.target)], "at least two models"),
        ("discover-bad-base", "discover --base that is no Hub id", ["discover", "--base", "../etc"], "../etc"),
        ("update-missing-soup", "update of a soup folder that does not exist", ["update", str(tmp_path / "gone"), "--add", str(tiny_world.aux[0])], "gone"),
    ):  # fmt: skip
        refusals.fails_cleanly(case, what, argv, culprit, out, capsys, places, watch=tmp_path)


def test_intertrain_refuses_a_base_model_that_is_no_hub_id(tiny_world, tmp_path, capsys):
    out = tmp_path / "inter"
    argv = ["intertrain", "--base", str(tiny_world.base), "--dataset", str(tiny_world.target), "--base-model", "x/y/z",
            "--output", str(out), "--steps", "1", "--batch-size", "2"]  # fmt: skip
    places = {"<tmp>": tmp_path, "<ckpt>": tiny_world.base.parent}
    refusals.fails_cleanly(
        "intertrain-bad-base-model", "intertrain --base-model x/y/z", argv, "x/y/z", out, capsys, places
    )


LIMITS = {  # case: (what, extra flags, expected line)
    "recycle-runs-huge": ("--runs 100000000000", ("--runs", "100000000000"), "error: --runs must be at most 10000 (got 100000000000)"),
    "recycle-steps-huge": (
        "--steps past the int64 range",
        ("--steps", "18446744073709551617"),
        "error: --steps must be at most 2147483647 (got 18446744073709551617)",
    ),
    "recycle-image-size-huge": ("--image-size 100000", ("--image-size", "100000"), "error: --image-size must be at most 4096 (got 100000)"),
    "recycle-output-not-utf8": (
        "--output whose name is not UTF-8",
        ("--output", "out-\udcff"),
        "error: --output must be a UTF-8 path (got 'out-\\udcff')",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LIMITS))
def test_numbers_and_names_nothing_could_run_with_are_refused_before_any_work(case, tiny_world, tmp_path, capsys):
    """Each is refused at once: before the fix, --runs allocated until memory ran out (--dry-run included),
    --steps overflowed a progress bar after the probe had trained, a non-UTF-8 --output failed in safetensors."""
    what, extra, expected = LIMITS[case]
    out = tmp_path / "out"
    places = {"<tmp>": tmp_path, "<ckpt>": tiny_world.base.parent, "<world>": tiny_world.target.parent}
    argv = (
        [*_argv(tiny_world, out, *extra), "--dry-run"]
        if case == "recycle-runs-huge"
        else _argv(tiny_world, out, *extra)
    )
    line = refusals.fails_cleanly(case, what, argv, extra[0], out, capsys, places, watch=tmp_path)
    assert line == expected


def test_diagnose_plot_and_local_hub_port_are_checked_before_any_work(tiny_world, tmp_path, capsys):
    places = {"<tmp>": tmp_path, "<ckpt>": tiny_world.base.parent, "<world>": tiny_world.target.parent}
    models = [str(tiny_world.aux[0]), str(tiny_world.aux[0]), "--target", str(tiny_world.target)]
    for case, what, argv, expected in (
        ("diagnose-plot-not-png", "diagnose --plot x.txt", ["diagnose", *models, "--plot", str(tmp_path / "x.txt")],
         "error: --plot must name a .png file (got '<tmp>/x.txt')"),
        ("diagnose-plot-missing-folder", "diagnose --plot into a folder that does not exist",
         ["diagnose", *models, "--plot", str(tmp_path / "none" / "x.png")],
         "error: --plot: folder '<tmp>/none' does not exist"),
        ("local-hub-port-out-of-range", "local-hub --port 99999",
         ["local-hub", "--root", str(tmp_path / "hub"), "--port", "99999"], "error: --port must be from 1 to 65535 (got 99999)"),
    ):  # fmt: skip
        culprit = "--port" if case.startswith("local-hub") else "--plot"
        line = refusals.fails_cleanly(case, what, argv, culprit, tmp_path / "hub", capsys, places)
        assert refusals.normalise(line, places) == expected


def test_merge_weights_that_overflow_are_named_not_a_sum_of_zero(tiny_world, tmp_path, capsys):
    """Two finite weights whose sum is past the largest float: the line says so (it said `weights sum to zero`)."""
    out = tmp_path / "merged"
    argv = ["merge", str(tiny_world.aux[0]), str(tiny_world.aux[0]), "--method", "weighted",
            "--weights", "1e308", "1e308", "--output", str(out)]  # fmt: skip
    line = refusals.fails_cleanly(
        "merge-weights-overflow", "--weights 1e308 1e308", argv, "--weights", out, capsys, {"<tmp>": tmp_path}
    )
    assert line == "error: --weights sum past the largest float ([1e+308, 1e+308]): give them on a smaller scale"
    argv[argv.index("1e308")] = "1"
    argv[argv.index("1e308")] = "3"
    assert cli.main(argv) == 0  # the corrected command
