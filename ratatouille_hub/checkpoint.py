"""A fine-tune's progress, saved at its evaluations: a killed run resumes from its last save and ends with the
bytes an uninterrupted run ends with.

What the steps after a save depend on is saved: the model's tensors (buffers included), Adam's state, the data
order (`DomainBatches`: its generator and each domain's rest of its permutation), the augmentation generator,
the global torch generator and the CUDA device's (dropout, drop-path), the best state so far and the
validation history, and the memory layout of every tensor (evaluation leaves the model contiguous while Adam's
moments keep the channels-last layout they were made in, and a kernel may round otherwise on another layout).
Python's and numpy's generators draw nothing during a step, so they are not saved.

It is one safetensors file (`io.PROGRESS`; no pickle is ever loaded) in the run's staging folder, replaced
atomically: `io.staged_folder` keeps it when its process dies and hands it to the next build of that run.
Not `Accelerator.save_state`: it saves only `prepare()`d models and optimizers (a run's are not, see
`train.optimize`), pickles the optimizer and the generators, and writes a folder file by file.

When: at an evaluation, once the training since the last save took at least 1 / SAVE_SHARE times as long
as that save did (and at the first evaluation of every process), so saving costs at most SAVE_SHARE of the
training time however large the model and slow the disk, and a kill loses at most the larger of
`eval_every` steps and 1 / SAVE_SHARE saves' time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .io import PROGRESS, replaced_atomically
from .models import to_channels_last, to_contiguous

SAVE_SHARE = 0.05  # of the training time, at most, spent saving progress
HEADER = "ratatouille.progress"  # the safetensors metadata key of what is not a tensor


class Stateful(Protocol):
    """What saves and restores its own tensors (train.DomainBatches)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class Best(Protocol):
    """The best state so far (train.TrainOutcome)."""

    state: dict[str, torch.Tensor]
    step: int
    val_accuracy: float | None


class Checkpoint:
    """Where one fine-tune saves its progress (a file in its staging folder), and when it saves."""

    def __init__(self, folder: Path, started: float):
        """`started`: when this process began the run (time.monotonic), for the seconds the run cost."""
        self.file = Path(folder) / PROGRESS
        self.started = started
        self._earlier_seconds = 0.0  # what the run cost before this process resumed it
        self._saved_at: float | None = None  # when this process's last save ended
        self._save_seconds = 0.0

    @property
    def saved_step(self) -> int | None:
        """The step the saved progress is at; None when there is none."""
        return self._header()["step"] if self.file.is_file() else None

    def seconds(self) -> float:
        """What the run has cost: this process's time on it, and the earlier processes' up to their last save."""
        return self._earlier_seconds + time.monotonic() - self.started

    def due(self) -> bool:
        """Whether to save at this evaluation (the module's docstring says when)."""
        return self._saved_at is None or time.monotonic() - self._saved_at >= self._save_seconds / SAVE_SHARE

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Stateful,
        augmentation: torch.Generator | None,
        best: Best | None,
        history: list[tuple[int, float]],
        losses: list[tuple[int, float]],
    ) -> None:
        began = time.monotonic()
        optimizer_state = optimizer.state_dict()
        tensors = _prefixed("model", model.state_dict())
        for index, state in optimizer_state["state"].items():
            tensors.update(_prefixed(f"optimizer.{index}", state))
        if best is not None and best.step != step:  # else the best is the model itself
            tensors.update(_prefixed("best", best.state))
        tensors.update(_prefixed("batches", batches.state_dict()))
        tensors["rng.torch"] = torch.get_rng_state()
        device = next(model.parameters()).device
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        if augmentation is not None:
            tensors["rng.augment"] = augmentation.get_state()
        header = {
            "step": step,
            "seconds": self.seconds(),
            "best": None if best is None else {"step": best.step, "val_accuracy": best.val_accuracy},
            "history": history,
            "losses": losses,
            "param_groups": optimizer_state["param_groups"],
            "channels_last": sorted(name for name, tensor in tensors.items() if _is_channels_last(tensor)),
        }
        stored = {
            name: tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for name, tensor in tensors.items()
        }
        with replaced_atomically(self.file) as staging_file:
            save_file(stored, staging_file, metadata={HEADER: json.dumps(header)})
        self._saved_at = time.monotonic()
        self._save_seconds = self._saved_at - began

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Stateful,
        augmentation: torch.Generator | None,
    ) -> tuple[
        int, tuple[dict[str, torch.Tensor], int, float] | None, list[tuple[int, float]], list[tuple[int, float]]
    ]:
        """Put the saved progress back into the run's objects; returns its step, the best so far (state, step,
        validation accuracy), the validation history and the loss history."""
        header, saved = self._header(), load_file(self.file)
        channels_last = set(header["channels_last"])

        def laid_out(name: str) -> torch.Tensor:
            tensor = saved[name]
            return tensor.contiguous(memory_format=torch.channels_last) if name in channels_last else tensor

        (to_channels_last if any(name.startswith("model.") for name in channels_last) else to_contiguous)(model)
        model.load_state_dict(_unprefixed(saved, "model"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name in saved:
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = laid_out(name)
        optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
        batches.load_state_dict(_unprefixed(saved, "batches"))
        torch.set_rng_state(saved["rng.torch"])
        if "rng.cuda" in saved:
            torch.cuda.set_rng_state(saved["rng.cuda"], next(model.parameters()).device)
        if augmentation is not None:
            augmentation.set_state(saved["rng.augment"])
        self._earlier_seconds = header["seconds"]
        best = None
        if header["best"] is not None:
            state_of_best = _unprefixed(saved, "best") or _unprefixed(saved, "model")
            best = (state_of_best, header["best"]["step"], header["best"]["val_accuracy"])
        history = [(step, score) for step, score in header["history"]]
        return header["step"], best, history, [(step, loss) for step, loss in header["losses"]]

    def _header(self) -> dict:
        with safe_open(self.file, "pt") as saved:
            return json.loads(saved.metadata()[HEADER])


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def _unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1 :]: tensor for name, tensor in tensors.items() if name.startswith(f"{prefix}.")}


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
