"""Dataset sources: each layout a target dataset can come in is one `@dataset_source` loader in this file.

`load_dataset_source` asks the entries in registration order and the first whose `claims` is true loads
the reference, so the cheap, unambiguous checks (a parquet file, a `save_to_disk` folder) come before the
folder shapes, and the Hub (a name that is no local path) comes last. Importing this module stays light,
as the registry promises: `datasets`, `data` (torch) and `card` (huggingface_hub) load where used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import TYPE_CHECKING

from .registry import Registry

if TYPE_CHECKING:
    import datasets

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_DOMAINBED_FINGERPRINT_VERSION = "domainbed-folder:1"  # bump when the rows or their encoding change


@dataclass(frozen=True)
class DatasetSource:
    """`claims(reference)` says whether this layout is the reference's; `load(reference, revision, token)` reads it."""

    name: str
    help: str
    claims: Callable[[Path | str], bool]
    load: Callable[..., datasets.Dataset]


DATASET_SOURCES = Registry[DatasetSource]("dataset source")


def dataset_source(name: str, *, help: str, claims: Callable[[Path | str], bool]):
    """Register the decorated `load(reference, revision, token)` under `name`, after the entries before it."""

    def register(load):
        DATASET_SOURCES.add(name, DatasetSource(name=name, help=help, claims=claims, load=load))
        return load

    return register


def source_for(reference: str | Path) -> DatasetSource:
    """The first registered source that claims `reference`."""
    from .data import DataError

    for _, source in DATASET_SOURCES.items():
        if source.claims(reference):
            return source
    if Path(reference).exists():  # only a file that is not parquet gets here: every folder is claimed
        raise DataError(f"{reference}: not a .parquet file or a dataset folder")
    raise DataError(f"{reference}: no such dataset folder or file (and not a Hub dataset id)")


def load_dataset_source(reference: str | Path, revision: str | None = None, token: str | bool | None = None):
    """A `datasets.Dataset` from whichever source claims `reference`; the splits of a DatasetDict are joined
    in sorted split order, so every image is used and the row order does not depend on how splits were saved."""
    import datasets

    with _unreadable_refused(reference):
        loaded = source_for(reference).load(str(reference), revision, token)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets([loaded[name] for name in sorted(loaded)])
    if len(loaded) == 0:
        raise _empty(reference)
    return loaded


def _empty(reference: str | Path):
    from .data import DataError

    return DataError(f"{reference}: an empty dataset (no rows)")


def dataset_folder(reference: str | Path) -> Path | None:
    """The local folder a dataset reference reads (resolved), or None for a file or a Hub dataset."""
    path = Path(reference)
    return path.resolve() if path.is_dir() else None


def refuse_output_inside(output: str | Path, reference: str | Path) -> None:
    """An output folder inside a local dataset's folder would add files to the dataset (DomainBed would read
    them as domains): refused before anything is written."""
    from .data import DataError

    folder = dataset_folder(reference)
    if folder is not None and Path(output).resolve().is_relative_to(folder):
        raise DataError(
            f"--output {output} is in the dataset folder {reference}; what it writes would become part of the "
            "dataset: choose an output outside it"
        )


@dataclass(frozen=True)
class ImageFiles:
    """Where the image files a dataset's rows name may be read: inside `folder` only, and from a column of
    path strings only if `strings`."""

    folder: Path
    strings: bool


def image_files_of(reference: str | Path) -> ImageFiles:
    """A local dataset's images may be files in its own folder (a parquet file's folder); a Hub dataset's,
    only the files `datasets` downloaded into its folder of the Hub cache, never a path string of its rows,
    which names no file the repo ships and may name any file here."""
    if source_for(reference).name != "hub":
        folder = Path(reference)
        return ImageFiles(folder.absolute() if folder.is_dir() else folder.absolute().parent, strings=True)
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cached = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=str(reference), repo_type="dataset")
    return ImageFiles(cached, strings=False)


@contextmanager
def _unreadable_refused(reference: str | Path):
    """A file `datasets` cannot read (a malformed parquet or arrow file) refused in one line that names it:
    `datasets` names the file only in the error it logs before raising, so that record becomes the line,
    and its handlers print no error record meanwhile (the line says it)."""
    import pyarrow
    from datasets.exceptions import DatasetGenerationError

    from .data import DataError

    said = BufferingHandler(capacity=1 << 16)
    said.setLevel(logging.ERROR)
    library = logging.getLogger("datasets")
    shown = list(library.handlers)
    for handler in shown:
        handler.addFilter(_below_error)
    library.addHandler(said)
    try:
        yield
    except (pyarrow.ArrowException, DatasetGenerationError) as error:
        cause = error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error
        detail = said.buffer[-1].getMessage() if said.buffer else f"{type(cause).__name__}: {cause}"
        raise DataError(f"{reference}: not a readable dataset ({detail.strip().splitlines()[0]})") from None
    except ValueError as error:
        # load_dataset of data files that hold no row: 'Instruction "train" corresponds to no data!'
        if "corresponds to no data" not in str(error):
            raise
        raise _empty(reference) from None
    finally:
        library.removeHandler(said)
        for handler in shown:
            handler.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _load_refusing_scripts(reference: str, revision: str | None, token):
    """`datasets.load_dataset`, with its refusal of loading scripts said in our words, naming the repo."""
    import datasets

    from .data import DataError

    try:
        return datasets.load_dataset(reference, revision=revision, token=token)
    except RuntimeError as error:
        if "script" not in str(error).lower():
            raise
        raise DataError(
            f"{reference}: holds a dataset loading script ({error}); code from a dataset repo is never run"
        ) from None


@dataset_source(
    "parquet-file",
    help="a .parquet file",
    claims=lambda reference: Path(reference).is_file() and Path(reference).suffix == ".parquet",
)
def _load_parquet_file(reference: str, revision: str | None, token):
    import datasets

    return datasets.load_dataset("parquet", data_files=reference)


@dataset_source(
    "datasets-folder",
    help="a folder written by Dataset.save_to_disk (holds dataset_info.json)",
    claims=lambda reference: Path(reference).is_dir() and (Path(reference) / "dataset_info.json").exists(),
)
def _load_datasets_folder(reference: str, revision: str | None, token):
    import datasets

    try:
        return datasets.load_from_disk(reference)
    except IndexError:  # the folder of an empty Dataset holds no arrow file, and load_from_disk joins none
        raise _empty(reference) from None


def _visible(folder: Path) -> list[Path]:
    """Entries by name, without hidden ones (.DS_Store, .ipynb_checkpoints): tools leave those; they are no data."""
    return sorted((entry for entry in folder.iterdir() if not entry.name.startswith(".")), key=lambda e: e.name)


def _is_image(path: Path | os.DirEntry) -> bool:
    return path.is_file() and os.path.splitext(path.name)[1].lower() in IMAGE_SUFFIXES


def _image_files(class_folder: Path) -> list[str]:
    """A DomainBed class folder's images by name, as path strings (a Path object each would cost about 1 kB
    a row at DomainNet's 586k); a stray non-image entry is refused, naming it."""
    from .data import DataError

    entries = sorted((entry for entry in os.scandir(class_folder) if not entry.name.startswith(".")), key=_name)
    for entry in entries:
        if not _is_image(entry):
            raise DataError(f"{entry.path}: not an image ({', '.join(IMAGE_SUFFIXES)}) in a DomainBed class folder")
    return [entry.path for entry in entries]


def _name(entry: os.DirEntry) -> str:
    return entry.name


def _domain_folders(root: Path) -> list[Path]:
    """A DomainBed root's folders: a file beside them is no domain but the benchmark's metadata (Office-Home
    ships ImageInfo.csv there), and is ignored; inside a domain folder every entry counts."""
    return [entry for entry in _visible(root) if entry.is_dir()]


def _claims_domainbed(reference: Path | str) -> bool:
    """Folders of folders with an image somewhere below: ROOT/<domain>/<class>/<image>.

    Top folders that are all split names (train/, test/) are the Hub's imagefolder layout, whose second
    level is the class, not DomainBed's, and so is a root with an imagefolder metadata file (metadata.csv):
    those stay with `hub-layout-folder`.
    """
    from datasets.data_files import SPLIT_KEYWORDS
    from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder

    root = Path(reference)
    if not root.is_dir() or any((root / name).exists() for name in FolderBasedBuilder.METADATA_FILENAMES):
        return False
    domains = _domain_folders(root)
    if not domains:
        return False
    split_names = {keyword for keywords in SPLIT_KEYWORDS.values() for keyword in keywords}
    if all(domain.name.lower() in split_names for domain in domains):
        return False
    classes = [folder for domain in domains for folder in _visible(domain)]
    return all(folder.is_dir() for folder in classes) and any(
        _is_image(entry) for folder in classes for entry in _visible(folder)
    )


@dataset_source(
    "domainbed-folder",
    help="DomainBed's download layout, ROOT/<domain>/<class>/<image> (e.g. ./VLCS/Caltech101/bird/x.jpg)",
    claims=_claims_domainbed,
)
def _load_domainbed_folder(reference: str, revision: str | None, token):
    """Columns `image` (read lazily from its file), `label` (a ClassLabel over the sorted union of class
    folders, so a class one domain lacks keeps its id everywhere) and `domain`, rows sorted by
    (domain, class, file name).

    A file at the root is ignored (see `_domain_folders`). A stray non-image entry in a domain or class
    folder, or an empty class or domain folder, is refused, naming that path, instead of being skipped or
    handed on: the claim only looks at the two folder levels and one image, so such a
    folder is a DomainBed download with a defect, and `datasets.load_dataset` would read it as an
    imagefolder, labelled by class folder with every domain dropped.

    The fingerprint (what run folders are named by) is a sha256 over every row's domain, class, file
    name and file bytes: it changes with any of them and is the same in every process for the same files.
    """
    import datasets
    import pyarrow
    from datasets.table import InMemoryTable

    from .data import DataError

    root = Path(reference).absolute()
    rows: list[tuple[str, str, str]] = []  # (domain, class, file path): strings, not a Path per image
    for domain in _domain_folders(root):
        class_folders = _visible(domain)
        if not class_folders:
            raise DataError(f"{domain}: empty domain folder; a DomainBed domain folder holds class folders")
        for class_folder in class_folders:
            files = _image_files(class_folder)
            if not files:
                raise DataError(f"{class_folder}: empty class folder; a DomainBed class folder holds images")
            rows.extend((domain.name, class_folder.name, file) for file in files)

    label_names = sorted({label for _, label, _ in rows})
    label_ids = {name: i for i, name in enumerate(label_names)}
    digest = hashlib.sha256(_DOMAINBED_FINGERPRINT_VERSION.encode())
    for domain, label, file in rows:  # names hold no NUL and the file digest has a fixed length: unambiguous
        digest.update(f"\0{domain}\0{label}\0{os.path.basename(file)}\0".encode())
        with open(file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())

    features = datasets.Features(
        image=datasets.Image(), label=datasets.ClassLabel(names=label_names), domain=datasets.Value("string")
    )
    paths = pyarrow.array([file for _, _, file in rows], pyarrow.string())
    table = pyarrow.table(  # the columns as `features` stores them, built whole: from_dict makes a dict per row
        {
            "image": pyarrow.StructArray.from_arrays(
                [pyarrow.nulls(len(rows), pyarrow.binary()), paths], ["bytes", "path"]
            ),
            "label": pyarrow.array([label_ids[label] for _, label, _ in rows], pyarrow.int64()),
            "domain": pyarrow.array([domain for domain, _, _ in rows], pyarrow.string()),
        }
    )
    dataset = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))
    # a fingerprint at random; select_columns of every column changes nothing but takes a fingerprint
    return dataset.select_columns(dataset.column_names, new_fingerprint=digest.hexdigest())


@dataset_source(
    "hub-layout-folder",
    help="any other folder, read by datasets.load_dataset (the Hub layout: data/*.parquet, imagefolder, ...)",
    claims=lambda reference: Path(reference).is_dir(),
)
def _load_hub_layout_folder(reference: str, revision: str | None, token):
    return _load_refusing_scripts(reference, revision, token)


def _claims_hub(reference: Path | str) -> bool:
    from .fetch import is_hub_id

    return is_hub_id(str(reference))


@dataset_source("hub", help="a Hub dataset id, org/name (read at the pinned revision)", claims=_claims_hub)
def _load_hub(reference: str, revision: str | None, token):
    """A Hub dataset; one that cannot be reached may be a local path mistyped (`data/x` reads as an id)."""
    from .data import DataError

    try:
        return _load_refusing_scripts(reference, revision, token)
    except ConnectionError as error:  # is_hub_id: no local path of that name exists
        raise DataError(
            f"{reference}: {error}, and no local folder or file has that name; check the network, HF_ENDPOINT "
            "and HF_HUB_OFFLINE, or the path (./ before it reads it as a local one)"
        ) from None
