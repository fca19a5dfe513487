"""Weight averaging: small pure functions over tensors, with streaming safetensors I/O at the edges.

The file merge copies each tensor's bytes out of the inputs with plain reads into reusable buffers instead
of memory-mapping them: N mapped files count toward RSS as their pages are touched, so peak memory would
grow with the number of models (../shared/STACK.md). Here it is bounded by the largest tensor, whatever N.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from huggingface_hub import constants
from torch import Tensor

from .errors import RatatouilleError

WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # transformers' SAFE_WEIGHTS_NAME, without importing transformers
WEIGHTS_INDEX_NAME = constants.SAFETENSORS_INDEX_FILE
COPIED_CONFIGS = ("config.json", "preprocessor_config.json")
CHECKED_CONFIG_KEYS = ("model_type", "id2label", "label_names")  # label_names: timm-wrapped models
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # refused by name, never opened
MAX_RANK = 64  # more dimensions than torch supports: a corrupt header, not a model

_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class MergeError(RatatouilleError, ValueError):
    """Inputs that cannot be averaged: corrupt files, models that differ, non-finite weights."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; `offsets` are absolute byte positions [begin, end) in the file."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


# -- pure merge math -------------------------------------------------------------------------------


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Mixing weights that sum to one; None means the uniform soup."""
    if n < 1:
        raise MergeError("nothing to merge: need at least one input")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} inputs")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise MergeError(f"weights must be finite and non-negative (weight {index} is {weight})")
    total = sum(weights)
    if total == 0:
        raise MergeError("weights sum to zero")
    if not math.isfinite(total):
        raise MergeError(f"--weights sum past the largest float ({weights}): give them on a smaller scale")
    return [w / total for w in weights]


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted mean of in-memory state dicts, with the same arithmetic as `merge_safetensors`.

    Floating tensors are accumulated in float32 (float64 ones in float64) and cast back to their dtype;
    integer and bool tensors (BatchNorm `num_batches_tracked`) are copied from the first input.
    """
    return average_streamed(state_dicts.__getitem__, len(state_dicts), weights)


def average_streamed(
    load: Callable[[int], Mapping[str, Tensor]], count: int, weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """`average_state_dicts` of `load(0)`, ..., `load(count - 1)`, each input loaded when its turn comes.

    Memory is a running sum plus one input, whatever `count`. Every tensor still accumulates the inputs in
    the same order with the same operations, so the result is the same bit for bit, and so are the errors
    (a non-finite sum reloads the inputs to name the culprit).
    """
    weights = normalize_weights(weights, count)
    sums: dict[str, Tensor] = {}
    signature: dict[str, tuple] = {}
    for index, weight in enumerate(weights):
        state_dict = load(index)
        if index == 0:
            signature = {name: (t.dtype, tuple(t.shape)) for name, t in state_dict.items()}
            sums = {name: _running_sum(name, t) for name, t in state_dict.items()}
        else:
            problem = _first_difference(signature, {name: (t.dtype, tuple(t.shape)) for name, t in state_dict.items()})
            if problem:
                raise MergeError(f"state dict {index} does not match state dict 0: {problem}")
        for name, tensor in state_dict.items():
            if tensor.is_floating_point():
                _accumulate(sums[name], tensor, weight)
        del state_dict  # before loading the next input
    merged = {}
    for name, acc in sums.items():
        dtype = signature[name][0]
        if not acc.is_floating_point():
            merged[name] = acc
            continue
        if not torch.isfinite(acc).all():
            culprit = next((i for i in range(count) if not torch.isfinite(load(i)[name]).all()), None)
            raise MergeError(_nonfinite_message(name, None if culprit is None else f"state dict {culprit}"))
        merged[name] = acc.to(dtype)
    return merged


def _running_sum(name: str, first: Tensor) -> Tensor:
    """Zeros in the accumulator dtype for a floating tensor; a copy of the first input for an integer one."""
    if first.is_complex():
        raise MergeError(f"tensor {name!r}: complex tensors are not supported")
    if not first.is_floating_point():
        return first.clone()
    return torch.zeros(first.shape, dtype=_accumulator_dtype(first.dtype), device=first.device)


def greedy_select(candidates: Sequence[int], score: Callable[[list[int]], float]) -> list[int]:
    """Greedy soup: walk the best-first candidates, keep each one whose addition does not lower the score."""
    if not candidates:
        raise ValueError("greedy selection needs at least one candidate")
    selected = [candidates[0]]
    best = score(selected)
    for candidate in candidates[1:]:
        trial = score(selected + [candidate])
        if trial >= best:
            selected.append(candidate)
            best = trial
    return selected


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _accumulate(acc: Tensor, tensor: Tensor, weight: float) -> None:
    """acc += weight * tensor in acc's dtype; both merge paths call this so that they agree bit for bit."""
    acc.add_(tensor, alpha=weight)


def _first_difference(expected: Mapping[str, tuple], actual: Mapping[str, tuple]) -> str | None:
    """Describe the first tensor whose (dtype, shape) differs, in the expected order; None if all agree."""
    for name, (dtype, shape) in expected.items():
        if name not in actual:
            return f"tensor {name!r} is missing"
        other_dtype, other_shape = actual[name]
        if other_shape != shape:
            return f"tensor {name!r} has shape {list(other_shape)}, expected {list(shape)}"
        if other_dtype != dtype:
            return f"tensor {name!r} has dtype {other_dtype}, expected {dtype}"
    extra = next((name for name in actual if name not in expected), None)
    return None if extra is None else f"unexpected tensor {extra!r}"


def _nonfinite_message(name: str, source: str | None) -> str:
    if source is None:
        return f"tensor {name!r}: the weighted sum overflowed to Inf"
    return f"{source}: tensor {name!r} contains NaN or Inf"


# -- safetensors files -----------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without touching tensor data.

    Any inconsistency (truncation, bad JSON, offsets outside the file or not matching shape x dtype,
    overlapping or missing bytes) is a MergeError raised before anything is sized from the file's claims.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MergeError(f"{path}: truncated file ({size} bytes): no safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise MergeError(f"{path}: header length {header_len} is larger than the file ({size} bytes)")
        if header_len > MAX_HEADER_BYTES:
            raise MergeError(f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise MergeError(f"{path}: malformed safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: malformed safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors = {
        name: _parse_entry(path, name, entry, data_start) for name, entry in header.items() if name != "__metadata__"
    }
    _check_tiling(path, tensors, data_start, size)
    return tensors


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (validated like the rest of its header)."""
    read_safetensors_header(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        metadata = json.loads(handle.read(length)).get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergeError(f"{path}: __metadata__ must map names to strings")
    return metadata


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    def fail(problem: str) -> MergeError:
        return MergeError(f"{path}: tensor {name!r}: {problem}")

    if not isinstance(entry, dict):
        raise fail("header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise fail(f"unsupported dtype {dtype!r}")
    if not _is_int_list(shape) or len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise fail(f"invalid shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise fail(f"invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise fail(f"shape {shape} of {dtype} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), (data_start + offsets[0], data_start + offsets[1]))


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)


def _check_tiling(path: Path, tensors: Mapping[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensor bytes must tile the data section exactly, as the safetensors library requires."""
    position = data_start
    for name, info in sorted(tensors.items(), key=lambda item: item[1].offsets):
        if info.offsets[0] != position:
            raise MergeError(f"{path}: tensor {name!r}: data_offsets overlap another tensor or leave a gap")
        position = info.offsets[1]
    if position > size:
        raise MergeError(f"{path}: truncated file: tensor data ends at byte {position}, the file has {size}")
    if position < size:
        raise MergeError(f"{path}: {size - position} bytes after the last tensor")


def _read_matching_headers(paths: Sequence[Path]) -> list[dict[str, TensorInfo]]:
    """Every input's header, after checking each has the first one's names, shapes and dtypes."""
    headers = [read_safetensors_header(path) for path in paths]
    expected = _signature(headers[0])
    for path, header in zip(paths[1:], headers[1:]):
        problem = _first_difference(expected, _signature(header))
        if problem:
            raise MergeError(f"{path} does not match {paths[0]}: {problem}")
    return headers


def _signature(header: Mapping[str, TensorInfo]) -> dict[str, tuple]:
    return {name: (info.dtype, info.shape) for name, info in header.items()}


class _ScratchBuffer:
    """One growable byte buffer reused for every tensor: memory is set by the largest tensor, not by N."""

    def __init__(self) -> None:
        self._data = bytearray()

    def view(self, nbytes: int) -> memoryview:
        if len(self._data) < nbytes:
            self._data = bytearray(nbytes)
        return memoryview(self._data)[:nbytes]


def _as_tensor(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return torch.frombuffer(view, dtype=dtype).view(shape)


def _read_into(source: BinaryIO, info: TensorInfo, view: memoryview, path: Path) -> None:
    source.seek(info.offsets[0])
    filled = 0
    while filled < len(view):
        count = source.readinto(view[filled:])
        if not count:
            raise MergeError(f"{path}: file shrank while merging")
        filled += count


def merge_safetensors(
    inputs: Sequence[str | Path],
    output_file: str | Path,
    weights: Sequence[float] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Stream the weighted mean of same-layout safetensors files into `output_file`, tensor by tensor.

    All headers are validated before any data is read; the output appears whole (temp file, fsync,
    rename) or not at all. Integer and bool tensors are copied from the first input.
    """
    paths = [Path(p) for p in inputs]
    weights = normalize_weights(weights, len(paths))
    _write_merged_file(paths, _read_matching_headers(paths), Path(output_file), weights, metadata)


def _write_merged_file(
    paths: Sequence[Path],
    headers: Sequence[Mapping[str, TensorInfo]],
    output_file: Path,
    weights: Sequence[float],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Inputs already validated; write through a temp file so a crash never leaves half a file."""
    output_file.parent.mkdir(parents=True, exist_ok=True)
    staging = output_file.with_name(f".{output_file.name}.{uuid.uuid4().hex}.tmp")
    try:
        with ExitStack() as stack:
            sink = stack.enter_context(open(staging, "xb"))
            sources = [stack.enter_context(open(path, "rb", buffering=0)) for path in paths]
            _stream_merged_tensors(sink, sources, paths, headers, weights, metadata)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(staging, output_file)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _stream_merged_tensors(
    sink: BinaryIO,
    sources: Sequence[BinaryIO],
    paths: Sequence[Path],
    headers: Sequence[Mapping[str, TensorInfo]],
    weights: Sequence[float],
    metadata: Mapping[str, str] | None,
) -> None:
    """Header first (it depends only on the first input's layout), then each merged tensor in file order."""
    layout = headers[0]
    order = sorted(layout, key=lambda name: layout[name].offsets)
    sink.write(_encode_header(layout, order, metadata))
    read_buffer, acc_buffer, out_buffer = _ScratchBuffer(), _ScratchBuffer(), _ScratchBuffer()
    for name in order:
        info = layout[name]
        if info.nbytes == 0:
            continue
        raw = read_buffer.view(info.nbytes)
        if info.dtype not in _FLOAT_DTYPES:
            _read_into(sources[0], info, raw, paths[0])
            sink.write(raw)
            continue
        dtype = _FLOAT_DTYPES[info.dtype]
        acc_dtype = _accumulator_dtype(dtype)
        acc_bytes = acc_buffer.view(math.prod(info.shape) * acc_dtype.itemsize)
        acc = _as_tensor(acc_bytes, acc_dtype, info.shape).zero_()
        for source, path, header, weight in zip(sources, paths, headers, weights):
            _read_into(source, header[name], raw, path)
            _accumulate(acc, _as_tensor(raw, dtype, info.shape), weight)
        if not torch.isfinite(acc).all():
            raise MergeError(_nonfinite_message(name, _find_nonfinite(name, sources, paths, headers, raw, dtype)))
        if dtype == acc_dtype:
            sink.write(acc_bytes)
        else:
            out_bytes = out_buffer.view(info.nbytes)
            _as_tensor(out_bytes, dtype, info.shape).copy_(acc)
            sink.write(out_bytes)


def _find_nonfinite(
    name: str,
    sources: Sequence[BinaryIO],
    paths: Sequence[Path],
    headers: Sequence[Mapping[str, TensorInfo]],
    raw: memoryview,
    dtype: torch.dtype,
) -> str | None:
    """The first input whose tensor holds NaN or Inf (None when only the sum overflowed)."""
    for source, path, header in zip(sources, paths, headers):
        _read_into(source, header[name], raw, path)
        if not torch.isfinite(_as_tensor(raw, dtype, header[name].shape)).all():
            return str(path)
    return None


def _encode_header(
    layout: Mapping[str, TensorInfo], order: Sequence[str], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Header of the output file, with the `format: pt` metadata transformers expects (and `metadata`),
    padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    position = 0
    for name in order:
        info = layout[name]
        span = [position, position + info.nbytes]
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": span}
        position += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# -- model folders ---------------------------------------------------------------------------------


def merge_model_folders(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    weights: Sequence[float] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Average transformers model folders into `output_dir` (weights, config, image processor config).

    Configs must agree on model type and labels, and every weight file on its tensors, before anything is
    written. Sharded checkpoints are merged shard by shard when all inputs are sharded the same way.
    """
    folders = [Path(p) for p in inputs]
    output_dir = Path(output_dir)
    weights = normalize_weights(weights, len(folders))
    headers = checked_headers(folders)
    files = list(headers)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        _write_merged_file([folder / name for folder in folders], headers[name], output_dir / name, weights, metadata)
    copied = COPIED_CONFIGS if files == [WEIGHTS_NAME] else (*COPIED_CONFIGS, WEIGHTS_INDEX_NAME)
    for name in copied:
        if (folders[0] / name).is_file():
            shutil.copyfile(folders[0] / name, output_dir / name)


def checked_headers(folders: Sequence[Path]) -> dict[str, list[dict[str, TensorInfo]]]:
    """Each weight file's headers across the folders, once configs, files and tensors all agree (what
    every merge of folders, and an update, checks before reading any weight)."""
    _check_configs(folders)
    files = _weight_files(folders[0])
    for folder in folders[1:]:
        if _weight_files(folder) != files:
            raise MergeError(f"{folder} stores its weights in other files than {folders[0]}: reshard one of them")
    return {name: _read_matching_headers([folder / name for folder in folders]) for name in files}


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files of a model folder, as transformers picks them (single file first)."""
    if (folder / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if not index.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise MergeError(f"{folder}: pickle weights only ({', '.join(pickles)}): never unpickled; use safetensors")
        raise MergeError(f"{folder}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} found")
    return index_shards(index)


def index_shards(index: Path) -> list[str]:
    """The shard files a safetensors index names, each a plain file name in the index's folder: an index
    comes with the weights, so a path in it (`/home/you/.ssh/id_rsa`) must never be read, nor pushed."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise MergeError(f"{index}: malformed index ({error!r})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) and shard == Path(shard).name and shard.endswith(".safetensors")
        for shard in weight_map.values()
    ):
        raise MergeError(f"{index}: weight_map must map tensor names to .safetensors files in the same folder")
    return sorted(set(weight_map.values()))


def _check_configs(folders: Sequence[Path]) -> None:
    configs = [_load_config(folder) for folder in folders]
    for folder, config in zip(folders, configs):
        if "auto_map" in config:  # the merged folder would point at code it does not carry; never run it either
            raise MergeError(
                f"{folder}: config.json asks for custom code (auto_map); only built-in architectures are merged"
            )
    for folder, config in zip(folders[1:], configs[1:]):
        for key in CHECKED_CONFIG_KEYS:
            expected, actual = configs[0].get(key), config.get(key)
            if actual != expected:
                difference = _config_difference(key, expected, actual)
                raise MergeError(f"{folder}: config.json does not match {folders[0]}: {difference}")


def _load_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{folder}: no config.json (not a transformers model folder)") from None
    except ValueError as error:
        raise MergeError(f"{path}: malformed JSON ({error})") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}: not a JSON object")
    return config


def _config_difference(key: str, expected: object, actual: object) -> str:
    """Name the first differing label rather than printing two maps of possibly thousands of classes."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        label = next(k for k in sorted(expected.keys() | actual.keys()) if expected.get(k) != actual.get(k))
        return f"{key}[{label}] is {actual.get(label)!r}, expected {expected.get(label)!r}"
    return f"{key} is {actual!r}, expected {expected!r}"


# -- merges anchored at the base (Model Stock, interpolation) ----------------------------------------


def model_stock_ratio(cosine: float, k: int) -> float:
    """Model Stock's weight of the fine-tunes' mean against the base, t = k cos / (1 + (k - 1) cos)."""
    return k * cosine / (1 + (k - 1) * cosine)


def model_stock_streamed(
    load: Callable[[int], Mapping[str, Tensor]], count: int, anchor: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Model Stock (Jang, Yun, Han, ECCV 2024) of `load(0..count-1)` around `anchor`: per floating tensor,
    t * mean(w_i) + (1 - t) * w_0 with t from the angle between the deltas w_i - w_0, as the authors do for
    more than two models: the mean of the pairwise angles (mergekit averages the pairwise cosines instead).

    Returns the merged state and each tensor's t, in [0, 1] (a mean angle past 90 degrees gives the base).
    Pairs whose delta is zero have no angle and are left out;
    a tensor with no angle (one input, or no delta) takes the mean (t = 1), as do tensors the anchor lacks or
    shapes otherwise (a head for other labels). Integer tensors are the first input's, as in the mean.
    Memory is the anchor, a running sum and two inputs whatever `count`: each pair is loaded again
    (count * (count + 1) / 2 loads), rather than holding every input.
    """
    mean = average_streamed(load, count)
    anchored = {
        name
        for name, tensor in mean.items()
        if tensor.is_floating_point() and name in anchor and tuple(anchor[name].shape) == tuple(tensor.shape)
    }
    angles = dict.fromkeys(anchored, 0.0)
    pairs = dict.fromkeys(anchored, 0)
    for i in range(count - 1):
        first = _unit_deltas(load(i), anchor, anchored)
        for j in range(i + 1, count):
            second = _unit_deltas(load(j), anchor, anchored)
            for name in anchored:
                if first[name] is not None and second[name] is not None:
                    cosine = torch.dot(first[name], second[name]).clamp(-1.0, 1.0).item()
                    angles[name] += math.acos(cosine)
                    pairs[name] += 1
            del second
    # a mean angle past 90 degrees (cos < 0) would give t < 0, and t -> infinity as cos -> -1/(k - 1): the
    # formula assumes fine-tunes of one base whose deltas agree more than they oppose, so cos is kept >= 0
    ratios = {
        name: model_stock_ratio(max(0.0, math.cos(angles[name] / pairs[name])), count) if pairs[name] else 1.0
        for name in anchored
    }
    merged = {
        name: _toward(anchor[name], tensor, ratios[name]) if name in ratios else tensor for name, tensor in mean.items()
    }
    return merged, ratios


def _unit_deltas(state: Mapping[str, Tensor], anchor: Mapping[str, Tensor], names) -> dict[str, Tensor | None]:
    """Each tensor's w - w_0 flattened to unit length in float64 (None where it is zero)."""
    units = {}
    for name in names:
        delta = state[name].double().flatten() - anchor[name].double().flatten()
        norm = torch.linalg.vector_norm(delta)
        units[name] = delta / norm if norm > 0 else None
    return units


def interpolate(anchor: Mapping[str, Tensor], soup: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """WiSE-FT's (1 - alpha) * base + alpha * soup per floating tensor (alpha 1: the soup, 0: the base).
    Tensors the anchor lacks or shapes otherwise (a head for other labels), and integer ones, are the soup's."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
    return {
        name: _toward(anchor[name], tensor, alpha)
        if tensor.is_floating_point() and name in anchor and tuple(anchor[name].shape) == tuple(tensor.shape)
        else tensor
        for name, tensor in soup.items()
    }


def _toward(anchor: Tensor, target: Tensor, ratio: float) -> Tensor:
    """anchor + ratio * (target - anchor), in the accumulator dtype, cast back to the target's dtype; ratio 1
    is the target itself, bit for bit."""
    if ratio == 1.0:
        return target
    dtype = _accumulator_dtype(target.dtype)
    start = anchor.to(dtype)
    return (start + ratio * (target.to(dtype) - start)).to(target.dtype)


def merge_anchored_folders(
    inputs: Sequence[str | Path],
    base: str | Path,
    output_dir: str | Path,
    anchored,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """`merge_model_folders` for a method anchored at `base` (Model Stock, interpolation): inputs are loaded
    one at a time (two for Model Stock's pairs), the result written as one safetensors file. Returns the
    floating tensors the base lacks or shapes otherwise (a head for other labels): those are the plain mean.
    """
    from safetensors.torch import save_file

    folders, output_dir = [Path(p) for p in inputs], Path(output_dir)
    checked_headers(folders)
    anchor = folder_state(Path(base))
    first = folder_state(folders[0])
    unanchored = [
        name
        for name, tensor in first.items()
        if tensor.is_floating_point() and (name not in anchor or anchor[name].shape != tensor.shape)
    ]
    if len(unanchored) == sum(t.is_floating_point() for t in first.values()):
        raise MergeError(f"{base}: shares no tensor with {folders[0]}: not the model they were fine-tuned from")
    del first
    merged = anchored(lambda k: folder_state(folders[k]), len(folders), anchor)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in merged.items()},
        output_dir / WEIGHTS_NAME,
        metadata={"format": "pt", **(metadata or {})},
    )
    for name in COPIED_CONFIGS:
        if (folders[0] / name).is_file():
            shutil.copyfile(folders[0] / name, output_dir / name)
    return unanchored


def folder_state(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a model folder's safetensors files (one file or shards), as stored."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for name in _weight_files(folder):
        state.update(load_file(folder / name))
    return state
