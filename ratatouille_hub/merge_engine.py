"""The one merge engine: every method (merge_methods.py) run tensor by tensor over safetensors files or
states, with the math its entries share and the file I/O at the edges.

The file merge copies each tensor's bytes out of the inputs with plain reads into reusable buffers instead
of memory-mapping them: N mapped files count toward RSS as their pages are touched, so peak memory would
grow with the number of models. Here it is bounded by the largest tensor, whatever N
(N of them for a method that compares the runs' tensors of one name).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from huggingface_hub import constants
from torch import Tensor

from .merge_math import MergeError, normalize_weights
from .merge_math import greedy_select as greedy_select  # re-exported: callers find it here
from .merge_methods import MEAN, TensorRule

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
_STORED_DTYPES = {
    **_FLOAT_DTYPES,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted mean of in-memory state dicts: the engine's mean over states, so the same bits as a merge of
    files. Floating tensors accumulate in float32 (float64 ones in float64) and are cast back to their dtype;
    integer and bool tensors (BatchNorm `num_batches_tracked`) are copied from the first input."""
    return merge_states(MEAN, state_dicts, weights)


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


# -- the engine: one pass over the tensor names, each member's tensor read when the method asks for it --


class SafetensorsSource:
    """One model's tensors in safetensors files (one file or shards), each read on demand with plain reads
    into a scratch buffer the engine owns: nothing is memory-mapped, so N inputs never count N files in RSS."""

    def __init__(self, paths: Sequence[Path], headers: Sequence[Mapping[str, TensorInfo]]):
        self.paths = list(paths)
        self._where = {name: (index, info) for index, header in enumerate(headers) for name, info in header.items()}
        self._handles: dict[int, BinaryIO] = {}

    @classmethod
    def of_folder(cls, folder: Path) -> SafetensorsSource:
        paths = [folder / name for name in _weight_files(folder)]
        return cls(paths, [read_safetensors_header(path) for path in paths])

    def names(self) -> list[str]:
        return list(self._where)

    def signature(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        where = self._where.get(name)
        return None if where is None else (where[1].dtype, where[1].shape)

    def is_floating(self, name: str) -> bool:
        return self._where[name][1].dtype in _FLOAT_DTYPES

    def describe(self, name: str) -> str:
        return str(self.paths[self._where[name][0]])

    def read(self, name: str, scratch: _ScratchBuffer) -> Tensor:
        index, info = self._where[name]
        return self._read(index, info, scratch)

    def read_slice(self, name: str, start: int, stop: int, scratch: _ScratchBuffer) -> Tensor:
        """Elements [start, stop) of the flattened tensor, read alone."""
        index, info = self._where[name]
        itemsize = _ITEMSIZE[info.dtype]
        begin = info.offsets[0] + start * itemsize
        return self._read(
            index, TensorInfo(info.dtype, (stop - start,), (begin, begin + (stop - start) * itemsize)), scratch
        )

    def _read(self, index: int, info: TensorInfo, scratch: _ScratchBuffer) -> Tensor:
        """The bytes `info` spans in file `index`, copied into `scratch` and viewed as its dtype and shape."""
        dtype = _STORED_DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        if index not in self._handles:
            self._handles[index] = open(self.paths[index], "rb", buffering=0)  # noqa: SIM115 (closed by close())
        raw = scratch.view(info.nbytes)
        _read_into(self._handles[index], info, raw, self.paths[index])
        return _as_tensor(raw, dtype, info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class StateSource:
    """A state dict already in memory (a base with its probe head, the two ends of a diagnosed path)."""

    def __init__(self, state: Mapping[str, Tensor], label: str):
        self.state, self.label = state, label

    def signature(self, name: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        tensor = self.state.get(name)
        return None if tensor is None else (tensor.dtype, tuple(tensor.shape))

    def is_floating(self, name: str) -> bool:
        return self.state[name].is_floating_point()

    def describe(self, name: str) -> str:
        return self.label

    def read(self, name: str, scratch: _ScratchBuffer) -> Tensor:
        return self.state[name]

    def read_slice(self, name: str, start: int, stop: int, scratch: _ScratchBuffer) -> Tensor:
        return self.state[name].reshape(-1)[start:stop]

    def close(self) -> None:
        pass


CHUNK_BYTES = 16 << 20  # what `RunTensors.chunks` holds across all members at once, whatever N


class RunTensors:
    """Every member's tensor of one name, for a method that compares the runs (`all_runs`): re-readable and
    never all in memory. Iterating reads the members again, one at a time, through one buffer (TIES takes
    two passes); `chunks` gives the same slice of elements from every member at once (Model Stock's
    pairwise angles), the slice sized so that all of them together stay within CHUNK_BYTES."""

    def __init__(self, runs: Sequence[SafetensorsSource | StateSource], name: str, scratch: list[_ScratchBuffer]):
        self._runs, self._name, self._scratch = runs, name, scratch
        dtype, shape = runs[0].signature(name)
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[Tensor]:
        for run in self._runs:
            yield run.read(self._name, self._scratch[0])

    def chunks(self, itemsize: int = 8) -> Iterator[list[Tensor]]:
        """Flat slices [start, stop) of every member, `itemsize` the bytes per element the caller will hold
        per member (8: a float64 copy), so N slices fit CHUNK_BYTES."""
        step = max(1, CHUNK_BYTES // (itemsize * len(self._runs)))
        buffers = self._scratch[1:] + [_ScratchBuffer() for _ in range(len(self._runs) + 1 - len(self._scratch))]
        self._scratch[1:] = buffers
        for start in range(0, self.numel, step):
            stop = min(self.numel, start + step)
            yield [run.read_slice(self._name, start, stop, buffer) for run, buffer in zip(self._runs, buffers)]


def merge_sources(
    rule: TensorRule,
    runs: Sequence[SafetensorsSource | StateSource],
    names: Sequence[str],
    emit: Callable[[str, Tensor], None],
    weights: Sequence[float] | None = None,
    base: SafetensorsSource | StateSource | None = None,
) -> list[str]:
    """The one merge engine: for each name in `names`, `emit(name, merged tensor)`; returns the floating
    tensors the base lacks or shapes otherwise (they take the weighted mean instead of an anchored rule).

    A method that streams (`runs`) sees each member's tensor in turn through one shared read buffer, so
    memory is its running state plus one tensor, whatever N; one that compares the runs (`all_runs`) gets
    them re-readable (RunTensors): a pass at a time, or N slices of CHUNK_BYTES in all; never N tensors. Integer and bool tensors are the first member's. A non-finite
    result names the first input holding NaN or Inf (or the overflow)."""
    weights = normalize_weights(weights, len(runs))
    shared, base_scratch = _ScratchBuffer(), _ScratchBuffer()
    held = [_ScratchBuffer()]  # RunTensors' buffers: one to iterate, and N slices of CHUNK_BYTES in all
    unanchored = []
    for name in names:
        first = runs[0]
        if not first.is_floating(name):
            emit(name, first.read(name, shared))
            continue
        tensor_rule, anchor = rule, None
        if rule.needs_base:
            if (
                base.signature(name) is not None
                and _shape(base, name) == _shape(first, name)
                and base.is_floating(name)
            ):
                anchor = base.read(name, base_scratch)
            else:
                tensor_rule = MEAN
                unanchored.append(name)
        if tensor_rule.holds_all_runs:
            tensors = RunTensors(runs, name, held)
        else:
            tensors = (run.read(name, shared) for run in runs)
        merged = tensor_rule(name, tensors, weights, anchor)
        if not torch.isfinite(merged).all():
            culprit = _find_nonfinite(name, [*runs, *([base] if anchor is not None else [])], shared)
            raise MergeError(_nonfinite_message(name, culprit))
        emit(name, merged)
    return unanchored


def _shape(source: SafetensorsSource | StateSource, name: str) -> tuple[int, ...]:
    return tuple(source.signature(name)[1])


def _find_nonfinite(
    name: str, sources: Sequence[SafetensorsSource | StateSource], scratch: _ScratchBuffer
) -> str | None:
    """The first input whose tensor holds NaN or Inf (None when only the sum overflowed)."""
    for source in sources:
        if not torch.isfinite(source.read(name, scratch)).all():
            return source.describe(name)
    return None


def merge_states(
    rule: TensorRule,
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The engine over state dicts in memory (checked to match the first), merged into a new state dict."""
    signature = {name: (t.dtype, tuple(t.shape)) for name, t in states[0].items()}
    for index, state in enumerate(states[1:], start=1):
        problem = _first_difference(signature, {name: (t.dtype, tuple(t.shape)) for name, t in state.items()})
        if problem:
            raise MergeError(f"state dict {index} does not match state dict 0: {problem}")
    runs = [StateSource(state, f"state dict {index}") for index, state in enumerate(states)]
    anchor = None if base is None else StateSource(base, "the base")
    return collect(rule, runs, list(signature), weights, anchor)


def collect(
    rule: TensorRule,
    runs: Sequence[SafetensorsSource | StateSource],
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    base: SafetensorsSource | StateSource | None = None,
) -> dict[str, Tensor]:
    """`merge_sources` into a state dict (the scoring path: the model evaluated holds it anyway)."""
    merged: dict[str, Tensor] = {}

    def keep(name: str, tensor: Tensor) -> None:
        merged[name] = tensor if tensor.is_floating_point() else tensor.clone()  # copied out of a read buffer

    merge_sources(rule, runs, names, keep, weights, base)
    return merged


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
    headers = _read_matching_headers(paths)
    runs = [SafetensorsSource([path], [header]) for path, header in zip(paths, headers)]
    try:
        _write_merged_file(Path(output_file), headers[0], metadata, MEAN, runs, weights, None)
    finally:
        for run in runs:
            run.close()


class LateRecord(Protocol):
    """Header metadata known only once the merge has run (the inputs' digests, hashed meanwhile by another
    thread): written first as `placeholder()`, then rewritten in place as `final()`, of the same length."""

    def placeholder(self) -> Mapping[str, str]: ...

    def final(self) -> Mapping[str, str]: ...


def _write_merged_file(
    output_file: Path,
    layout: Mapping[str, TensorInfo],
    metadata: Mapping[str, str] | None,
    rule: TensorRule,
    runs: Sequence[SafetensorsSource],
    weights: Sequence[float] | None,
    base: SafetensorsSource | None,
    late: LateRecord | None = None,
) -> list[str]:
    """One output file in `layout` (the first input's), written through a temp file: a crash never leaves
    half a file. Returns the tensors left unanchored (`merge_sources`)."""
    output_file.parent.mkdir(parents=True, exist_ok=True)
    staging = output_file.with_name(f".{output_file.name}.{uuid.uuid4().hex}.tmp")
    order = sorted(layout, key=lambda name: layout[name].offsets)
    header = _encode_header(layout, order, {**(metadata or {}), **(late.placeholder() if late else {})})
    try:
        with open(staging, "xb") as sink:
            unanchored = _stream_merged_tensors(
                sink,
                header,
                lambda emit: merge_sources(rule, runs, [n for n in order if layout[n].nbytes], emit, weights, base),
            )
            if late is not None:
                final = _encode_header(layout, order, {**(metadata or {}), **late.final()})
                if len(final) != len(header):
                    raise ValueError("a late record must encode to the length of its placeholder")
                sink.seek(0)
                sink.write(final)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(staging, output_file)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return unanchored


def _stream_merged_tensors(sink: BinaryIO, header: bytes, merge: Callable[[Callable], list[str]]) -> list[str]:
    """Header first (it depends only on the first input's layout), then each merged tensor in file order."""
    sink.write(header)
    return merge(lambda name, tensor: sink.write(_tensor_bytes(tensor)))


def _tensor_bytes(tensor: Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


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
    rule: TensorRule | None = None,
    base: str | Path | None = None,
    late: LateRecord | None = None,
    base_names: Mapping[str, str] | None = None,
) -> list[str]:
    """Merge transformers model folders into `output_dir` (weights, config, image processor config) with
    `rule` (the weighted mean by default; a rule anchored at `base` needs it, its tensors read under
    `base_names` where given). Returns the floating tensors the base lacks or shapes otherwise (a head for
    other labels): those take the weighted mean.

    Configs must agree on model type and labels, and every weight file on its tensors, before anything is
    written. Sharded checkpoints are merged shard by shard when all inputs are sharded the same way; each
    output file is written atomically, with `metadata` (the provenance record) in its header, and `late`'s
    final record too (a single-file merge only).
    """
    folders = [Path(p) for p in inputs]
    output_dir, rule = Path(output_dir), rule or MEAN
    headers = checked_headers(folders)
    files = list(headers)
    if late is not None and len(files) != 1:
        raise MergeError(f"{folders[0]}: a late record is written into single-file models; these are sharded")
    runs = [
        SafetensorsSource([folder / name for name in files], [headers[name][k] for name in files])
        for k, folder in enumerate(folders)
    ]
    anchor = _anchor_source(Path(base), runs[0], folders[0], base_names) if rule.needs_base else None
    unanchored = []
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            layout = headers[name][0]
            unanchored += _write_merged_file(output_dir / name, layout, metadata, rule, runs, weights, anchor, late)
    finally:
        for source in [*runs, *([anchor] if anchor else [])]:
            source.close()
    copied = COPIED_CONFIGS if files == [WEIGHTS_NAME] else (*COPIED_CONFIGS, WEIGHTS_INDEX_NAME)
    for name in copied:
        if (folders[0] / name).is_file():
            shutil.copyfile(folders[0] / name, output_dir / name)
    return unanchored


def _anchor_source(
    base: Path, first: SafetensorsSource, first_folder: Path, names: Mapping[str, str] | None
) -> SafetensorsSource:
    """The base's tensors (under `names`, stored name -> the inputs' name, where given: a headless base read as
    its fine-tunes name it), refused when it anchors none of the inputs' floating tensors."""
    paths = [base / name for name in _weight_files(base)]
    headers = [read_safetensors_header(path) for path in paths]
    if names is not None:
        headers = [{names[name]: info for name, info in header.items() if name in names} for header in headers]
    anchor = SafetensorsSource(paths, headers)
    if not any(
        first.is_floating(name) and anchor.signature(name) is not None and _shape(anchor, name) == _shape(first, name)
        for name in first.names()
    ):
        raise MergeError(f"{base}: shares no tensor with {first_folder}: not the model they were fine-tuned from")
    return anchor


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


# -- compatible entry points ------------------------------------------------------------------------


def merge_anchored_folders(
    inputs: Sequence[str | Path],
    base: str | Path,
    output_dir: str | Path,
    anchored: TensorRule,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """`merge_model_folders` with a rule anchored at `base` (Mixture.anchored): the same streaming engine."""
    return merge_model_folders(inputs, output_dir, metadata=metadata, rule=anchored, base=base)
