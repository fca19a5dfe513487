"""Discover: which checkpoints can join a soup of the base, decided from safetensors headers alone.

A candidate must carry the base's backbone tensors with identical names, shapes and dtypes; only
the classification head may differ (auxiliary heads are dropped anyway). Checking headers first
means nothing incompatible is downloaded or trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

TensorSignature = tuple[str, tuple[int, ...]]  # (dtype, shape)


def local_signature(folder: Path) -> dict[str, TensorSignature]:
    """Tensor names -> (dtype, shape) of a local model folder, read from the headers only."""
    from .merge import read_safetensors_header

    signature: dict[str, TensorSignature] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    for file in files:
        for name, info in read_safetensors_header(file).items():
            signature[name] = (info.dtype, tuple(info.shape))
    return signature


def backbone_mismatch(
    base: Mapping[str, TensorSignature], candidate: Mapping[str, TensorSignature], head_names: set[str]
) -> str | None:
    """Why `candidate` cannot be averaged with `base` (None when it can); head tensors may differ."""
    missing = sorted(set(base) - set(candidate) - head_names)
    if missing:
        return f"missing backbone tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(set(candidate) - set(base) - head_names)
    if extra:
        return f"unexpected tensor {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
    for name in sorted(set(base) - head_names):
        (base_dtype, base_shape), (dtype, shape) = base[name], candidate[name]
        if base_shape != shape:
            return f"tensor {name} has shape {list(shape)}, base has {list(base_shape)}"
        if base_dtype != dtype:
            return f"tensor {name} has dtype {dtype}, base has {base_dtype}"
    return None
