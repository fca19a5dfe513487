"""Evaluation: logits of a model on decoded images, accuracy through `evaluate`, ensembles.

`evaluate` is imported here only (it is slow to import), and its metric module ships with the
package so nothing is fetched from the Hub.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .data import ImageTensors, Normalization, pixel_batches
from .models import to_channels_last, to_contiguous

ACCURACY_MODULE = Path(__file__).parent / "metrics" / "accuracy"
INFERENCE_BATCH = 64  # images per evaluation pass, unless --micro-batch asks for fewer


def scoring_device() -> torch.device:
    """Where a recipe's models are scored: where its runs train (this process's GPU when CUDA is present, else
    the CPU, as `train.make_accelerator` chooses), so a soup on a GPU machine is not scored on the host's cores."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).device


def inference_batch(micro_batch: int | None) -> int:
    """Images per evaluation pass: a --micro-batch caps evaluation too, or evaluation would be the peak."""
    return min(micro_batch, INFERENCE_BATCH) if micro_batch else INFERENCE_BATCH


@functools.cache
def _accuracy_metric():
    import evaluate

    return evaluate.load(str(ACCURACY_MODULE))


def accuracy(predictions: torch.Tensor, references: torch.Tensor) -> float:
    """Top-1 accuracy of class ids (or of logits/probabilities, reduced by argmax)."""
    if predictions.dim() == 2:
        predictions = predictions.argmax(dim=1)
    result = _accuracy_metric().compute(predictions=predictions.tolist(), references=references.tolist())
    return float(result["accuracy"])


@torch.no_grad()
def predict_logits(
    model, images: ImageTensors, normalize: Normalization, *, batch_size: int = INFERENCE_BATCH
) -> torch.Tensor:
    """Logits (float32, on CPU) of `model` in eval mode over every image (computed channels-last), in float32
    whatever the training precision: bf16 training never changes how a step, a run or a soup is scored."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    to_channels_last(model)
    for batch in pixel_batches(images, batch_size):
        pixels = normalize.from_uint8(batch.to(device))
        logits = model(pixel_values=pixels.contiguous(memory_format=torch.channels_last)).logits
        outputs.append(logits.float().cpu())
    to_contiguous(model)
    if not outputs:
        return torch.empty((0, 0))
    return torch.cat(outputs)


def ensemble_probabilities(logits_per_model: list[torch.Tensor]) -> torch.Tensor:
    """Functional ensemble: the mean of the members' softmax probabilities."""
    return torch.stack([logits.softmax(dim=1) for logits in logits_per_model]).mean(dim=0)
