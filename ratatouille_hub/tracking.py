"""Experiment tracking through accelerate's trackers (`--report-to`, accelerate's `log_with` names).

Every fine-tune logs its loss and validation accuracy per evaluation (and each step's loss), the linear
probe its own, and assembly the soup's scores, each as one tracked run named by where it sits in the recipe
(`seed-0/sketch/run-2-from-resnet-tiny-dots`), in a project that groups the recipe's runs (the output
folder's name, or `--project-name`). TensorBoard writes under `<output>/tensorboard/`, one folder per run;
trackio, wandb and mlflow write to their own stores.

accelerate's tracker classes are used directly rather than through `Accelerator.init_trackers`: every
process here trains whole runs of its own, each its own tracked run, where `Accelerator.log` logs from the
main process only and `end_training` tears down the process group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import RatatouilleError
from .safe_text import path_component

REPORT_TO = ("none", "tensorboard", "trackio", "wandb", "mlflow")
TENSORBOARD_FOLDER = "tensorboard"
INSTALL = {  # the package each tracker needs, and how to get it
    "tensorboard": ("tensorboardX (or tensorboard)", "pip install 'ratatouille-hub[tracking]'"),
    "trackio": ("trackio", "pip install trackio"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}
# what every tracked run logs, the names the README documents
STEP_LOSS = "train/step_loss"  # each step's training loss, at its step
LOSS = "train/loss"  # the mean training loss since the previous evaluation (metrics.json's loss_history)
VAL_ACCURACY = "validation/accuracy"  # pooled training-domain validation
TEST_ACCURACY = "test/accuracy"  # the held-out domain (the soup's run only)
TRAIN_ACCURACY = "train/accuracy"  # intertrain: on (up to 1,000 of) its training images, at the last step

Log = Callable[[dict, int], None]  # log(values, step)


class TrackingError(RatatouilleError):
    """A tracker was asked for whose package is not installed."""


def check_tracker(report_to: str) -> None:
    """Refuse, before any work, a tracker whose package is missing (accelerate would silently drop it)."""
    if report_to == "none":
        return
    import accelerate.utils

    if not getattr(accelerate.utils, f"is_{report_to}_available")():
        package, install = INSTALL[report_to]
        raise TrackingError(f"--report-to {report_to} needs {package}, which is not installed: {install}")


def valid_project_name(name: str, value: str) -> str | None:
    """A project name every tracker takes and that can name a folder."""
    if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?", value):
        return None
    return f"{name} must be letters, digits, '.', '_' and '-', at most 64, starting and ending with a letter or digit (got {value!r})"


def default_project(output: Path | str) -> str:
    """The output folder's name, made a safe project name."""
    return path_component(Path(output).resolve().name) or "ratatouille-hub"


@dataclass(frozen=True)
class Tracking:
    """Where a command reports its trainings: the tracker (`none`: nowhere), the project grouping its runs,
    and the folder local trackers write into."""

    report_to: str
    project: str
    folder: Path

    @classmethod
    def of(cls, options, output: Path | str) -> Tracking:
        """What the TrackingOptions `options` (None: none) ask for, for a command whose output is `output`;
        a tracker whose package is missing is refused here, before the command's work."""
        if options is None or options.report_to == "none":
            return UNTRACKED
        check_tracker(options.report_to)
        return cls(options.report_to, options.project_name or default_project(output), Path(output))

    @contextmanager
    def run(self, *name: str, config: dict | None = None) -> Iterator[Log | None]:
        """One tracked run, named by the path `name` (each part made a safe folder name, spaces as dashes), for
        the block: yields `log(values, step)`, or None when nothing is tracked. `config` (hyperparameters) goes
        to trackers that keep one per run. Finished when the block ends, on error too."""
        if self.report_to == "none":
            yield None
            return
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # the trackers log through accelerate's logger, which needs it
        tracker = self._tracker("/".join(path_component(part.replace(" ", "-")) for part in name))
        tracker.main_process_only = False  # accelerate's default: rank 0 only; here each rank tracks its own runs
        tracker.start()
        try:
            if config and self.report_to != "tensorboard":  # TensorBoard's hparams add two timestamped "runs" beside it
                tracker.store_init_configuration(config)
            yield lambda values, step: tracker.log(values, step=step)
        finally:
            tracker.finish()

    def record(self, *name: str, values: dict, step: int) -> None:
        """One tracked run that logs `values` once, at `step` (the soup's scores)."""
        with self.run(*name) as log:
            if log is not None:
                log(values, step)

    def _tracker(self, name: str):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

        if self.report_to == "tensorboard":
            return TensorBoardTracker(name, self.folder / TENSORBOARD_FOLDER)
        if self.report_to == "mlflow":
            return MLflowTracker(experiment_name=self.project, run_name=name)
        tracker = TrackioTracker if self.report_to == "trackio" else WandBTracker
        return tracker(self.project, name=name)  # their init(project=..., name=...)


UNTRACKED = Tracking("none", "", Path("."))


def recipe_run(plan, name: str) -> tuple[str, ...]:
    """The tracked name of `name` (a run, the probe, a soup) in a recipe's plan: its trial seed and held-out
    domain first, so the trials of a sweep and the held-out domains of `--test-domain all` stay apart."""
    return f"seed {plan.config.seed}", plan.target.test_domain, name


def log_steps(log: Log, step: int, step_losses: list[float], values: dict) -> None:
    """Each step's loss at its step, ending at `step`, where `values` (the evaluation's) go too."""
    first = step - len(step_losses) + 1
    for offset, loss in enumerate(step_losses[:-1]):
        log({STEP_LOSS: loss}, first + offset)
    log({STEP_LOSS: step_losses[-1], **values}, step)
