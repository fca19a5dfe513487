"""Experiment tracking (`--report-to`): what TensorBoard's event files hold, read back, equals what the run
folders record (metrics.json, the probe's record, results.json), value for value; tracking changes no trained
byte; names that others chose never leave the tracking folder; a missing tracker package is refused in one
line before any work.

TensorBoard (through tensorboardX) is the tracker tested offline: tensorboardX needs only numpy, protobuf
and packaging, where trackio's local store brings gradio_client, uvicorn and starlette and pins an older
Pillow. TensorBoard keeps scalars as float32, so each recorded value is compared as float32.
"""

from __future__ import annotations

import json
import statistics
import struct
from pathlib import Path

import accelerate.utils
import numpy as np
import pytest
import refusals

from ratatouille_hub import cli
from ratatouille_hub.artifacts import ProbeRecord, RunRecord
from ratatouille_hub.config import IntertrainConfig, SweepConfig, TrackingOptions
from ratatouille_hub.intertraining import intertrain
from ratatouille_hub.recipe import recycle
from ratatouille_hub.sweep import sweep
from ratatouille_hub.testing import tiny_recipe, write_hub_dataset
from ratatouille_hub.toy import world as toyworld
from ratatouille_hub.tracking import Tracking

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TENSORBOARD = TrackingOptions(report_to="tensorboard")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files directly in `folder`: tag -> [(step, value)] in the order written.
    Read here, record by record (length, its CRC, the event, its CRC): tensorboardX writes event files but
    has no reader, and tensorboard's brings the whole TensorBoard server."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def f32(pairs) -> list[tuple[int, float]]:
    """(step, value) pairs as TensorBoard keeps them: the value rounded to float32."""
    return [(step, float(np.float32(value))) for step, value in pairs]


def quiet(line: str) -> None:
    pass


def recycle_argv(world, out: Path, *extra: str, command: str = "recycle") -> list[str]:
    """The tiny recipe (one run from the first fine-tune besides run 0) as flags."""
    return [command, "--base", str(world.base), "--aux", str(world.aux[0]), "--target", str(world.target),
            "--runs", "2", "--steps", "2", "--eval-every", "2", "--lp-steps", "2", "--warmup-steps", "1",
            "--batch-size", "2", "--image-size", "16", "--output", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def tracked(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    untracked = recycle(tiny_recipe(tiny_world, root / "untracked"), echo=quiet)
    results = recycle(tiny_recipe(tiny_world, root / "out"), echo=quiet, tracking=TENSORBOARD)
    return root, results, untracked


def test_tensorboard_holds_every_run_the_probe_and_the_soup_named_by_trial_domain_and_init(tracked):
    root, results, _ = tracked
    recipe = root / "out" / "tensorboard"
    assert [p.name for p in recipe.iterdir()] == ["seed-0"]
    assert [p.name for p in (recipe / "seed-0").iterdir()] == ["cartoon"]  # the held-out domain
    assert sorted(p.name for p in (recipe / "seed-0" / "cartoon").iterdir()) == [
        "linear-probe",
        "result-ratatouille",
        "run-0-from-base",
        "run-1-from-aux1",
        "run-2-from-aux2",
    ]
    assert not (root / "untracked" / "tensorboard").exists()
    assert "report_to" not in (root / "out" / "recipe.yaml").read_text()  # where it reports is no part of a recipe


def test_each_run_logs_what_its_metrics_json_records(tracked):
    root, results, _ = tracked
    for run, init in zip(results.runs, ("base", "aux1", "aux2")):
        metrics = RunRecord(root / "out" / run.folder).metrics
        logged = scalars(root / "out" / "tensorboard" / "seed-0" / "cartoon" / f"run-{run.index}-from-{init}")
        assert [step for step, _ in metrics["loss_history"]] == [step for step, _ in metrics["history"]] == [2, 4]
        assert logged["validation/accuracy"] == f32(metrics["history"])
        assert logged["train/loss"] == f32(metrics["loss_history"])
        step_losses = logged["train/step_loss"]
        assert [step for step, _ in step_losses] == [1, 2, 3, 4]  # the fine-tune's steps, after any warm-up
        # each recorded mean is the mean of the logged step losses it covers (float32 losses: exact)
        windows = [[loss for _, loss in step_losses[0:2]], [loss for _, loss in step_losses[2:4]]]
        assert [statistics.fmean(window) for window in windows] == [loss for _, loss in metrics["loss_history"]]
        assert dict(logged["validation/accuracy"])[metrics["best_step"]] == np.float32(metrics["val_accuracy"])


def test_the_probe_and_the_soup_log_what_their_records_hold(tracked):
    root, results, _ = tracked
    cartoon = root / "out" / "tensorboard" / "seed-0" / "cartoon"
    (probe_folder,) = [p for p in (root / "out" / "lp").iterdir() if not p.name.startswith(".")]
    head = ProbeRecord(probe_folder).head()
    probe = scalars(cartoon / "linear-probe")
    assert [step for step, _ in probe["validation/accuracy"]] == [2, 4, 5]  # every 2 of 5 steps, and the last
    assert dict(probe["validation/accuracy"])[head.step] == np.float32(head.val_accuracy)
    assert [step for step, _ in probe["train/step_loss"]] == [1, 2, 3, 4, 5]
    assert [step for step, _ in probe["train/loss"]] == [2, 4, 5]

    soup = scalars(cartoon / "result-ratatouille")
    expected = {"validation/accuracy": results.soup.val_accuracy, "test/accuracy": results.soup.test_accuracy}
    for name, scores in {**results.averages, "ensemble": results.ensemble, "best-run": results.best_run}.items():
        expected |= {f"validation/{name}": scores.val_accuracy, f"test/{name}": scores.test_accuracy}
    assert set(results.averages) == {"uniform", "greedy", "model-stock", "interpolate"}
    assert soup == {tag: f32([(4, value)]) for tag, value in expected.items()}  # at the runs' last step
    on_disk = json.loads((root / "out" / "soup" / "results.json").read_text())
    assert on_disk["soup"]["test_accuracy"] == results.soup.test_accuracy


def test_tracking_changes_no_trained_byte(tracked):
    root, results, untracked = tracked
    assert [run.folder for run in results.runs] == [run.folder for run in untracked.runs]  # tracking names no run
    for run in results.runs:
        tracked_run, plain_run = RunRecord(root / "out" / run.folder), RunRecord(root / "untracked" / run.folder)
        assert tracked_run.weights_file.read_bytes() == plain_run.weights_file.read_bytes()
        assert tracked_run.metrics["loss_history"] == plain_run.metrics["loss_history"]
    soup, plain = (root / folder / "soup" / "model.safetensors" for folder in ("out", "untracked"))
    assert soup.read_bytes() == plain.read_bytes()


def test_intertrain_logs_its_loss_and_training_accuracy(tiny_world, tmp_path):
    stripes = write_hub_dataset(toyworld.aux_datasets(per_class=8, size=16)["stripes"], tmp_path / "stripes", card=None)
    config = IntertrainConfig(
        base=str(tiny_world.base),
        dataset=str(stripes),
        steps=6,
        batch_size=8,
        output=str(tmp_path / "aux"),
    )
    (folder,) = intertrain(config, echo=quiet, tracking=TrackingOptions(report_to="tensorboard", project_name="aux"))
    results = json.loads((folder / "results.json").read_text())
    logged = scalars(tmp_path / "aux" / "tensorboard" / "run-0-from-base-on-stripes")
    assert [step for step, _ in results["loss_history"]] == [6]  # every 100 steps and the last
    assert logged["train/loss"] == f32(results["loss_history"])
    assert [step for step, _ in logged["train/step_loss"]] == [1, 2, 3, 4, 5, 6]
    assert statistics.fmean(loss for _, loss in logged["train/step_loss"]) == results["loss_history"][0][1]
    assert logged["train/accuracy"] == f32([(6, results["train_accuracy"])])


def test_scheduler_tasks_report_what_they_train_and_assemble(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(recycle_argv(tiny_world, out, command="plan")) == 0
    assert cli.main(["run", str(out), "--index", "1", "--report-to", "tensorboard"]) == 0
    cartoon = out / "tensorboard" / "seed-0" / "cartoon"
    assert sorted(p.name for p in cartoon.iterdir()) == ["linear-probe", "run-1-from-aux1"]
    assert cli.main(["run", str(out), "--index", "0"]) == 0  # untracked: not reported
    assert cli.main(["assemble", str(out), "--report-to", "tensorboard"]) == 0
    assert sorted(p.name for p in cartoon.iterdir()) == ["linear-probe", "result-ratatouille", "run-1-from-aux1"]
    capsys.readouterr()


def test_a_sweep_reports_every_trial_and_strategy_into_its_own_folder(tiny_world, tmp_path):
    config = SweepConfig(
        base=str(tiny_world.base),
        target=str(tiny_world.target),
        test_domain="cartoon",
        strategy=("erm", "soup"),
        trials=2,
        runs=2,
        steps=2,
        eval_every=2,
        lp_steps=2,
        batch_size=2,
        image_size=16,
        output=str(tmp_path / "sweep"),
    )
    sweep(config, echo=quiet, tracking=TENSORBOARD)
    tracked = tmp_path / "sweep" / "tensorboard"
    assert sorted(p.name for p in tracked.iterdir()) == ["seed-0", "seed-1"]  # one per trial
    for trial in ("seed-0", "seed-1"):  # the strategies share their runs, each its own result
        assert sorted(p.name for p in (tracked / trial / "cartoon").iterdir()) == [
            "linear-probe",
            "result-erm",
            "result-soup",
            "run-0-from-base",
            "run-1-from-base",
        ]


def test_names_others_chose_stay_inside_the_tracking_folder(tmp_path):
    tracking = Tracking("tensorboard", "project", tmp_path / "out")
    tracking.record("seed 0", "../../escaped", "run 1 from ..", values={"validation/accuracy": 0.5}, step=3)
    (events,) = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    parts = events.parent.relative_to(tmp_path / "out" / "tensorboard").parts
    assert len(parts) == 3 and parts[0] == "seed-0" and all(".." not in part for part in parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert scalars(events.parent) == {"validation/accuracy": [(3, 0.5)]}


@pytest.mark.parametrize(
    ("case", "command", "tracker", "culprit"),
    [
        ("recycle-report-to-missing-wandb", "recycle", "wandb", "needs wandb, which is not installed: pip install wandb"),
        ("intertrain-report-to-missing-tensorboard", "intertrain", "tensorboard", "pip install 'ratatouille-hub[tracking]'"),
    ],
)  # fmt: skip
def test_a_tracker_whose_package_is_missing_is_refused_before_any_work(
    case, command, tracker, culprit, tiny_world, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(accelerate.utils, f"is_{tracker}_available", lambda: False)
    out = tmp_path / "out"
    if command == "recycle":
        argv = recycle_argv(tiny_world, out, "--report-to", tracker)
    else:
        argv = ["intertrain", "--base", str(tiny_world.base), "--dataset", str(tiny_world.target), "--steps", "1",
                "--output", str(out), "--report-to", tracker]  # fmt: skip
    places = {"<tmp>": tmp_path, "<ckpt>": tiny_world.base.parent, "<world>": tiny_world.target.parent}
    what = f"{command} --report-to {tracker} without its package installed"
    refusals.fails_cleanly(case, what, argv, culprit, out, capsys, places)
