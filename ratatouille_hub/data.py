"""Target data, DomainBed style: leave one domain out, split each training domain 80/20 with a seed.

Images are decoded once into uint8 tensors at the training resolution (or, for a target too large to keep
decoded, `StreamedPixels`: the same bytes, decoded batch by batch by DataLoader workers); augmentation then
runs on whole batches of tensors on the training device, which is far cheaper than per-image PIL pipelines on
the host and needs no torchvision. The host only draws the random numbers, a few per image.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .environment import usable_cpus
from .errors import RatatouilleError


class DataError(RatatouilleError, ValueError):
    """A target dataset that cannot be used as asked."""


@dataclass(frozen=True)
class DomainSplit:
    """Row indices of one domain: `train` and `val` for a training domain, `test` for the held-out one."""

    domain: str
    train: tuple[int, ...]
    val: tuple[int, ...]


@dataclass(frozen=True)
class TargetSplits:
    label_names: tuple[str, ...]
    train_domains: tuple[DomainSplit, ...]
    held_out: DomainSplit  # split like the others (see domain_layout); all of it is the test set

    @property
    def test_domain(self) -> str:
        return self.held_out.domain

    @property
    def test(self) -> tuple[int, ...]:
        return self.held_out.train + self.held_out.val

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def domain_of_rows(self) -> dict[int, str]:
        """Every row's domain (for error lines that name a row)."""
        return {row: split.domain for split in (*self.train_domains, self.held_out) for row in split.train + split.val}


def column_values(dataset, column: str) -> list:
    """A column's values as Python objects (ids, not names, for a ClassLabel), read through Arrow whole: a
    `datasets` column iterated from Python formats one row at a time (about 30 us a row, 18 s at DomainNet's
    586k rows)."""
    return dataset.with_format("arrow")[column].to_pylist()


def label_names_of(dataset, label_column: str, *, name: str = "", domains=None) -> tuple[str, ...]:
    """The class names: a ClassLabel's own, else the column's distinct values in sorted order (a row
    without a value, None or NaN, is refused, naming it: it would be no class, and None does not sort)."""
    feature = dataset.features[label_column]
    if hasattr(feature, "names"):
        return tuple(feature.names)
    values = column_values(dataset, label_column)
    _refuse_missing_labels(values, label_column, name=name, domains=domains)
    _refuse_several_labels(values, label_column, name=name, domains=domains)
    return tuple(str(v) for v in sorted(set(values)))


def label_ids_of(
    dataset, label_column: str, label_names: tuple[str, ...], *, name: str = "", domains=None
) -> np.ndarray:
    """Every row's class id. A row without a label (None, or a ClassLabel's -1, the datasets library's "no
    label", NaN) or with a ClassLabel id outside its names is refused, naming it (`domains`: each row's domain,
    for the message): training would fail on it mid-run, or score it as a class no model predicts."""
    feature = dataset.features[label_column]
    column = column_values(dataset, label_column)
    _refuse_missing_labels(column, label_column, name=name, domains=domains)
    if not hasattr(feature, "names"):
        index = {label: i for i, label in enumerate(label_names)}
        return np.asarray([index[str(v)] for v in column], dtype=np.int64)
    ids = np.asarray(column, dtype=np.int64)
    outside = np.flatnonzero((ids < 0) | (ids >= len(label_names)))
    if outside.size:
        row = int(outside[0])
        value = int(ids[row])
        if value == -1:
            why = 'label -1, the datasets library\'s "no label"; every image needs a class'
        else:
            why = f"label {value}, not one of its {len(label_names)} ClassLabel names (ids 0 to {len(label_names) - 1})"
        raise DataError(f"{row_at(name, row, label_column, _domain(domains, row))}: {why}{_more(outside.size)}")
    return ids


def _refuse_missing_labels(values, label_column: str, *, name: str, domains=None) -> None:
    """None and NaN (how pandas writes a missing value) are no label: NaN != NaN, so each would be a class."""
    missing = [
        row for row, value in enumerate(values) if value is None or (isinstance(value, float) and math.isnan(value))
    ]
    if missing:
        where = row_at(name, missing[0], label_column, _domain(domains, missing[0]))
        value = "None" if values[missing[0]] is None else "NaN"
        raise DataError(f"{where}: no label ({value}); every image needs a class{_more(len(missing))}")


def _refuse_several_labels(values, label_column: str, *, name: str, domains=None) -> None:
    """A list (or mapping) of labels per image is a multi-label target: the recipe trains one class per image."""
    several = [row for row, value in enumerate(values) if isinstance(value, (list, tuple, dict))]
    if several:
        where = row_at(name, several[0], label_column, _domain(domains, several[0]))
        raise DataError(
            f"{where}: a {type(values[several[0]]).__name__} of labels; multi-label targets are not supported "
            f"(--label-column must name one class per image){_more(len(several))}"
        )


def row_at(name: str, row: int, column: str, domain: str | None = None) -> str:
    """Where a bad value is, for an error line: the dataset (`name`, when known), the row (as loaded, splits
    joined in sorted order), its domain (when known), and the column."""
    in_domain = f" (domain {domain!r})" if domain is not None else ""
    return f"{_dataset(name)}: row {row}{in_domain}, column {column!r}"


def _dataset(name: str) -> str:
    return f"dataset {name}" if name else "dataset"


def _domain(domains, row: int) -> str | None:
    return domains[row] if domains is not None else None


def _more(count: int) -> str:
    return f" ({count - 1} more rows like it)" if count > 1 else ""


def split_domains(
    dataset,
    *,
    domain_column: str,
    label_column: str,
    test_domain: str | None,
    holdout_fraction: float,
    seed: int,
    name: str = "",
) -> TargetSplits:
    """Leave-one-domain-out splits (`name`: the dataset, for error lines). The held-out domain's rows never
    enter train or validation."""
    for column in (domain_column, label_column):
        if column not in dataset.column_names:
            raise DataError(f"target dataset has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    domains_of_rows = _domain_names(dataset, domain_column, name)
    empty = [row for row, domain in enumerate(domains_of_rows) if not domain.strip()]
    if empty:
        raise DataError(
            f"target dataset: {len(empty)} row(s) have an empty {domain_column!r} (first: row {empty[0]}); "
            "every image needs a domain"
        )
    domains = sorted(set(domains_of_rows))
    if len(domains) < 2:
        raise DataError(f"leave-one-domain-out needs at least 2 domains, found {domains}")
    if test_domain is None:
        test_domain = domains[0]
    if test_domain not in domains:
        declared = getattr(dataset.features[domain_column], "names", None) or ()
        if test_domain in declared:
            raise DataError(f"test domain {test_domain!r} has no images")
        raise DataError(f"unknown test domain {test_domain!r}; domains: {', '.join(domains)}")
    label_names = label_names_of(dataset, label_column, name=name, domains=domains_of_rows)
    labels = label_ids_of(dataset, label_column, label_names, name=name, domains=domains_of_rows)

    rows_by_domain: dict[str, list[int]] = {d: [] for d in domains}
    for row, domain in enumerate(domains_of_rows):
        rows_by_domain[domain].append(row)

    layout = domain_layout(rows_by_domain, holdout_fraction, seed)
    train_domains = []
    for domain in domains:
        if domain == test_domain:
            continue
        rows = rows_by_domain[domain]
        if len(rows) < 2:
            raise DataError(f"domain {domain!r} has {len(rows)} image(s); a train/validation split needs 2 or more")
        if len(set(labels[rows].tolist())) < 2:
            raise DataError(f"domain {domain!r} holds a single class; it cannot train a classifier")
        train_domains.append(layout[domain])
    return TargetSplits(label_names, tuple(train_domains), layout[test_domain])


def domain_layout(rows_by_domain: dict[str, list[int]], holdout_fraction: float, seed: int) -> dict[str, DomainSplit]:
    """Every domain's 80/20 split, whichever domain is held out: a domain's split depends on the seed and
    its own name only, so one decoded copy of the target, laid out domain by domain as (train, val),
    serves every held-out domain; the held-out domain's images are its (train, val) rows, in that order."""
    layout = {}
    for domain, rows in rows_by_domain.items():
        rows = np.asarray(rows)
        order = np.random.default_rng(_domain_seed(seed, domain)).permutation(len(rows))
        n_val = max(1, int(math.floor(len(rows) * holdout_fraction)))
        val, train = rows[order[:n_val]], rows[order[n_val:]]
        layout[domain] = DomainSplit(domain, tuple(sorted(train.tolist())), tuple(sorted(val.tolist())))
    return layout


def _domain_names(dataset, domain_column: str, name: str) -> list[str]:
    """The domain of every row as text: a ClassLabel column by its names; a missing value (None, or the
    ClassLabel's -1) is ''; a ClassLabel id outside its names is refused, naming the row."""
    names = getattr(dataset.features[domain_column], "names", None)
    values = column_values(dataset, domain_column)
    if names is None:
        return ["" if v is None else str(v) for v in values]
    for row, value in enumerate(values):
        if value is not None and not -1 <= value < len(names):
            raise DataError(
                f"{row_at(name, row, domain_column)}: domain {value}, not one of its {len(names)} ClassLabel names "
                f"(ids 0 to {len(names) - 1})"
            )
    return ["" if v is None or v == -1 else names[v] for v in values]


def _domain_seed(seed: int, domain: str) -> int:
    return int.from_bytes(hashlib.sha256(f"split:{seed}:{domain}".encode()).digest()[:8], "little")


@dataclass
class ImageTensors:
    """Images (uint8, N x 3 x S x S: decoded, or `StreamedPixels` decoded when read) and their labels."""

    pixels: torch.Tensor | StreamedPixels
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def evenly_spaced(images: ImageTensors, count: int) -> ImageTensors:
    """At most `count` images, spread evenly over the set (a fixed, order-preserving sample; of streamed
    images, streamed images: read by DataLoader workers when they are read)."""
    rows = torch.linspace(0, len(images) - 1, min(len(images), count)).long()
    pixels = images.pixels
    return ImageTensors(pixels.taken(rows) if isinstance(pixels, StreamedPixels) else pixels[rows], images.labels[rows])


DECODE_CHUNK = 256  # images decoded at a time: the PIL images of a whole split at once would not fit


def image_entries(dataset, column: str, *, name: str = "", files=None, domains=None):
    """`dataset` with `column` as an undecoded `datasets.Image` (each row: image bytes, or a path to read them
    from), cast from whatever `datasets.Image()` accepts (an Image feature, image bytes, path strings);
    anything else is refused, naming the column and its type. It reads the column, never an image: what
    only decoding can find is `decode_images`'s to refuse.

    A path in someone else's dataset may name any file (/etc/passwd). With `files` (a `sources.ImageFiles`)
    a path is read only inside `files.folder`, and from a column of path strings only if `files.strings`
    (never from the Hub); without it, path strings are refused and an Image feature's paths (the files
    `datasets` itself found) are read as they are. A row without an image is refused, naming it
    (`domains`: each row's domain, for the line)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = dataset.features[column]
    try:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    except (TypeError, ValueError, pa.ArrowException):
        raise DataError(
            f"{_dataset(name)}: column {column!r} holds {feature}, which datasets.Image() cannot read as images "
            "(it reads image bytes, file paths and Image features)"
        ) from None
    entries = dataset.with_format("arrow")[column]
    has_bytes = pc.is_valid(pc.struct_field(entries, "bytes")).to_numpy(zero_copy_only=False)
    paths = pc.struct_field(entries, "path")
    missing = np.flatnonzero(~has_bytes & ~pc.is_valid(paths).to_numpy(zero_copy_only=False))
    if missing.size:
        row = int(missing[0])
        where = row_at(name, row, column, _domain(domains, row))
        raise DataError(f"{where}: no image (neither image bytes nor a path){_more(missing.size)}")
    read = np.flatnonzero(~has_bytes)
    strings = not isinstance(feature, datasets.Image)
    if not read.size or (files is None and not strings):
        return dataset
    folder = os.path.abspath(files.folder) if files is not None else None
    for row, path in zip(read.tolist(), paths.take(read).to_pylist()):
        where = row_at(name, row, column, _domain(domains, row))
        if strings and (files is None or not files.strings):
            source = "a Hub dataset's" if files is not None else "this dataset's"
            raise DataError(
                f"{where}: a file path ({path!r}); {source} path strings are never read (they may name any file "
                "here): its images must be in it, as bytes or an Image feature"
            )
        if _outside(path, folder):
            raise DataError(
                f"{where}: the path {path!r} leads outside the dataset's folder {files.folder}; only files inside "
                "it are read"
            )
    return dataset


def _outside(path: str, folder: str) -> bool:
    """Whether `path` (relative to `folder`, an absolute path, or absolute) leads out of `folder`, or is a URL
    `datasets` would fetch. By the names only: a symlink inside the folder is the folder owner's own."""
    if ".." not in path and ":" not in path and (path.startswith(folder + os.sep) or not path.startswith(os.sep)):
        return False  # no scheme, no way up: decided without normalising (DomainNet has 600k rows)
    if urlparse(path).scheme:
        return True
    return os.path.commonpath([folder, os.path.normpath(os.path.join(folder, path))]) != folder


def decode_images(
    dataset,
    rows,
    *,
    image_column: str,
    label_column: str,
    label_names,
    size: int,
    into: torch.Tensor | None = None,
    name: str = "",
    domain: str | None = None,
    root: Path | None = None,
) -> ImageTensors:
    """Decode `rows` into uint8 tensors resized to size x size (bilinear, as the image processors do),
    into a new tensor or the given one (`into`, e.g. a slice of a memory-mapped cache). Relative image
    paths are read in `root` (the dataset's folder). An image Pillow cannot decode (truncated, not an
    image, over its decompression-bomb limit) is refused, naming its row (`name`, `domain`: the dataset and
    the rows' domain, for that line)."""
    import datasets

    rows = list(rows)
    labels = label_ids_of(dataset, label_column, tuple(label_names), name=name)[rows]
    if dataset.features[image_column] != datasets.Image(decode=False):
        dataset = image_entries(dataset, image_column, name=name)
    pixels = torch.empty((len(rows), 3, size, size), dtype=torch.uint8) if into is None else into
    ImageSource(dataset, image_column, size, root, name).decode_into(pixels, rows, [domain] * len(rows))
    return ImageTensors(pixels, torch.from_numpy(labels))


@dataclass(frozen=True)
class ImageSource:
    """What decoding a row of a dataset needs: its image entries (`image_entries`), the training size, the
    folder relative paths are read in, and the dataset's name for error lines."""

    entries: object  # a datasets.Dataset whose image column is an undecoded datasets.Image
    image_column: str
    size: int
    root: Path | None
    name: str

    def decode_into(self, pixels: torch.Tensor, rows: Sequence[int], domains: Sequence[str | None]) -> None:
        """Decode each of `rows` (of `domains`, one each, for error lines) into the same place of `pixels`."""
        import datasets
        from PIL import Image

        decoder = datasets.Image()
        for start in range(0, len(rows), DECODE_CHUNK):
            chunk = list(rows[start : start + DECODE_CHUNK])
            for i, (row, entry) in enumerate(zip(chunk, self.entries.select(chunk)[self.image_column]), start):
                try:
                    image = _decode(decoder, entry, self.root)
                except (
                    OSError,
                    ValueError,
                    SyntaxError,
                    EOFError,
                    Image.DecompressionBombError,
                    Image.DecompressionBombWarning,
                ) as error:
                    where = row_at(self.name, row, self.image_column, domains[i])
                    raise DataError(f"{where}: {_undecodable(error, entry)}") from None
                if image.size != (self.size, self.size):
                    image = image.resize((self.size, self.size), Image.BILINEAR)
                pixels[i] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class StreamedPixels:
    """The uint8 images (N x 3 x S x S) of some rows of a dataset, decoded from their files each time they are
    read: what a target too large to keep decoded holds in place of a tensor. A slice or a list of positions
    reads as that tensor's would, byte for byte (one decoder: `ImageSource`); `pixel_batches` and
    `DomainBatches` read it through DataLoader workers. It holds a row number and a domain id per image,
    never pixels."""

    def __init__(self, source: ImageSource, rows: np.ndarray, domains: tuple[str, ...], domain_ids: np.ndarray):
        self.source, self.rows, self.domains, self.domain_ids = source, rows, domains, domain_ids

    @classmethod
    def of_domain(cls, source: ImageSource, domain: str, rows: Sequence[int]) -> StreamedPixels:
        return cls(source, np.asarray(rows, dtype=np.int64), (domain,), np.zeros(len(rows), dtype=np.int32))

    @classmethod
    def joined(cls, parts: Sequence[StreamedPixels]) -> StreamedPixels:
        """`parts` one after the other (all of one source), as torch.cat joins tensors."""
        domains = tuple(dict.fromkeys(domain for part in parts for domain in part.domains))
        ids = [np.asarray([domains.index(d) for d in part.domains], dtype=np.int32)[part.domain_ids] for part in parts]
        return cls(parts[0].source, np.concatenate([part.rows for part in parts]), domains, np.concatenate(ids))

    def taken(self, positions) -> StreamedPixels:
        """The images at `positions` (a 1-D list or tensor), still undecoded."""
        positions = np.asarray(positions, dtype=np.int64)
        return StreamedPixels(self.source, self.rows[positions], self.domains, self.domain_ids[positions])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), 3, self.source.size, self.source.size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        """The images at a slice or a 1-D list (or tensor) of positions, decoded into a new tensor."""
        positions = _positions(index, len(self))
        pixels = torch.empty((len(positions), 3, self.source.size, self.source.size), dtype=torch.uint8)
        domains = [self.domains[d] for d in self.domain_ids[positions].tolist()]
        self.source.decode_into(pixels, self.rows[positions].tolist(), domains)
        return pixels


def _positions(index, count: int) -> np.ndarray:
    """A slice, or a 1-D list or tensor of positions (negative ones from the end), as positions in [0, count):
    how streamed and joined images are read."""
    if isinstance(index, slice):
        return np.arange(*index.indices(count))
    positions = np.asarray(index, dtype=np.int64)
    if positions.ndim != 1:
        raise TypeError(f"images are read by a slice or a 1-D list of positions, not {index!r}")
    positions = np.where(positions < 0, positions + count, positions)
    if len(positions) and (positions.min() < 0 or positions.max() >= count):
        raise IndexError(f"position out of range for {count} images")
    return positions


class JoinedPixels:
    """Decoded images of several tensors (views of the target's memory map) read as if concatenated, without
    the copy: the validation images of every training domain pooled at DomainNet's size are about 15 GB at
    224 px. A slice or a 1-D list of positions reads as torch.cat's would, into a new tensor of those images."""

    def __init__(self, parts: Sequence[torch.Tensor]):
        self.parts = list(parts)
        self.ends = np.cumsum([len(part) for part in self.parts])

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.ends[-1]) if len(self.ends) else 0, *self.parts[0].shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        positions = _positions(index, len(self))
        which = np.searchsorted(self.ends, positions, side="right")
        pixels = torch.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        for part in np.unique(which).tolist():
            at = np.flatnonzero(which == part)
            start = int(self.ends[part - 1]) if part else 0
            pixels[torch.from_numpy(at)] = self.parts[part][torch.from_numpy(positions[at] - start)]
        return pixels


def join_pixels(parts: Sequence[torch.Tensor | StreamedPixels]) -> torch.Tensor | StreamedPixels | JoinedPixels:
    """The images of `parts` one after the other, never copied: streamed images joined undecoded, tensors
    joined where they lie (one part: itself)."""
    if all(isinstance(part, StreamedPixels) for part in parts):
        return StreamedPixels.joined(parts)
    if len(parts) == 1:
        return parts[0]
    return JoinedPixels(parts)


def decode_workers() -> int:
    """DataLoader workers that decode streamed images: this process's share of the CPUs it may run on (each
    accelerate process of a machine, LOCAL_WORLD_SIZE of them, starts its own)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, usable_cpus() // max(1, processes))


def decoded_batches(
    images: ImageTensors, batches: Iterable[Sequence[int]], *, workers: int, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, labels) of each list of positions in `batches`, in order, decoded ahead by `workers` DataLoader
    workers (forked: they share the dataset, and read each row's file themselves; 0: by this process). An
    image that does not decode is the worker's DataError, raised here as its own line, not as a traceback."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Decoding(images),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # its workers' seeds: from torch's global generator, they would shift dropout's
    )
    for batch in loader:
        if isinstance(batch, DataError):
            raise batch
        yield batch


@dataclass(frozen=True)
class _Decoding:
    """A DataLoader's dataset of `images`: a batch, or the DataError that stopped it (pickled back whole)."""

    images: ImageTensors

    def __getitems__(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | DataError:
        try:
            return self.images.pixels[positions], self.images.labels[positions]
        except DataError as error:
            return error


def _as_is(batch):
    return batch


def pixel_batches(images: ImageTensors, batch_size: int) -> Iterator[torch.Tensor]:
    """The images in consecutive batches of `batch_size`: slices of a tensor, or streamed images decoded by
    DataLoader workers (what evaluation reads, so that it never holds more than a few batches)."""
    if not isinstance(images.pixels, StreamedPixels):
        for start in range(0, len(images), batch_size):
            yield images.pixels[start : start + batch_size]
        return
    ranges = [range(start, min(start + batch_size, len(images))) for start in range(0, len(images), batch_size)]
    workers = decode_workers() if len(ranges) > 1 else 0  # one batch: no worker would overlap with anything
    for pixels, _ in decoded_batches(images, ranges, workers=workers):
        yield pixels


def _decode(decoder, entry: dict, root: Path | None):
    """One row's image as RGB, by `datasets`' own decoder (EXIF orientation applied, as it always was)."""
    from PIL import Image

    if entry["bytes"] is None and root is not None:
        entry = {"bytes": None, "path": os.path.join(root, entry["path"])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # one line, not a warning then a decode
        image = decoder.decode_example(entry)
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: RGB keeps whole numbers 0-255 only
        values = np.asarray(image)  # (getextrema refuses the I;16B/L/N modes big-endian TIFFs open as)
        low, high = values.min().item(), values.max().item()
        if low < 0 or high > 255 or (image.mode == "F" and 0 < high <= 1):
            raise ValueError(
                f"an {image.mode} (high bit depth) image with values from {low:g} to {high:g}: as RGB (how it is "
                "trained on, and how transformers' processors serve it) they become whole numbers 0-255 (clipped; a "
                "0-1 float image black); convert the images to 8 bits first"
            )
    return image.convert("RGB")


def _undecodable(error: Exception, entry: dict) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):  # its message holds an object address: say it in our words
        what = "its bytes are" if entry["bytes"] is not None else f"the file {entry['path']} is"
        return f"{what} not an image Pillow can read"
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error).strip().splitlines()[0]  # "image file is truncated (...)", Pillow's bomb limit, ...


@functools.cache
def _channel_values(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    """Per-channel statistics as a (1, 3, 1, 1) tensor on `device`, made once: copying them there on every
    batch would make the host wait for the GPU's queue to empty at each step."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


RGB = (0, 1, 2)
BGR = (2, 1, 0)  # MobileViT's processors flip the channels and do not normalise
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean and std that leave [0, 1] pixels as they are


@dataclass(frozen=True)
class Normalization:
    """What the base's processor does to a [0, 1] pixel: channel `c` of the model's input is
    (x[channels[c]] - mean[c]) / std[c]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: tuple[int, int, int] = RGB

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise floats in [0, 1] (batches, channels first), on their device."""
        if self.channels != RGB:
            x = x[:, list(self.channels)]
        return (x - _channel_values(self.mean, x.device)) / _channel_values(self.std, x.device)

    def fingerprint(self) -> dict:
        """What a target's fingerprint records of it: the channel order only where it is not RGB, so the
        fingerprints (and run keys) of RGB bases stay those made before it was read."""
        stats = {"mean": list(self.mean), "std": list(self.std)}
        return stats if self.channels == RGB else {**stats, "channels": list(self.channels)}

    def from_uint8(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        return self(pixels_uint8.float().div_(255.0))


@dataclass(frozen=True)
class AugmentationDraws:
    """One batch's random augmentation, per image (host tensors, a few numbers each): the crop as an affine
    map, the rows to flip and to grey, and the brightness, contrast and saturation factors."""

    theta: torch.Tensor  # n x 2 x 3, for affine_grid
    flip_rows: torch.Tensor
    jitter: torch.Tensor  # n x 3 x 1 x 1 x 1
    gray_rows: torch.Tensor


def draw_augmentation(n: int, generator: torch.Generator) -> AugmentationDraws:
    """Every random draw of a batch's augmentation, from `generator` (a CPU generator) in one fixed order, so a
    run's augmentation is the same on every device: RandomResizedCrop(scale 0.7-1, ratio 3/4-4/3), horizontal
    flip, ColorJitter(0.3 brightness, contrast, saturation; hue omitted), RandomGrayscale(0.1)."""
    u = torch.rand((n, 6), generator=generator)
    jitter = 1.0 + (torch.rand((n, 3, 1, 1, 1), generator=generator) * 0.6 - 0.3)
    # Crop box as fractions of the image, resampled back to full size by one batched affine map.
    area = 0.7 + 0.3 * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    crop_w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    crop_h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    center_x = (1 - crop_w) * u[:, 2] + crop_w / 2
    center_y = (1 - crop_h) * u[:, 3] + crop_h / 2
    theta = torch.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2] = crop_w, 2 * center_x - 1
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, 2 * center_y - 1
    flip_rows = torch.nonzero(u[:, 4] < 0.5).squeeze(1)
    gray_rows = torch.nonzero(u[:, 5] < 0.1).squeeze(1)
    return AugmentationDraws(theta, flip_rows, jitter, gray_rows)


def apply_augmentation(pixels_uint8: torch.Tensor, draws: AugmentationDraws) -> torch.Tensor:
    """The per-pixel work of `draws` on a uint8 batch, as batched ops on the batch's device; returns floats in
    [0, 1]. Rows are picked by index, not by mask: a mask on a GPU would make the host wait for the device."""
    device = pixels_uint8.device
    theta, jitter = draws.theta.to(device, non_blocking=True), draws.jitter.to(device, non_blocking=True)
    flip_rows, gray_rows = draws.flip_rows.to(device, non_blocking=True), draws.gray_rows.to(device, non_blocking=True)
    x = pixels_uint8.float().div_(255.0)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out[flip_rows] = out[flip_rows].flip(-1)
    out = (out * jitter[:, 0]).clamp_(0, 1)  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * jitter[:, 1] + mean).clamp_(0, 1)  # contrast
    gray = 0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]
    out = ((out - gray) * jitter[:, 2] + gray).clamp_(0, 1)  # saturation
    if len(draws.gray_rows):  # known on the host: no wait for the device
        g = 0.299 * out[gray_rows, 0:1] + 0.587 * out[gray_rows, 1:2] + 0.114 * out[gray_rows, 2:3]
        out[gray_rows] = g.expand(-1, 3, -1, -1)
    return out


def augment(pixels_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DomainBed training augmentation of a uint8 batch on its device, drawn from `generator` (see
    `draw_augmentation`); returns floats in [0, 1]."""
    return apply_augmentation(pixels_uint8, draw_augmentation(pixels_uint8.shape[0], generator))


def normalization_of(processor, model: str = "the base") -> Normalization:
    """What the base's processor does to a pixel (`model`: what the user called the base, for error lines): a
    timm `data_config`'s mean/std; a transformers processor's mean/std, none where it does not normalise, and
    its channel flip, checked against the processor itself (`_read_off`), whose own figures win where its
    settings say less than it does (EfficientNet's include_top divides by std twice). Anything but 3 finite
    numbers, and a std that is not positive, is refused, naming the file and key: it would fail or divide by
    zero only once training runs."""
    timm_config = getattr(processor, "data_config", None) or {}
    mean = getattr(processor, "image_mean", None) or timm_config.get("mean")
    std = getattr(processor, "image_std", None) or timm_config.get("std")
    if mean is None or std is None:
        raise DataError(f"{type(processor).__name__} declares no normalisation mean/std")
    where, prefix = _processor_file(processor, model)
    for key, values, positive in (("mean", mean, False), ("std", std, True)):
        numbers = isinstance(values, (list, tuple)) and len(values) == 3 and all(map(_is_number, values))
        if not numbers or (positive and min(values) <= 0):
            what = "positive numbers" if positive else "numbers"
            raise DataError(f"{where}: {prefix}{key} must be 3 {what} (got {_listed(values)})")
    declared = Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std))  # type: ignore[arg-type]
    if timm_config:
        return declared
    if not getattr(processor, "do_normalize", True):  # None too: transformers' processors then leave it out
        declared = Normalization(*IDENTITY)
    if getattr(processor, "do_flip_channel_order", False):
        declared = Normalization(declared.mean, declared.std, BGR)
    measured = _read_off(processor, where)
    normalization = declared if measured is None or _reproduces(declared, measured) else measured
    if normalization.channels != RGB and (normalization.channels, normalization.mean, normalization.std) != (
        BGR,
        *IDENTITY,
    ):
        raise DataError(
            f"{where}: {type(processor).__name__} reorders the channels {_listed(normalization.channels)} and "
            f"normalises (mean {_listed(normalization.mean)}, std {_listed(normalization.std)}); only a BGR flip "
            "with no normalisation can be saved as a transformers processor: the soup could not be served as "
            "it was evaluated"
        )
    return normalization


# A black image, one of each primary at full strength, and a mid grey (which checks the map is affine).
_PROBES = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128))


def _read_off(processor, where: str) -> Normalization | None:
    """The processor's output, channel by channel, for each of `_PROBES` as a plain image (a constant image
    stays constant through any resize or crop), as numpy arrays or, for a processor that only returns torch
    tensors, as those. None where the processor cannot take such an image: then its settings are all there is
    to go by, as before this check."""
    from PIL import Image

    images = [Image.new("RGB", (64, 64), colour) for colour in _PROBES]
    for tensors in ("np", "pt"):
        try:
            values = np.asarray(processor(images=images, return_tensors=tensors)["pixel_values"], dtype=np.float64)
            break
        except Exception:  # noqa: BLE001 - any processor's failure on a plain image means: no reading
            pass
    else:
        return None
    if values.ndim != 4 or values.shape[:2] != (len(_PROBES), 3):
        return None
    return _affine_map(values[:, :, values.shape[2] // 2, values.shape[3] // 2], type(processor).__name__, where)


def _affine_map(out: np.ndarray, processor: str, where: str) -> Normalization:
    """The Normalization giving `out` (probe x channel): each output channel a scale and shift of one input
    channel. A processor doing anything else (mixing channels, a curve) is refused: the product trains on its
    own decoded pixels and could not feed the base what its processor does."""
    mean, std, channels = [], [], []
    for c in range(3):
        shift = out[0, c]
        responses = out[1:4, c] - shift
        source = int(np.argmax(np.abs(responses)))
        scale = responses[source]
        others = np.delete(np.abs(responses), source)
        grey = scale * 128 / 255 + shift
        if scale == 0 or others.max() > 1e-4 * abs(scale) or abs(grey - out[4, c]) > 1e-3 * max(1.0, abs(grey)):
            raise DataError(
                f"{where}: {processor} maps pixel values in a way that is not a scale and shift of each channel, "
                "which ratatouille-hub cannot reproduce in training"
            )
        mean.append(float(-shift / scale))
        std.append(float(1 / scale))
        channels.append(source)
    return Normalization(tuple(mean), tuple(std), tuple(channels))  # type: ignore[arg-type]


def _reproduces(declared: Normalization, measured: Normalization) -> bool:
    """Whether the settings give the processor's own output (to float32 rounding) on black and full strength."""
    if declared.channels != measured.channels:
        return False
    for x in (0.0, 1.0):
        for c in range(3):
            ours = (x - declared.mean[c]) / declared.std[c]
            theirs = (x - measured.mean[c]) / measured.std[c]
            if abs(ours - theirs) > 1e-4 * max(1.0, abs(theirs)):
                return False
    return True


def _processor_file(processor, model: str) -> tuple[str, str]:
    """Where a processor's values come from, and the prefix of their keys there: a timm wrapper's from its
    config.json's `pretrained_cfg`, any other's from preprocessor_config.json."""
    if getattr(processor, "data_config", None):
        return f"{model}/config.json", "pretrained_cfg."
    return f"{model}/preprocessor_config.json", "image_"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _listed(values) -> str:
    return repr(list(values)) if isinstance(values, (list, tuple)) else repr(values)


def resolution_of(processor, override: int | None, model: str = "the base") -> int:
    """Training resolution: the override, else what the base's image processor feeds the model (`model`: what
    the user called the base); a size that is not a positive whole number is refused, naming the file and key."""
    if override:
        return override
    where, _ = _processor_file(processor, model)
    timm_config = getattr(processor, "data_config", None) or {}
    if timm_config.get("input_size"):
        return _positive_size(timm_config["input_size"][-1], where, "pretrained_cfg.input_size")
    cropped = getattr(processor, "do_center_crop", True) is not False  # no crop: the model sees `size`
    for name in ("crop_size", "size") if cropped else ("size",):
        size = getattr(processor, name, None)
        if isinstance(size, int):
            return _positive_size(size, where, name)
        for key in ("height", "shortest_edge"):
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if value is not None:
                return _positive_size(value, where, f"{name}.{key}")
    raise DataError("cannot tell the training resolution from the image processor; pass --image-size")


def _positive_size(value, where: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DataError(f"{where}: {key} must be a positive whole number of pixels (got {value!r})")
    return value
