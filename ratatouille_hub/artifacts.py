"""Every expensive artifact is made by one protocol and read back through the typed record of its kind.

An artifact is a folder named after the content key of what decides it. Its kinds, each a record class
that owns the names of its files and reads them back (no other module spells them):

    TargetCache       <output>/cache/<key>/   the decoded target, memory-mapped by every process
    ProbeRecord       <output>/lp/<key>/      the shared linear probe's head, every run's start
    FusionRecord      <output>/inits/<key>/   a fusion init: a transformers folder and what it mixes
    RunRecord         <output>/runs/<key>/    a target fine-tune: model/, its metrics and predictions
    IntertrainRecord  <output>/runs/<key>/    (intertrain) a community-style fine-tune of the base
    SoupFolder        <output>/soup/          the assembled soup, a transformers folder

`materialize(Kind, folder, *inputs)` is the only writer of any of them: claim the folder (a kernel lock
beside it, dropped when its holder dies) -> return if a finished copy is there -> build it into a staging
sibling with the kind's builder -> mark it `done` last -> rename it into place. A process killed at any
point leaves the finished folder or nothing that counts, and of all the processes that ask for one folder
(accelerate ranks, `run --index` array tasks, two launches, contributors), one builds it and the others
reuse it. The one thing a killed build leaves that counts is the progress it saved in its staging folder
(a fine-tune's checkpoint, checkpoint.py): the next build of that folder adopts the staging folder and
resumes from it (io.staged_folder). Executors only schedule: `materialize_all` makes a list of artifacts,
those no one else is making first. Each kind's builder is registered once, beside the code that trains it
(`@builds(Kind)`); `replaced_builder` swaps one for a block, which is how tests stop or forbid a stage.

Dependencies are not declared (as mergekit's task graph declares them, for an executor to order): like
DomainBed's sweep, where a job is a folder named by its arguments' hash and done is a file in it, a builder
materializes what it needs under that artifact's own claim (a run its probe and its fusion), so any process
may start anywhere in a plan and they never wait on one another for long.

The soup is the one kind whose folder is not named by what made it: it is a transformers folder that users
publish as it is (anything beside the files a soup is made of is refused as someone else's), and the method
and the BatchNorm policy choose what it holds. So its `done` marker lives beside it (`.soup.done`) and names
the key of what produced it (the recipe, the target, every run's weights digest) and the digest of each file
the soup holds: the same command reuses it, a change of method or policy, of a run or of the soup's own files
rebuilds it. It is claimed and staged like every other kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .hashing import file_sha256
from .io import atomic_write_json, claimed_folder, hidden_sibling_stem, match_umask, staged_folder
from .merge_engine import WEIGHTS_NAME
from .results import Results
from .train import LinearHead

DONE = "done"  # written last inside a staged artifact: a folder without it was never finished
RUN_FILE = "ratatouille.json"  # beside a run's weights: which recipe it belongs to (also a contributed run's record)


class Artifact:
    """A folder one builder writes whole; a subclass names its files and reads them back."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.built = False  # set by `materialize` when this process built it rather than reused it

    @property
    def is_done(self) -> bool:
        return (self.folder / DONE).is_file()

    def is_done_for(self, key: str | None) -> bool:
        """Whether a finished copy made from what `key` names is there (a folder named by its content: any)."""
        return self.is_done

    def mark_staged(self, staging: Path) -> None:
        """Mark a built copy finished: the last file written into it before it is renamed into place."""
        (staging / DONE).touch()

    def mark_placed(self, key: str | None) -> None:
        """Called once a built copy is in place (the soup's marker lives beside its folder)."""


Kind = TypeVar("Kind", bound=Artifact)
_BUILDERS: dict[type[Artifact], Callable[..., None]] = {}


def builds(kind: type[Artifact]):
    """Register the decorated function as the builder of `kind`: called as `build(staging, *inputs)`."""

    def register(build: Callable[..., None]) -> Callable[..., None]:
        _BUILDERS[kind] = build
        return build

    return register


@contextmanager
def replaced_builder(kind: type[Artifact], build: Callable[..., None]) -> Iterator[None]:
    """`build` makes every `kind` artifact for the block (tests: stop, forbid or record a stage)."""
    previous = _BUILDERS.get(kind)  # None: the module that builds `kind` is not imported yet
    _BUILDERS[kind] = build
    try:
        yield
    finally:
        if previous is None:
            del _BUILDERS[kind]
        else:
            _BUILDERS[kind] = previous


def materialize(
    kind: type[Kind], folder: str | Path, *inputs, wait: bool = True, key: str | None = None
) -> Kind | None:
    """The finished `kind` artifact in `folder`, built from `inputs` unless a finished one is there (made from
    what `key` names, for a kind whose folder is not named by it). With `wait=False`, None at once when
    another process is making it; else that process is waited for (and should it die first, this one builds
    it, from the progress it saved)."""
    record = kind(folder)
    with claimed_folder(record.folder, wait=wait) as mine:
        if not mine:
            return None
        if not record.is_done_for(key):
            with staged_folder(record.folder) as staging:
                _BUILDERS[kind](staging, *inputs)
                record.mark_staged(staging)
            record.mark_placed(key)
            record.built = True
    return record


T = TypeVar("T")


def materialize_all(items: Sequence[T], make: Callable[[T, bool], object], on_wait: Callable[[T], None]) -> None:
    """`make(item, wait)` each item (it returns None when another process holds the item's claim and `wait`
    is False): first every item no other process is making, then, after `on_wait(item)`, the others, waiting
    for them (and making any whose claimant died). Order `items` with `Worker.first` to share them out."""
    busy = [item for item in items if make(item, False) is None]
    for item in busy:
        on_wait(item)
        make(item, True)


# -- the kinds --------------------------------------------------------------------------------------


class TargetCache(Artifact):
    """Every domain's images, decoded once as one uint8 array, and their labels."""

    PIXELS, LABELS = "pixels.npy", "labels.npy"

    @property
    def pixels_file(self) -> Path:
        return self.folder / self.PIXELS

    def write_labels(self, labels) -> None:
        np.save(self.folder / self.LABELS, labels)

    def pixels(self) -> torch.Tensor:
        """The images, memory-mapped copy-on-write: shared through the page cache, never written back."""
        return torch.from_numpy(np.load(self.pixels_file, mmap_mode="c"))

    def labels(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.folder / self.LABELS))


class ProbeRecord(Artifact):
    """The linear probe's head, and the step and validation accuracy it was kept at."""

    HEAD, METRICS = "head.safetensors", "metrics.json"

    @property
    def head_file(self) -> Path:
        return self.folder / self.HEAD

    @property
    def metrics(self) -> dict:
        return json.loads((self.folder / self.METRICS).read_text())

    def write(self, head: LinearHead, seconds: float) -> None:
        save_file({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, self.head_file)
        match_umask([self.head_file])
        metrics = {"step": head.step, "val_accuracy": head.val_accuracy, "seconds": seconds}
        atomic_write_json(self.folder / self.METRICS, metrics)

    def head(self) -> LinearHead:
        tensors, metrics = load_file(self.head_file), self.metrics
        return LinearHead(tensors["weight"], tensors["bias"], metrics["step"], metrics["val_accuracy"])


class FusionRecord(Artifact):
    """A fusion init: the averaged model (a transformers folder) and the members and weights it mixes."""

    FUSION = "fusion.json"

    def write(self, model, members: Iterable[str], weights: Iterable[float]) -> None:
        model.save_pretrained(self.folder)
        match_umask(self.folder.glob("*.safetensors"))
        atomic_write_json(self.folder / self.FUSION, {"members": list(members), "weights": list(weights)})


class RunRecord(Artifact):
    """A target fine-tune: its model folder, its metrics and its logits on every split it is scored on."""

    MODEL, METRICS, PREDICTIONS = "model", "metrics.json", "predictions.safetensors"

    @property
    def model_folder(self) -> Path:
        return self.folder / self.MODEL

    @property
    def weights_file(self) -> Path:
        return self.model_folder / WEIGHTS_NAME

    @property
    def metrics_file(self) -> Path:
        return self.folder / self.METRICS

    @property
    def metrics(self) -> dict:
        return json.loads(self.metrics_file.read_text())

    def predictions(self) -> dict[str, torch.Tensor]:
        return load_file(self.folder / self.PREDICTIONS)

    def write(
        self, model, processor, identity: dict | None, predictions: dict[str, torch.Tensor], metrics: dict
    ) -> None:
        """`identity` (the recipe's fingerprint, the run's index and init) is written beside the weights:
        `update --add` and `merge` check the fingerprint as they check a Hub run's, and `diagnose` names and
        orders runs by it."""
        model.save_pretrained(self.model_folder)
        if processor is not None:
            processor.save_pretrained(self.model_folder)
        if identity is not None:
            atomic_write_json(self.model_folder / RUN_FILE, identity)
        save_file({k: v.contiguous() for k, v in predictions.items()}, self.folder / self.PREDICTIONS)
        match_umask([self.folder / self.PREDICTIONS, *self.model_folder.glob("*.safetensors")])
        atomic_write_json(self.metrics_file, metrics)


class IntertrainRecord(Artifact):
    """An intertrained fine-tune: a transformers folder with its card and what it was trained on."""

    RESULTS, CARD = "results.json", "README.md"

    @property
    def results(self) -> dict:
        return json.loads((self.folder / self.RESULTS).read_text())

    def write(self, model, processor, results: dict, card) -> None:
        model.save_pretrained(self.folder)
        match_umask(self.folder.glob("*.safetensors"))
        if processor is not None:
            processor.save_pretrained(self.folder)
        atomic_write_json(self.folder / self.RESULTS, results)
        card.save(self.folder / self.CARD)


class SoupFolder(Artifact):
    """An assembled soup, free of any file users would not expect: its `done` marker is beside it."""

    RESULTS = "results.json"

    @property
    def results_file(self) -> Path:
        return self.folder / self.RESULTS

    @property
    def marker(self) -> Path:
        return self.folder.with_name(f"{hidden_sibling_stem(self.folder.name)}.{DONE}")

    def results(self) -> Results:
        return Results.load(self.results_file)

    def is_done_for(self, key: str | None) -> bool:
        """Whether the marker names `key` and the folder holds exactly the files it was written with (a soup
        updated or edited in place is another soup)."""
        try:
            marker = json.loads(self.marker.read_text())
        except (OSError, ValueError):  # none, or not one this tool wrote
            return False
        if key is None or not isinstance(marker, dict) or marker.get("key") != key:
            return False
        return self.folder.is_dir() and marker.get("files") == self._file_digests()

    def mark_staged(self, staging: Path) -> None:
        """Nothing inside: the folder holds only what a soup is made of."""

    def mark_placed(self, key: str | None) -> None:
        if key is None:
            self.marker.unlink(missing_ok=True)
        else:
            atomic_write_json(self.marker, {"key": key, "files": self._file_digests()})

    def _file_digests(self) -> dict[str, str] | None:
        """sha256 of each file in the folder by name; None if it holds anything but files."""
        entries = sorted(self.folder.iterdir())
        if not all(entry.is_file() and not entry.is_symlink() for entry in entries):
            return None
        return {entry.name: file_sha256(entry) for entry in entries}
