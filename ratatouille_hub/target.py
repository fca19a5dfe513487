"""The data stage: a target dataset described (splits, fingerprint: cheap, what a plan needs) and decoded
(pixels: what training, evaluation and assembly need).

Describing reads the dataset's columns and never decodes an image, so `recycle --dry-run` can name every
run folder of a recipe without the cost of decoding the target.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import TargetCache, builds, materialize
from .data import (
    DataError,
    DomainSplit,
    ImageTensors,
    decode_images,
    image_entries,
    normalization_of,
    resolution_of,
    split_domains,
)
from .evaluation import INFERENCE_BATCH, accuracy, predict_logits
from .fetch import Ingredient, dataset_revision, resolve_dataset, split_revision
from .hashing import stable_hash
from .logs import bar_disable
from .models import load_processor
from .sources import image_files_of, load_dataset_source
from .train import TargetData


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
        processor = load_processor(base.path, base.source)
        self.size = resolution_of(processor, options.image_size, base.source)
        self.normalize = normalization_of(processor, base.source)
        self.fingerprint = stable_hash(
            {
                "dataset": self.dataset_fingerprint,
                "splits": [[d.domain, d.train, d.val] for d in self.splits.train_domains],
                "test": self.splits.test_domain,
                "size": self.size,
                "normalize": asdict(self.normalize),
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
        """The decoded target; with `cache`, memory-mapped from the copy decoded there once (see `_mapped`)."""
        if cache is None:
            decoded = {
                split.domain: tuple(self.decode_rows(split, rows) for rows in (split.train, split.val))
                for split in self._domains
            }
            test = self.decode_rows(self.splits.held_out, self.splits.test)
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
        rerun, whichever domain is held out. The key covers the data's fingerprint, the layout and the size."""
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
        cached = materialize(TargetCache, cache / key, self, domains)
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
    """Decode `domains` (train then val rows, domain after domain) into one array, straight into the file."""
    size = preparation.size
    total = sum(len(d.train) + len(d.val) for d in domains)
    _refuse_without_room(staging.parent, total * (3 * size * size + np.dtype(np.int64).itemsize))
    cache = TargetCache(staging)
    pixels = np.lib.format.open_memmap(cache.pixels_file, mode="w+", dtype=np.uint8, shape=(total, 3, size, size))
    labels, start = [], 0
    for split in tqdm(domains, desc="decoding the target", leave=False, disable=bar_disable()):
        rows = split.train + split.val
        into = torch.from_numpy(pixels[start : start + len(rows)])
        labels.append(preparation.decode_rows(split, rows, into=into).labels.numpy())
        start += len(rows)
    pixels.flush()
    del pixels
    cache.write_labels(np.concatenate(labels))


CACHE_OVERHEAD = 1 << 20  # the .npy headers, the done marker and file-system blocks, generously


def _refuse_without_room(cache: Path, pixel_bytes: int) -> None:
    """Refuse a target cache the disk has no room for before it is created: writing into a memory-mapped
    file on a full disk kills the process (SIGBUS), with no line said. Called by the claimant only, so a
    cache another process is filling does not count against it."""
    needed = pixel_bytes + CACHE_OVERHEAD
    free = shutil.disk_usage(cache).free
    if free < needed:
        raise DataError(
            f"the decoded target needs {tqdm.format_sizeof(needed, 'B')} in {cache}, and "
            f"{tqdm.format_sizeof(free, 'B')} is free there; free some space, or use an --output on a disk with room"
        )


def prepare_target(options, base: Ingredient, token=None) -> Target:
    """The decoded target (`options`: any target options), split as a plan's TargetSpec says."""
    return TargetPreparation(options, base, token).decode()


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
