"""Architecture-aware helpers: where the head is, how BatchNorm and feature dropout behave.

Everything else in the pipeline treats a model as an `AutoModelForImageClassification` and goes
through these few functions, so supporting a new architecture means teaching them its head.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from torch import nn


class ArchitectureError(ValueError):
    """A model whose head or layout this tool does not know how to handle."""


def load_classifier(source: str | Path, id2label: dict[int, str]):
    """Load a checkpoint as a classifier for `id2label`; a head of another size is re-initialised.

    Never runs remote code: only architectures built into transformers load. `num_labels` is passed
    too because the timm wrapper sizes its head from it, not from `id2label`.
    """
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    label2id = {name: idx for idx, name in id2label.items()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the re-initialised head is intended, not worth a warning
    try:
        model = AutoModelForImageClassification.from_pretrained(
            str(source),
            id2label=dict(id2label),
            label2id=label2id,
            num_labels=len(id2label),
            ignore_mismatched_sizes=True,
            trust_remote_code=False,
            use_safetensors=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if hasattr(model.config, "label_names"):  # timm wrapper: saved label names would win over id2label
        model.config.label_names = [id2label[i] for i in sorted(id2label)]
    return model


def is_timm_wrapper(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "timm_wrapper"


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC memory layout for convolutional models: 1.4-2x faster on CPU (STACK.md); same values."""
    return model.to(memory_format=torch.channels_last)


def to_contiguous(model: nn.Module) -> nn.Module:
    """Back to the default layout, as files and other processes expect it."""
    return model.to(memory_format=torch.contiguous_format)


def record_input_size(model: nn.Module, size: int) -> None:
    """Tell a timm-wrapped model's own image processor the resolution it was trained at.

    The processor lives in config.json (`pretrained_cfg`); we train on whole images resized to
    size x size, so `pipeline(...)` must do the same: no centre crop.
    """
    if not is_timm_wrapper(model):
        return
    pretrained_cfg = dict(getattr(model.config, "pretrained_cfg", None) or {})
    pretrained_cfg.update(input_size=[3, size, size], crop_pct=1.0, crop_mode="squash")
    model.config.pretrained_cfg = pretrained_cfg


def head_linear(model: nn.Module) -> nn.Linear:
    """The final nn.Linear that maps features to logits."""
    classifier = getattr(model, "classifier", None)
    if classifier is None and hasattr(model, "timm_model"):
        classifier = model.timm_model.get_classifier()
    if isinstance(classifier, nn.Linear):
        return classifier
    if isinstance(classifier, nn.Sequential):
        linears = [m for m in classifier if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1]
    raise ArchitectureError(f"{type(model).__name__}: no linear classification head found")


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (in the model's own state_dict key space) of the head's weight and bias."""
    head = head_linear(model)
    return {name for name, param in model.named_parameters() if param is head.weight or param is head.bias}


def set_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head = head_linear(model)
    if head.weight.shape != weight.shape:
        raise ArchitectureError(f"head shape {tuple(head.weight.shape)} != linear probe {tuple(weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


def train_mode_frozen_bn(model: nn.Module) -> None:
    """Training mode with BatchNorm running statistics frozen (scale/shift still train)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@contextlib.contextmanager
def feature_dropout(model: nn.Module, p: float):
    """Dropout on the head's input while training, without changing any state_dict key."""
    if p <= 0:
        yield
        return
    head = head_linear(model)

    def drop(module, inputs):
        return (nn.functional.dropout(inputs[0], p=p, training=module.training),)

    handle = head.register_forward_pre_hook(drop)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_features(model: nn.Module):
    """Collect the head's inputs (the featurizer's output) during forward passes."""
    captured: list[torch.Tensor] = []

    def keep(module, inputs):
        captured.append(inputs[0].detach().flatten(1))

    handle = head_linear(model).register_forward_pre_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def quiet_transformers() -> None:
    """Silence the libraries' own per-file progress bars and load chatter, which would bury ours."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()


PROCESSOR_FILE = "preprocessor_config.json"


def copy_processor(base_folder: Path, destination: Path) -> None:
    """A complete model folder: the base's image processor config, where it has one (timm-wrapped
    models keep theirs inside config.json)."""
    if (base_folder / PROCESSOR_FILE).exists():
        shutil.copyfile(base_folder / PROCESSOR_FILE, destination / PROCESSOR_FILE)


def load_processor(source: str | Path):
    """The image processor of a checkpoint, on its Pillow backend (no torchvision needed)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(source), backend="pil")
