"""The data stage: a target dataset described (splits, fingerprint: cheap, what a plan needs) and decoded
(pixels: what training, evaluation and assembly need).

Describing reads the dataset's columns and never decodes an image, so `recycle --dry-run` can name every
run folder of a recipe without the cost of decoding the target.

Decoding keeps the target decoded where that fits: in the output's cache (memory-mapped by every process), or
in memory where there is no cache. A target whose decoded copy would not fit (over --cache-budget-gb, the free
disk, or half the available memory) is streamed instead: each batch decoded from the dataset's own files by
DataLoader workers. Streamed rather than cached in compressed shards, because the dataset's files already are
a compressed copy (a lossless one of the decoded pixels would still mean tens of GB for DomainNet and a decode
of every image before the first step): streaming costs no disk and no wait, and decodes each image it reads
with the decoder the cache uses, so the pixels, and every run's bytes, are the same either way.
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import TargetCache, builds, materialize
from .data import (
    DECODE_CHUNK,
    DataError,
    DomainSplit,
    ImageSource,
    ImageTensors,
    StreamedPixels,
    decode_images,
    image_entries,
    label_ids_of,
    normalization_of,
    pixel_batches,
    resolution_of,
    split_domains,
)
from .evaluation import INFERENCE_BATCH, accuracy, predict_logits
from .fetch import Ingredient, dataset_revision, resolve_dataset, split_revision
from .hashing import stable_hash
from .logs import bar_disable
from .models import load_processor, refuse_image_size
from .sources import image_files_of, load_dataset_source
from .train import TargetData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetSpec:
    """The target as a plan sees it: which rows go where, at which resolution, under which fingerprint."""

    reference: str  # id@sha for a Hub dataset, else the path
    train_domains: tuple[str, ...]
    test_domain: str
    id2label: dict[int, str]
    fingerprint: str
    train_sizes: tuple[int, ...]  # images per training domain
    val_size: int
    test_size: int
    image_size: int


@dataclass(frozen=True)
class Target:
    """The decoded target task: training domains (train/val) and the held-out test domain."""

    reference: str
    data: TargetData
    test: ImageTensors
    train_domains: tuple[str, ...]
    test_domain: str
    id2label: dict[int, str]
    fingerprint: str


class TargetPreparation:
    """A loaded dataset and its splits: what both describing and decoding start from."""

    def __init__(self, options, base: Ingredient, token=None):
        target_id, self.domain_column, self.label_column = resolve_dataset(
            options.target, options.domain_column, options.label_column
        )
        self.image_column = options.image_column
        target_id, pinned = split_revision(target_id)  # `org/name@rev` reads that revision, like --aux
        revision = dataset_revision(target_id, token, pinned)
        self.reference = f"{target_id}@{revision}" if revision else target_id
        dataset = load_dataset_source(target_id, revision=revision, token=token)
        if self.image_column not in dataset.column_names:
            raise DataError(
                f"target dataset has no column {self.image_column!r} (columns: {', '.join(dataset.column_names)})"
            )
        self.dataset_fingerprint = getattr(dataset, "_fingerprint", target_id)
        self.splits = split_domains(
            dataset,
            domain_column=self.domain_column,
            label_column=self.label_column,
            test_domain=options.test_domain,
            holdout_fraction=options.holdout_fraction,
            seed=options.seed,
            name=self.reference,
        )
        self.image_files = image_files_of(target_id)
        self.dataset = image_entries(
            dataset, self.image_column, name=self.reference, files=self.image_files, domains=self.splits.domain_of_rows
        )
        budget = options.cache_budget_gb
        self.budget = None if budget is None else int(budget * 1e9)  # bytes the decoded target may take
        processor = load_processor(base.path, base.source)
        self.size = resolution_of(processor, options.image_size, base.source)
        self.normalize = normalization_of(processor, base.source)
        self.fingerprint = stable_hash(
            {
                "dataset": self.dataset_fingerprint,
                "splits": [[d.domain, d.train, d.val] for d in self.splits.train_domains],
                "test": self.splits.test_domain,
                "size": self.size,
                "normalize": self.normalize.fingerprint(),
            }
        )

    def spec(self) -> TargetSpec:
        domains = self.splits.train_domains
        return TargetSpec(
            reference=self.reference,
            train_domains=tuple(d.domain for d in domains),
            test_domain=self.splits.test_domain,
            id2label=self.splits.id2label,
            fingerprint=self.fingerprint,
            train_sizes=tuple(len(d.train) for d in domains),
            val_size=sum(len(d.val) for d in domains),
            test_size=len(self.splits.test),
            image_size=self.size,
        )

    def decode(self, cache: Path | None = None) -> Target:
        """The target: with `cache`, memory-mapped from the copy decoded there once (see `_mapped`); without,
        decoded into memory; streamed (see the module's docstring) where that copy would not fit."""
        if cache is None:
            room = _available_memory() // 2
            streamed = self._over_budget() or self._over(room, "half the available memory")
            decoded, test = self._streamed() if streamed else self._in_memory()
        else:
            decoded, test = self._mapped(cache)
        domains = self.splits.train_domains
        data = TargetData(
            train=[decoded[d.domain][0] for d in domains],
            val=[decoded[d.domain][1] for d in domains],
            normalize=self.normalize,
        )
        return Target(
            reference=self.reference,
            data=data,
            test=test,
            train_domains=tuple(d.domain for d in domains),
            test_domain=self.splits.test_domain,
            id2label=self.splits.id2label,
            fingerprint=self.fingerprint,
        )

    @property
    def decoded_bytes(self) -> int:
        """What the decoded target takes: every image's pixels at the training size, and its label."""
        rows = sum(len(d.train) + len(d.val) for d in self._domains)
        return rows * (3 * self.size * self.size + np.dtype(np.int64).itemsize)

    def _over_budget(self) -> bool:
        return self.budget is not None and self._over(self.budget, f"the cache budget ({_sized(self.budget)})")

    def _over(self, room: int, what: str) -> bool:
        """Whether the decoded target exceeds `room` (`what`: that room, for the line saying it is streamed)."""
        if self.decoded_bytes + CACHE_OVERHEAD <= room:
            return False
        log.info(
            f"[data] the decoded target would take {_sized(self.decoded_bytes)}, more than {what}: its images are "
            "decoded batch by batch from the dataset's files instead (the same pixels)"
        )
        return True

    def _in_memory(self) -> tuple[dict[str, tuple[ImageTensors, ImageTensors]], ImageTensors]:
        decoded = {
            split.domain: tuple(self.decode_rows(split, rows) for rows in (split.train, split.val))
            for split in self._domains
        }
        return decoded, self.decode_rows(self.splits.held_out, self.splits.test)

    def _streamed(self) -> tuple[dict[str, tuple[ImageTensors, ImageTensors]], ImageTensors]:
        """Every split as images decoded when read (`StreamedPixels`), with the labels the cache would hold."""
        labels = torch.from_numpy(self.labels)

        def images(split: DomainSplit, rows: tuple[int, ...]) -> ImageTensors:
            pixels = StreamedPixels.of_domain(self.source, split.domain, rows)
            return ImageTensors(pixels, labels[torch.as_tensor(rows, dtype=torch.long)])

        decoded = {split.domain: (images(split, split.train), images(split, split.val)) for split in self._domains}
        return decoded, images(self.splits.held_out, self.splits.test)

    @property
    def source(self) -> ImageSource:
        return ImageSource(self.dataset, self.image_column, self.size, self.image_files.folder, self.reference)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Every row's class id (what the cache's labels hold): an array, read once, of 8 bytes a row."""
        return label_ids_of(self.dataset, self.label_column, self.splits.label_names, name=self.reference)

    @property
    def _domains(self) -> list[DomainSplit]:
        return sorted([*self.splits.train_domains, self.splits.held_out], key=lambda split: split.domain)

    def decode_rows(self, split: DomainSplit, rows, into: torch.Tensor | None = None) -> ImageTensors:
        return decode_images(
            self.dataset,
            rows,
            image_column=self.image_column,
            label_column=self.label_column,
            label_names=self.splits.label_names,
            size=self.size,
            into=into,
            name=self.reference,
            domain=split.domain,
            root=self.image_files.folder,
        )

    def _mapped(self, cache: Path) -> tuple[dict[str, tuple[ImageTensors, ImageTensors]], ImageTensors]:
        """Every domain's (train, val) images as views of one uint8 array in `cache/<key>/`, decoded by the
        first process to need it, domain by domain as (train, val) rows: each split, and the held-out
        domain whole, is then one contiguous slice, shared through the page cache by every process and
        rerun, whichever domain is held out. The key covers the data's fingerprint, the layout and the size.
        A finished copy is read whatever the budget; where none is and it would not fit the budget or the
        free disk, the target is streamed."""
        domains = self._domains
        key = stable_hash(
            {
                "dataset": self.dataset_fingerprint,
                "columns": [self.image_column, self.label_column, self.domain_column],
                "labels": list(self.splits.label_names),
                "layout": [[d.domain, d.train, d.val] for d in domains],
                "size": self.size,
            }
        )
        if not TargetCache(cache / key).is_done:
            if self._over_budget():
                return self._streamed()
            try:
                materialize(TargetCache, cache / key, self, domains)
            except _NoRoom as no_room:
                self._over(no_room.free, f"the {_sized(no_room.free)} free in {cache}")
                return self._streamed()
        cached = TargetCache(cache / key)
        pixels, labels = cached.pixels(), cached.labels()
        decoded, start = {}, 0
        for split in domains:
            cut, end = start + len(split.train), start + len(split.train) + len(split.val)
            decoded[split.domain] = (
                ImageTensors(pixels[start:cut], labels[start:cut]),
                ImageTensors(pixels[cut:end], labels[cut:end]),
            )
            if split.domain == self.splits.test_domain:
                test = ImageTensors(pixels[start:end], labels[start:end])
            start = end
        return decoded, test


@builds(TargetCache)
def _decode_into_cache(staging: Path, preparation: TargetPreparation, domains: list[DomainSplit]) -> None:
    """Decode `domains` (train then val rows, domain after domain) into one .npy array: chunks of images
    decoded by DataLoader workers (`pixel_batches`), written in order with plain writes, so the process holds
    a few chunks whatever the target's size (pages written through a memory map would count as its own until
    the kernel wrote them back)."""
    size = preparation.size
    _require_room(staging.parent, preparation.decoded_bytes)
    parts = [StreamedPixels.of_domain(preparation.source, d.domain, d.train + d.val) for d in domains]
    rows = np.concatenate([part.rows for part in parts])
    labels = preparation.labels[rows]
    images = ImageTensors(StreamedPixels.joined(parts), torch.from_numpy(labels))
    cache = TargetCache(staging)
    with open(cache.pixels_file, "wb") as file:
        header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (len(rows), 3, size, size)}
        np.lib.format.write_array_header_1_0(file, header)  # what np.save writes, and np.load maps
        chunks = -(-len(rows) // DECODE_CHUNK)
        batches = pixel_batches(images, DECODE_CHUNK)
        decoded = tqdm(batches, "decoding the target", chunks, leave=False, disable=bar_disable())
        for pixels in decoded:
            file.write(pixels.numpy().data)
    cache.write_labels(labels)


CACHE_OVERHEAD = 1 << 20  # the .npy headers, the done marker and file-system blocks, generously


class _NoRoom(Exception):
    """The disk has `free` bytes, too few for the cache: the target is streamed instead."""

    def __init__(self, free: int):
        self.free = free


def _require_room(cache: Path, pixel_bytes: int) -> None:
    """Refuse a target cache the disk has no room for before it is created (its decoder then streams the
    target instead). Called by the claimant only, so a cache another process is filling does not count."""
    free = shutil.disk_usage(cache).free
    if free < pixel_bytes + CACHE_OVERHEAD:
        raise _NoRoom(free)


def _available_memory() -> int:
    """The memory the kernel says it can give without swapping (MemAvailable); unbounded where it does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _sized(count: int) -> str:
    return tqdm.format_sizeof(count, "B")


def prepare_target(options, base: Ingredient, token=None) -> Target:
    """The decoded target (`options`: any target options), split as a plan's TargetSpec says; an --image-size
    the base cannot take is refused first."""
    refuse_untakeable_size(base, options.image_size)
    return TargetPreparation(options, base, token).decode()


def refuse_untakeable_size(base: Ingredient, image_size: int | None) -> None:
    """Refuse an --image-size the base cannot take (see `refuse_image_size`), once, at planning; without
    one, or where the processor names no size to compare with, there is nothing to check."""
    if not image_size:
        return
    try:
        native = resolution_of(load_processor(base.path, base.source), None, base.source)
    except DataError:
        return
    refuse_image_size(base.path, base.source, image_size, native)


def predict_target(model, target: Target, batch_size: int = INFERENCE_BATCH) -> dict[str, torch.Tensor]:
    """Logits on every training domain's validation split (`val/<domain>`) and on the test domain."""
    predictions = {
        f"val/{name}": predict_logits(model, images, target.data.normalize, batch_size=batch_size)
        for name, images in zip(target.train_domains, target.data.val)
    }
    predictions["test"] = predict_logits(model, target.test, target.data.normalize, batch_size=batch_size)
    return predictions


def score_predictions(predictions: dict[str, torch.Tensor], target: Target) -> dict:
    """Per-domain and pooled training-domain validation accuracy, and held-out accuracy."""
    labels_val = {name: images.labels for name, images in zip(target.train_domains, target.data.val)}
    per_domain = {name: accuracy(predictions[f"val/{name}"], labels) for name, labels in labels_val.items()}
    pooled = accuracy(
        torch.cat([predictions[f"val/{name}"] for name in labels_val]), torch.cat(list(labels_val.values()))
    )
    return {
        "val_accuracy": pooled,
        "val_accuracy_per_domain": per_domain,
        "test_accuracy": accuracy(predictions["test"], target.test.labels),
    }
