"""Architecture-aware helpers: where the head is, how BatchNorm and feature dropout behave.

Everything else in the pipeline treats a model as an `AutoModelForImageClassification` and goes
through these few functions. What differs between model families (where the head is, how a saved model
records the preprocessing it was trained with) is one `@architecture` entry in ARCHITECTURES: a head
layout, not a model name, so every transformers classifier with that layout (ConvNeXt, Swin, DeiT, ...)
works with no new code.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import RatatouilleError
from .registry import Registry

if TYPE_CHECKING:
    from .data import Normalization


class ArchitectureError(RatatouilleError, ValueError):
    """A model whose head or layout this tool does not know how to handle."""


def load_classifier(source: str | Path, id2label: dict[int, str]):
    """Load a checkpoint as a classifier for `id2label`; a head of another size is re-initialised.

    Always in float32, whatever the checkpoint is stored in: training, the linear probe's float head and
    averaging all work in float32, so a bfloat16 or float16 checkpoint trains (and its runs and soup are
    saved) in float32 (see `precision_note`). Never runs remote code: only architectures built into
    transformers load. `num_labels` is passed too because the timm wrapper sizes its head from it, not
    from `id2label`.
    """
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    label2id = {name: idx for idx, name in id2label.items()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the re-initialised head is intended, not worth a warning
    try:
        model, loading = AutoModelForImageClassification.from_pretrained(
            str(source),
            id2label=dict(id2label),
            label2id=label2id,
            num_labels=len(id2label),
            ignore_mismatched_sizes=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    # ignore_mismatched_sizes re-initialises any tensor whose shape differs, not only the head's rows
    refuse_mismatches(source, model, loading["mismatched_keys"])
    if hasattr(model.config, "label_names"):  # timm wrapper: saved label names would win over id2label
        model.config.label_names = [id2label[i] for i in sorted(id2label)]
    return model


def refuse_mismatches(name: str | Path, model: nn.Module, shapes) -> None:
    """Refuse a config.json that builds tensors of other shapes than its weights (`shapes`: (key, stored,
    built) triples): only the head may differ, and only in its rows (the number of classes)."""
    differing = sorted((key, list(stored), list(built)) for key, stored, built in shapes if list(stored) != list(built))
    if not differing:
        return
    head = head_parameter_names(model)
    wrong = [(key, stored, built) for key, stored, built in differing if key not in head or stored[1:] != built[1:]]
    if wrong:
        key, stored, built = wrong[0]
        more = f" ({len(wrong) - 1} more tensors like it)" if len(wrong) > 1 else ""
        raise ArchitectureError(
            f"{name}: config.json does not match its weights: it builds tensor {key!r} as {built}, the weights hold "
            f"{stored}{more}"
        )


def refuse_unbuildable(folder: Path, name: str) -> None:
    """Refuse, at planning, a config.json that cannot make a classifier of its own weights for RGB images,
    which `load_classifier` would only find once the output folder is taken: the model is built on the meta
    device (no memory, no weights read) and its shapes compared with the weights' headers."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.core_model_loading import revert_weight_conversion

    from .fetch import weight_files

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForImageClassification.from_config(config, trust_remote_code=False)
    except ValueError as error:
        raise ArchitectureError(
            f"{name}/config.json: transformers cannot build a classifier from it ({error})"
        ) from None
    channels = getattr(config, "num_channels", 3)
    if channels != 3:
        raise ArchitectureError(f"{name}/config.json: num_channels is {channels!r}; images are fed as RGB (3 channels)")
    # as save_pretrained names them on disk (transformers 5 renames ViT's modules in memory only)
    built = {key: tensor.shape for key, tensor in revert_weight_conversion(model, model.state_dict()).items()}
    prefix, shapes = f"{model.base_model_prefix}.", []
    for file in weight_files(Path(folder)):  # what transformers loads, never a decoy beside it
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                as_built = key if key in built else prefix + key  # a timm checkpoint as the Hub stores it
                if as_built in built:
                    shapes.append((as_built, handle.get_slice(key).get_shape(), built[as_built]))
    refuse_mismatches(name, model, shapes)


def refuse_image_size(folder: Path, name: str, size: int, native: int) -> None:
    """Refuse, at planning, an image size the architecture cannot take (a ViT's fixed grid of position
    embeddings, strides that leave nothing of a small image), which the linear probe would otherwise meet as an
    internal error after the output folder is taken. One image goes through the model built on the meta
    device (shapes only: no memory, no weights read); a failure counts only if `native` (the processor's
    size) goes through, so an operation the meta device lacks never refuses a valid base."""
    from transformers import AutoConfig, AutoModelForImageClassification

    if size == native:
        return
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)

    def failure(pixels: int) -> str | None:  # a model per forward: a failed one may change it (Swin's windows)
        with torch.device("meta"):
            model = AutoModelForImageClassification.from_config(config, trust_remote_code=False).eval()
        return _forward_failure(model, pixels)

    if failure(native) is None and (reason := failure(size)) is not None:
        raise ArchitectureError(
            f"{name} cannot take {size} px images (--image-size {size}): {reason}; its processor feeds it "
            f"{native} px (leave --image-size out to use that)"
        )


def _forward_failure(model: nn.Module, size: int) -> str | None:
    """The first line of what one `size` px image through `model` (on the meta device) raises; None if it
    goes through."""
    try:
        with torch.no_grad():
            model(pixel_values=torch.zeros(1, 3, size, size, device="meta"))
    except Exception as error:  # any failure: the caller counts it only if the native size goes through
        return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    return None


HALF_PRECISIONS = {"BF16": "bfloat16", "F16": "float16"}  # safetensors dtype -> torch name


def precision_note(folder: Path, name: str = "base") -> str | None:
    """What to tell about a half-precision checkpoint (`load_classifier` trains it in float32), from the
    dtypes its safetensors store; None for float32."""
    from safetensors import safe_open

    from .fetch import weight_files

    stored = set()
    for file in weight_files(Path(folder)):  # what transformers loads, never a decoy beside it
        with safe_open(str(file), framework="pt") as handle:
            stored |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
    half = sorted(HALF_PRECISIONS[dtype] for dtype in stored & HALF_PRECISIONS.keys())
    return f"{name} is {' and '.join(half)}: runs train and save in float32" if half else None


def is_timm_wrapper(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "timm_wrapper"


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC memory layout for convolutional models: 1.4-2x faster on CPU (measured); same values."""
    return model.to(memory_format=torch.channels_last)


def to_contiguous(model: nn.Module) -> nn.Module:
    """Back to the default layout, as files and other processes expect it."""
    return model.to(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class Architecture:
    name: str
    help: str
    claims: Callable[[nn.Module], bool]  # is this model of this layout? (the first claiming entry wins)
    head: Callable[[nn.Module], nn.Linear]  # the final nn.Linear mapping features to logits
    serving: Callable[[nn.Module, int, Normalization], object | None]  # see `serving_processor`


ARCHITECTURES = Registry[Architecture]("architecture")


def _squash_processor(model: nn.Module, size: int, normalize: Normalization):
    """An image processor file that does what evaluation did: the whole image resized (bilinear) to
    size x size, rescaled to [0, 1] and normalised with the base's mean and std. DomainBed evaluates
    this way; the base's own processor may resize the shortest edge and centre-crop instead, and then
    `pipeline(...)` would not score what the card reports. A base that feeds its model BGR (MobileViT: no
    normalisation, `normalization_of` refuses the rest) is served by MobileViT's processor, the one that flips."""
    from PIL import Image
    from transformers import MobileViTImageProcessorPil, ViTImageProcessorPil

    from .data import RGB

    if normalize.channels != RGB:
        return MobileViTImageProcessorPil(
            size={"height": size, "width": size}, resample=Image.BILINEAR, do_center_crop=False
        )
    return ViTImageProcessorPil(
        size={"height": size, "width": size},
        resample=Image.BILINEAR,
        image_mean=list(normalize.mean),
        image_std=list(normalize.std),
    )


def architecture(name: str, *, help: str, claims: Callable[[nn.Module], bool], serving=_squash_processor):
    def register(head: Callable[[nn.Module], nn.Linear]):
        ARCHITECTURES.add(name, Architecture(name, help, claims, head, serving))
        return head

    return register


def _timm_serving(model: nn.Module, size: int, normalize: Normalization) -> None:
    """The timm wrapper's image processor lives in config.json (`pretrained_cfg`): the same squash
    there (whole image, bilinear, no centre crop); its mean and std are already the base's."""
    pretrained_cfg = dict(getattr(model.config, "pretrained_cfg", None) or {})
    pretrained_cfg.update(input_size=[3, size, size], crop_pct=1.0, crop_mode="squash", interpolation="bilinear")
    model.config.pretrained_cfg = pretrained_cfg


@architecture(
    "timm-wrapper",
    help="TimmWrapperForImageClassification (timm backbones such as EfficientNet): timm's own classifier",
    claims=lambda model: is_timm_wrapper(model),
    serving=_timm_serving,
)
def _timm_head(model: nn.Module) -> nn.Linear:
    return model.timm_model.get_classifier()


@architecture(
    "linear-classifier",
    help="a `classifier` nn.Linear (ViT, ConvNeXt, Swin, DeiT, BEiT, ...)",
    claims=lambda model: isinstance(getattr(model, "classifier", None), nn.Linear),
)
def _linear_head(model: nn.Module) -> nn.Linear:
    return model.classifier


@architecture(
    "sequential-classifier",
    help="a `classifier` nn.Sequential ending in an nn.Linear (ResNet: Flatten then Linear; RegNet, ...)",
    claims=lambda model: (
        isinstance(getattr(model, "classifier", None), nn.Sequential)
        and any(isinstance(m, nn.Linear) for m in model.classifier)
    ),
)
def _sequential_head(model: nn.Module) -> nn.Linear:
    return [m for m in model.classifier if isinstance(m, nn.Linear)][-1]


def architecture_of(model: nn.Module) -> Architecture:
    for _, entry in ARCHITECTURES.items():
        if entry.claims(model):
            return entry
    raise ArchitectureError(f"{type(model).__name__}: no linear classification head found")


def serving_processor(model: nn.Module, size: int, normalize: Normalization):
    """Make the saved model preprocess as training and evaluation did (size x size, the base's
    normalisation): returns the image processor to save beside the weights, or None when the
    architecture records it in the model's config (done here, before `save_pretrained`)."""
    return architecture_of(model).serving(model, size, normalize)


def head_linear(model: nn.Module) -> nn.Linear:
    """The final nn.Linear that maps features to logits."""
    head = architecture_of(model).head(model)
    if not isinstance(head, nn.Linear):
        raise ArchitectureError(f"{type(model).__name__}: no linear classification head found")
    return head


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


def load_processor(source: str | Path, name: str | None = None):
    """The image processor of a checkpoint (`name`: what the user called it), on its Pillow backend."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(source), backend="pil")
    except ValueError as error:  # its line lists every processor transformers has
        if "Unrecognized image processor" not in str(error):
            raise
        file = Path(source) / "preprocessor_config.json"
        declared = json.loads(file.read_text()).get("image_processor_type") if file.is_file() else None
        raise ArchitectureError(
            f"{name or source}/preprocessor_config.json: image_processor_type {declared!r} is no image processor "
            "transformers has"
        ) from None
    except OSError:  # transformers' message names a cache path and a download the user never asked for
        raise ArchitectureError(
            f"{name or source}: ships no image processor (preprocessor_config.json), so its input size and "
            "normalisation are unknown; pass a base that has one, or a local copy of this one with the "
            "processor of the model it was trained from saved beside its weights"
        ) from None
