"""Integrity on the data side (issue 19): a target row, image or file that cannot be used is one `error:` line
naming the dataset, the row, its domain and the column (exit 2), refused at planning where the columns show it
(labels, the image column's type, image paths) and while decoding where only the bytes do (a decompression
bomb, a truncated or undecodable image); half-precision checkpoints train and save in float32; a target cache
the disk has no room for is refused before it is written. After each refusal, the corrected input recycles.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import refusals
import torch
from datasets import ClassLabel, Image, Sequence, Value
from PIL import Image as PILImage
from safetensors import safe_open
from transformers import ResNetForImageClassification

from ratatouille_hub import cli
from ratatouille_hub.testing import write_hub_dataset
from ratatouille_hub.toy import world as toyworld

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    *("--runs", "1", "--steps", "2", "--eval-every", "2", "--lp-steps", "2", "--warmup-steps", "1"),
    *("--batch-size", "2", "--image-size", "16"),
]
ROW = 4  # the bad row of every broken dataset: a 'photo' image, in a training domain


def _with(dataset, column: str, values: list, feature):
    return dataset.remove_columns(column).add_column(column, values, feature=feature)


def _replaced(values: list, value) -> list:
    return [value if row == ROW else v for row, v in enumerate(values)]


def _folder(dataset, folder: Path) -> Path:
    return write_hub_dataset(dataset, folder, card=None)


def _grey_png(values: np.ndarray) -> bytes:
    """A PNG of `values` in Pillow's mode for their dtype (uint16: I;16, a 16-bit grey PNG)."""
    buffer = io.BytesIO()
    PILImage.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few kB on disk, width x height pixels decoded."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the row's bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoints) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("data-world")
    shapes = toyworld.target_dataset(per_class_per_domain=2, size=16)
    assert shapes[ROW]["domain"] == "photo"
    w = SimpleNamespace(root=root, base=tiny_checkpoints["base"], aux=tiny_checkpoints["aux1"], shapes=shapes)
    w.target = _folder(shapes, root / "shapes")

    labels = shapes["label"]
    w.int_labels = _folder(_with(shapes, "label", labels, Value("int64")), root / "int-labels")
    w.label_none = _folder(_with(shapes, "label", _replaced(labels, None), Value("int64")), root / "label-none")
    floats = [float(label) for label in labels]  # how pandas writes an int column with a missing value
    w.float_labels = _folder(_with(shapes, "label", floats, Value("float64")), root / "float-labels")
    w.label_nan = _folder(_with(shapes, "label", _replaced(floats, float("nan")), Value("float64")), root / "label-nan")
    for name, value in (("unlabelled", -1), ("outside", 9), ("negative", -3)):
        bad = _with(shapes, "label", _replaced(labels, value), shapes.features["label"])
        setattr(w, f"label_{name}", _folder(bad, root / f"label-{name}"))
    several = Sequence(shapes.features["label"])  # a multi-label target: each image a list of classes
    lists = _replaced([[label] for label in labels], [labels[ROW], (labels[ROW] + 1) % 6])
    w.multi_label = _folder(_with(shapes, "label", lists, several), root / "label-multi")
    domain_ids = [toyworld.DOMAINS.index(d) for d in shapes["domain"]]
    w.domain_ids = _folder(_with(shapes, "domain", domain_ids, ClassLabel(names=toyworld.DOMAINS)), root / "domain-ids")
    bad = _with(shapes, "domain", _replaced(domain_ids, 7), ClassLabel(names=toyworld.DOMAINS))
    w.domain_outside = _folder(bad, root / "domain-outside")

    entries = shapes.cast_column("image", Image(decode=False))["image"]
    png = [entry["bytes"] for entry in entries]
    w.bytes_column = _folder(_with(shapes, "image", png, Value("binary")), root / "image-bytes")
    w.ints_column = _folder(_with(shapes, "image", list(range(len(shapes))), Value("int64")), root / "image-ints")
    paths = [f"img/{row}.png" for row in range(len(shapes))]

    def path_folder(name: str, values: list) -> Path:
        folder = _folder(_with(shapes, "image", values, Value("string")), root / name)
        (folder / "img").mkdir()
        for row, data in enumerate(png):
            (folder / "img" / f"{row}.png").write_bytes(data)
        return folder

    w.paths = path_folder("image-paths", paths)
    w.absolute_path = path_folder("image-absolute-path", _replaced(paths, "/etc/passwd"))
    (root / "outside.png").write_bytes(png[ROW])  # a real image, outside the dataset's folder
    w.parent_path = path_folder("image-parent-path", _replaced(paths, "../outside.png"))
    path_entries = [{"bytes": data, "path": None} for data in png]
    hostile = _replaced(path_entries, {"bytes": None, "path": "/etc/passwd"})
    w.feature_path = _folder(_with(shapes, "image", hostile, Image()), root / "image-feature-path")
    w.no_image = _folder(_with(shapes, "image", _replaced(path_entries, None), Image()), root / "image-none")
    w.missing_file = path_folder("image-missing-file", paths)
    (w.missing_file / "img" / f"{ROW}.png").unlink()

    def image_bytes(name: str, data: bytes) -> Path:
        return _folder(
            _with(shapes, "image", _replaced(path_entries, {"bytes": data, "path": None}), Image()), root / name
        )

    w.bomb = image_bytes("image-bomb", _huge_png(20000, 20000))
    w.truncated = image_bytes("image-truncated", png[ROW][: len(png[ROW]) // 2])
    w.undecodable = image_bytes("image-undecodable", b"not an image at all")
    w.wide = image_bytes("image-16-bit", _grey_png(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))

    w.malformed = root / "malformed.parquet"
    w.malformed.write_bytes(b"PAR1 and then nothing a parquet reader can use")
    good = (w.target / "data" / "train-00000-of-00001.parquet").read_bytes()
    w.corrupt_page = root / "corrupt-page"
    (w.corrupt_page / "data").mkdir(parents=True)
    middle = len(good) // 2  # inside the image column's data pages: the footer (the schema) stays readable
    corrupt = good[:middle] + b"\x55" * 4096 + good[middle + 4096 :]
    (w.corrupt_page / "data" / "train-00000-of-00001.parquet").write_bytes(corrupt)
    w.truncated_saved = root / "truncated-saved"
    shapes.save_to_disk(str(w.truncated_saved))
    arrow = next(w.truncated_saved.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    return w


def recycle_argv(world, target, out: Path, *, base=None, aux=None, command: str = "recycle") -> list[str]:
    return [command, "--base", str(base or world.base), "--aux", str(aux or world.aux), "--target", str(target),
            *TINY, "--output", str(out)]  # fmt: skip


def placeholders(world) -> dict:
    return {"<world>": world.root, "<ckpt>": world.base.parent}


def recycles(argv: list[str], capsys) -> str:
    """Run `argv`, demand exit 0, and return its progress lines (stderr)."""
    assert cli.main(argv) == 0
    return capsys.readouterr().err


def refused_by_plan_and_recycle(case, what, target, culprit: str, expected: str, world, out: Path, capsys) -> None:
    """What planning can see is refused by `plan` and by `recycle` alike, with the same line, nothing written."""
    for command in ("plan", "recycle"):
        argv = recycle_argv(world, target, out, command=command)
        line = refusals.fails_cleanly(case, what, argv, culprit, out, capsys, placeholders(world))
        assert refusals.normalise(line, placeholders(world)) == expected


def refused_while_decoding(case: str, what: str, argv: list[str], culprit: str, out: Path, capsys, world) -> str:
    """The refusal contract for what only decoding sees (an image's bytes, the disk a cache needs): one `error:`
    line naming the culprit, exit 2, no traceback, the line in docs/errors.md; planning never decodes, so the
    output folder holds the saved plan, and nothing decoded: no cache file, no staging folder (locks only)."""
    assert cli.main(argv) == 2
    line = refusals.one_error_line(capsys, culprit)
    assert (out / "plan.json").is_file()
    assert [p.name for p in (out / "cache").rglob("*") if not p.name.endswith(".lock")] == []
    refusals.record(case, what, line, {"<out>": out, **placeholders(world)})
    return line


# -- labels: refused at planning, naming the row, its domain and the column --------------------------------

LABEL_CASES = {  # case: (what, bad target, corrected target, expected line)
    "data-label-none": (
        "a None in an int label column",
        "label_none",
        "int_labels",
        "error: dataset <world>/label-none: row 4 (domain 'photo'), column 'label': no label (None); every image "
        "needs a class",
    ),
    "data-label-nan": (
        "a NaN in a float label column (pandas' missing value)",
        "label_nan",
        "float_labels",
        "error: dataset <world>/label-nan: row 4 (domain 'photo'), column 'label': no label (NaN); every image "
        "needs a class",
    ),
    "data-label-unlabelled": (
        "a ClassLabel -1 (the datasets library's no label)",
        "label_unlabelled",
        "target",
        "error: dataset <world>/label-unlabelled: row 4 (domain 'photo'), column 'label': label -1, the datasets "
        'library\'s "no label"; every image needs a class',
    ),
    "data-label-outside": (
        "a ClassLabel id past its names",
        "label_outside",
        "target",
        "error: dataset <world>/label-outside: row 4 (domain 'photo'), column 'label': label 9, not one of its 6 "
        "ClassLabel names (ids 0 to 5)",
    ),
    "data-label-negative": (
        "a negative ClassLabel id",
        "label_negative",
        "target",
        "error: dataset <world>/label-negative: row 4 (domain 'photo'), column 'label': label -3, not one of its 6 "
        "ClassLabel names (ids 0 to 5)",
    ),
    "data-domain-outside": (
        "a domain ClassLabel id past its names",
        "domain_outside",
        "domain_ids",
        "error: dataset <world>/domain-outside: row 4, column 'domain': domain 7, not one of its 4 ClassLabel names "
        "(ids 0 to 3)",
    ),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_a_row_without_a_usable_label_is_refused_at_planning(case, world, tmp_path, capsys):
    what, bad, corrected, expected = LABEL_CASES[case]
    out = tmp_path / "out"
    refused_by_plan_and_recycle(case, what, getattr(world, bad), "row 4", expected, world, out, capsys)
    recycles(recycle_argv(world, getattr(world, corrected), out), capsys)


def test_a_multi_label_column_is_refused_at_planning(world, tmp_path, capsys):
    expected = (
        "error: dataset <world>/label-multi: row 0 (domain 'photo'), column 'label': a list of labels; multi-label "
        "targets are not supported (--label-column must name one class per image) (47 more rows like it)"
    )
    what = "a label column of lists (a multi-label target)"
    refused_by_plan_and_recycle(
        "data-label-multi", what, world.multi_label, "row 0", expected, world, tmp_path / "out", capsys
    )


# -- the image column: what datasets.Image() reads is cast to it; paths stay inside the dataset's folder ----

IMAGE_CASES = {  # case: (what, bad target, expected line)
    "data-image-not-images": (
        "an image column of integers",
        "ints_column",
        "error: dataset <world>/image-ints: column 'image' holds Value('int64'), which datasets.Image() cannot read "
        "as images (it reads image bytes, file paths and Image features)",
    ),
    "data-image-absolute-path": (
        "a path string naming /etc/passwd",
        "absolute_path",
        "error: dataset <world>/image-absolute-path: row 4 (domain 'photo'), column 'image': the path '/etc/passwd' "
        "leads outside the dataset's folder <world>/image-absolute-path; only files inside it are read",
    ),
    "data-image-parent-path": (
        "a path string climbing out with ..",
        "parent_path",
        "error: dataset <world>/image-parent-path: row 4 (domain 'photo'), column 'image': the path "
        "'../outside.png' leads outside the dataset's folder <world>/image-parent-path; only files inside it are "
        "read",
    ),
    "data-image-feature-path": (
        "an Image feature whose path is /etc/passwd",
        "feature_path",
        "error: dataset <world>/image-feature-path: row 4 (domain 'photo'), column 'image': the path '/etc/passwd' "
        "leads outside the dataset's folder <world>/image-feature-path; only files inside it are read",
    ),
    "data-image-none": (
        "a row without an image",
        "no_image",
        "error: dataset <world>/image-none: row 4 (domain 'photo'), column 'image': no image (neither image bytes "
        "nor a path)",
    ),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_an_image_column_that_is_not_images_or_leaves_its_folder_is_refused_at_planning(case, world, tmp_path, capsys):
    what, bad, expected = IMAGE_CASES[case]
    out = tmp_path / "out"
    refused_by_plan_and_recycle(case, what, getattr(world, bad), "column 'image'", expected, world, out, capsys)


@pytest.mark.parametrize("column", ["bytes_column", "paths"])
def test_image_bytes_and_paths_inside_the_folder_recycle(column, world, tmp_path, capsys):
    """The corrected inputs: raw bytes and relative path strings are what datasets.Image() reads; the paths
    are read in the dataset's folder (not the working directory), so both decode to the Image feature's pixels."""
    from ratatouille_hub.config import RecipeConfig
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.target import TargetPreparation

    recycles(recycle_argv(world, getattr(world, column), tmp_path / "out"), capsys)
    base = resolve_model(str(world.base))
    decoded = [
        TargetPreparation(RecipeConfig(base=str(world.base), target=str(target), image_size=16), base).decode()
        for target in (world.target, getattr(world, column))
    ]
    assert torch.equal(decoded[0].test.pixels, decoded[1].test.pixels)
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(decoded[0].data.train, decoded[1].data.train))


# -- the Hub: a dataset's path strings are never read; its own files (bytes, an imagefolder) are --------------


def test_path_strings_of_a_hub_dataset_are_refused(world, local_hub, hub_namespace, tmp_path, capsys):
    paths_repo, bytes_repo, imagefolder_repo = (f"{hub_namespace}/{name}" for name in ("paths", "bytes", "folder"))
    sha = local_hub.seed_dataset(paths_repo, world.paths)  # the files are in the repo too: still never read
    out = tmp_path / "out"
    places = {"<repo>": paths_repo, "<sha>": sha, **placeholders(world)}
    line = refusals.fails_cleanly(
        "data-hub-path-strings", "a Hub dataset whose image column holds path strings",
        recycle_argv(world, paths_repo, out), paths_repo, out, capsys, places,
    )  # fmt: skip
    assert refusals.normalise(line, places) == (
        "error: dataset <repo>@<sha>: row 0 (domain 'photo'), column 'image': a file path ('img/0.png'); a Hub "
        "dataset's path strings are never read (they may name any file here): its images must be in it, as bytes "
        "or an Image feature"
    )

    local_hub.seed_dataset(bytes_repo, world.target)
    recycles(recycle_argv(world, bytes_repo, tmp_path / "from-bytes"), capsys)
    folder = tmp_path / "imagefolder" / "train"  # datasets reads it into paths inside its Hub cache: those it may
    rows = []
    for row, example in enumerate(world.shapes):
        name = f"{toyworld.SHAPES[example['label']]}/{row}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / name)
        rows.append(json.dumps({"file_name": name, "domain": example["domain"], "label": name.split("/")[0]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    local_hub.seed_dataset(imagefolder_repo, folder.parent)
    recycles(recycle_argv(world, imagefolder_repo, tmp_path / "from-imagefolder"), capsys)


# -- decoding: which image, in which domain, and why -----------------------------------------------------------

DECODE_CASES = {  # case: (what, bad target, expected line)
    "data-image-bomb": (
        "a 20000x20000 PNG (a decompression bomb)",
        "bomb",
        "error: dataset <world>/image-bomb: row 4 (domain 'photo'), column 'image': Image size (400000000 pixels) "
        "exceeds limit of 178956970 pixels, could be decompression bomb DOS attack.",
    ),
    "data-image-truncated": (
        "a PNG cut in half",
        "truncated",
        "error: dataset <world>/image-truncated: row 4 (domain 'photo'), column 'image': image file is truncated",
    ),
    "data-image-undecodable": (
        "bytes that are no image",
        "undecodable",
        "error: dataset <world>/image-undecodable: row 4 (domain 'photo'), column 'image': its bytes are not an "
        "image Pillow can read",
    ),
    "data-image-16-bit": (
        "a 16-bit grey PNG using its range (Pillow's RGB conversion clips it white)",
        "wide",
        "error: dataset <world>/image-16-bit: row 4 (domain 'photo'), column 'image': an I;16 (high bit depth) image "
        "with values from 0 to 63000: as RGB (how it is trained on, and how transformers' processors serve it) they "
        "become whole numbers 0-255 (clipped; a 0-1 float image black); convert the images to 8 bits first",
    ),
    "data-image-missing-file": (
        "a path to a file that is not there",
        "missing_file",
        "error: dataset <world>/image-missing-file: row 4 (domain 'photo'), column 'image': "
        "<world>/image-missing-file/img/4.png: No such file or directory",
    ),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_an_image_that_does_not_decode_is_named_by_row_domain_and_column(case, world, tmp_path, capsys):
    what, bad, expected = DECODE_CASES[case]
    out = tmp_path / "out"
    argv = recycle_argv(world, getattr(world, bad), out)
    line = refused_while_decoding(case, what, argv, "row 4 (domain 'photo'), column 'image'", out, capsys, world)
    assert refusals.normalise(line, placeholders(world)) == expected
    recycles(recycle_argv(world, world.target, tmp_path / "corrected"), capsys)


# -- files datasets cannot read: one line naming the file ------------------------------------------------------

UNREADABLE_CASES = {  # case: (what, bad target, expected line)
    "data-malformed-parquet": (
        "a .parquet file that is not parquet",
        "malformed",
        "error: <world>/malformed.parquet: not a readable dataset (Failed to read schema from "
        "'<world>/malformed.parquet' with error ArrowInvalid: Parquet magic bytes not found in footer. Either the "
        "file is corrupted or this is not a parquet file.)",
    ),
    "data-corrupt-parquet-page": (
        "a parquet file whose data pages are overwritten",
        "corrupt_page",
        "error: <world>/corrupt-page: not a readable dataset (Failed to read file "
        "'<world>/corrupt-page/data/train-00000-of-00001.parquet' with error ArrowInvalid: Invalid or truncated "
        "PLAIN-encoded BYTE_ARRAY data)",
    ),
    "data-truncated-saved-dataset": (
        "a save_to_disk folder whose arrow file is cut short",
        "truncated_saved",
        "error: <world>/truncated-saved: not a readable dataset (ArrowInvalid: Expected to read 568 metadata bytes, "
        "but only read 92)",
    ),
}


@pytest.mark.parametrize("case", list(UNREADABLE_CASES))
def test_a_dataset_file_datasets_cannot_read_is_one_line_naming_it(case, world, tmp_path, capsys):
    what, bad, expected = UNREADABLE_CASES[case]
    out = tmp_path / "out"
    target = getattr(world, bad)
    refused_by_plan_and_recycle(case, what, target, str(target), expected, world, out, capsys)


# -- half precision: trains and saves in float32 ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_recycle_in_float32(dtype, world, tmp_path, capsys):
    name = str(dtype).removeprefix("torch.")
    folders = {}
    for role, source in (("base", world.base), ("aux", world.aux)):
        folders[role] = tmp_path / f"{role}-{name}"
        ResNetForImageClassification.from_pretrained(source).to(dtype).save_pretrained(folders[role])
        shutil.copyfile(source / "preprocessor_config.json", folders[role] / "preprocessor_config.json")
    out = tmp_path / "out"
    printed = recycles(recycle_argv(world, world.target, out, base=folders["base"], aux=folders["aux"]), capsys)
    assert f"[fetch] base is {name}: runs train and save in float32\n" in printed
    saved = [out / "soup", *(folder for folder in (out / "runs").iterdir() if not folder.name.startswith("."))]
    for folder in saved:
        model = next(folder.rglob("model.safetensors"))
        with safe_open(str(model), framework="pt") as handle:
            stored = {handle.get_slice(key).get_dtype() for key in handle.keys()}
        assert stored <= {"F32", "I64"}, (folder, stored)
    assert json.loads((out / "soup" / "config.json").read_text())["dtype"] == "float32"


# -- resources: a target cache the disk has no room for --------------------------------------------------------


def test_a_target_the_disk_has_no_room_to_cache_is_streamed_from_its_files(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = recycle_argv(world, world.target, out)
    with monkeypatch.context() as full_disk:
        full_disk.setattr(
            shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000)
        )
        printed = recycles(argv, capsys)
    assert (
        f"[data] the decoded target would take 37.2kB, more than the 1.00kB free in {out / 'cache'}: its images are "
        "decoded batch by batch from the dataset's files instead (the same pixels)\n"
    ) in printed
    assert [p.name for p in (out / "cache").rglob("*") if not p.name.endswith(".lock")] == []  # nothing decoded
    assert (out / "soup" / "model.safetensors").is_file()


# -- an empty dataset: one line naming it, whichever layout it comes in ------------------------------------------


def test_an_empty_dataset_is_refused_naming_it(world, tmp_path, capsys):
    empty = world.shapes.select([])
    targets = {
        "data-empty-hub-folder": (
            "a Hub-layout folder whose parquet file has no rows",
            _folder(empty, tmp_path / "hub"),
        ),
        "data-empty-parquet": ("a .parquet file with no rows", tmp_path / "empty.parquet"),
        "data-empty-saved-dataset": ("a save_to_disk folder of an empty Dataset", tmp_path / "saved"),
    }
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    empty.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    places = {"<tmp>": tmp_path}
    for case, (what, target) in targets.items():
        line = refusals.fails_cleanly(case, what, recycle_argv(world, target, out), str(target), out, capsys, places)
        assert line == f"error: {target}: an empty dataset (no rows)"
    argv = ["intertrain", "--base", str(world.base), "--dataset", str(tmp_path / "hub"), "--steps", "2",
            "--batch-size", "2", "--image-size", "16", "--output", str(out)]  # fmt: skip
    line = refusals.fails_cleanly(
        "data-empty-intertrain", "intertrain on a dataset with no rows", argv, "hub", out, capsys, places
    )
    assert line == f"error: {tmp_path / 'hub'}: an empty dataset (no rows)"
    argv[argv.index("--dataset") + 1] = str(world.target)
    recycles(argv, capsys)


# -- the base's preprocessor_config.json and config.json: what the recipe reads is checked at planning -------------

PROCESSOR_CASES = {  # case: (what, file, changes, expected line)
    "processor-size-negative": (
        "a negative size in the base's image processor",
        "preprocessor_config.json",
        {"size": {"height": -16, "width": -16}},
        "error: <tmp>/base/preprocessor_config.json: size.height must be a positive whole number of pixels (got -16)",
    ),
    "processor-size-string": (
        "a size given as a string",
        "preprocessor_config.json",
        {"size": {"height": "16", "width": "16"}},
        "error: <tmp>/base/preprocessor_config.json: size.height must be a positive whole number of pixels (got '16')",
    ),
    "processor-mean-two-numbers": (
        "an image_mean of 2 numbers",
        "preprocessor_config.json",
        {"image_mean": [0.5, 0.5]},
        "error: <tmp>/base/preprocessor_config.json: image_mean must be 3 numbers (got [0.5, 0.5])",
    ),
    "processor-mean-strings": (
        "an image_mean of strings",
        "preprocessor_config.json",
        {"image_mean": ["a", "b", "c"]},
        "error: <tmp>/base/preprocessor_config.json: image_mean must be 3 numbers (got ['a', 'b', 'c'])",
    ),
    "processor-std-zero": (
        "an image_std of zeros (a division by zero)",
        "preprocessor_config.json",
        {"image_std": [0, 0, 0]},
        "error: <tmp>/base/preprocessor_config.json: image_std must be 3 positive numbers (got [0, 0, 0])",
    ),
    "processor-type-unknown": (
        "an image_processor_type transformers does not have",
        "preprocessor_config.json",
        {"image_processor_type": "\x1b[2JEvilProcessor"},
        "error: <tmp>/base/preprocessor_config.json: image_processor_type '\\x1b[2JEvilProcessor' is no image "
        "processor transformers has",
    ),
    "processor-num-channels": (
        "a config.json with num_channels 1",
        "config.json",
        {"num_channels": 1},
        "error: <tmp>/base/config.json: num_channels is 1; images are fed as RGB (3 channels)",
    ),
    "processor-hidden-sizes": (
        "a config.json whose hidden_sizes do not match its weights",
        "config.json",
        {"hidden_sizes": [8, 16, 32]},
        "error: <tmp>/base: config.json does not match its weights: it builds tensor 'classifier.1.weight' as "
        "[10, 32], the weights hold [10, 16]",
    ),
}


def processor_resolution(argv: list[str]) -> list[str]:
    """`argv` without --image-size: the resolution is then the base processor's, which is what is checked."""
    at = argv.index("--image-size")
    return argv[:at] + argv[at + 2 :]


def _base_with(world, folder: Path, file: str, changes: dict) -> Path:
    shutil.copytree(world.base, folder)
    settings = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**settings, **changes}))
    return folder


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_a_base_config_the_recipe_cannot_use_is_refused_at_planning(case, world, tmp_path, capsys):
    what, file, changes, expected = PROCESSOR_CASES[case]
    base = _base_with(world, tmp_path / "base", file, changes)
    out = tmp_path / "out"
    argv = processor_resolution(recycle_argv(world, world.target, out, base=base))
    line = refusals.fails_cleanly(case, what, argv, f"{base}", out, capsys, {"<tmp>": tmp_path})
    assert refusals.normalise(line, {"<tmp>": tmp_path}) == expected


def test_the_corrected_base_recycles_and_loading_refuses_an_inconsistent_config(world, tmp_path, capsys):
    """The corrected base (the processor's 16 px) recycles; a config that does not match its weights is refused
    by load_classifier too (a recycled fine-tune is loaded only once its runs train), never re-initialised."""
    from ratatouille_hub.models import ArchitectureError, load_classifier

    recycles(processor_resolution(recycle_argv(world, world.target, tmp_path / "out")), capsys)
    folder = _base_with(world, tmp_path / "channels", "config.json", {"num_channels": 1})
    with pytest.raises(ArchitectureError) as refused:
        load_classifier(folder, {0: "a", 1: "b"})
    assert str(refused.value) == (
        f"{folder}: config.json does not match its weights: it builds tensor "
        "'resnet.embedder.embedder.convolution.weight' as [8, 1, 7, 7], the weights hold [8, 3, 7, 7]"
    )


# -- DomainBed folders: an --output inside the dataset is refused; a file at the root is metadata ----------------


def _domainbed(world, root: Path) -> Path:
    for row, example in enumerate(world.shapes):
        folder = root / example["domain"] / toyworld.SHAPES[example["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / f"{row}.png")
    return root


def test_an_output_inside_a_dataset_folder_is_refused_and_root_files_of_domainbed_are_ignored(world, tmp_path, capsys):
    dataset = _domainbed(world, tmp_path / "ShapesDB")
    places = {"<tmp>": tmp_path}
    for case, what, out in (
        ("data-output-is-the-dataset", "recycle --output the target's folder", dataset),
        ("data-output-inside-the-dataset", "recycle --output a folder inside the target's", dataset / "runs"),
    ):
        line = refusals.fails_cleanly(case, what, recycle_argv(world, dataset, out), "--output", out, capsys, places)
        assert line == (
            f"error: --output {out} is in the dataset folder {dataset}; what it writes would become part of the "
            "dataset: choose an output outside it"
        )
    out = dataset / "intertrained"
    argv = ["intertrain", "--base", str(world.base), "--dataset", str(dataset), "--output", str(out)]
    refusals.fails_cleanly(
        "data-intertrain-output-inside-the-dataset", "intertrain --output inside its dataset's folder", argv,
        "--output", out, capsys, places,
    )  # fmt: skip
    (dataset / "ImageInfo.csv").write_text("image,label\n")  # Office-Home keeps its metadata at the root
    printed = recycles(recycle_argv(world, dataset, tmp_path / "out"), capsys)
    assert "[data] " + str(dataset) + ": train domains painting, photo, sketch; held out: cartoon\n" in printed


INTERTRAIN_IMAGE_CASES = {
    # intertrain decodes its dataset under the same rule as a target, before it writes anything
    "data-intertrain-image-undecodable": (
        "intertrain on an image whose bytes are not an image",
        "undecodable",
        "its bytes are not an image",
    ),
    "data-intertrain-image-feature-path": (
        "intertrain on an Image feature whose path is /etc/passwd",
        "feature_path",
        "the path '/etc/passwd' leads outside the dataset's folder",
    ),
}


@pytest.mark.parametrize("case", list(INTERTRAIN_IMAGE_CASES))
def test_intertrain_refuses_a_bad_image_before_writing_anything(case, world, tmp_path, capsys):
    """A path leaving the dataset's folder is refused, not opened; an undecodable image leaves no folder."""
    what, bad, expected = INTERTRAIN_IMAGE_CASES[case]
    out = tmp_path / "inter"
    argv = ["intertrain", "--base", str(world.base), "--dataset", str(getattr(world, bad)), "--steps", "1",
            "--batch-size", "2", "--image-size", "16", "--output", str(out)]  # fmt: skip
    line = refusals.fails_cleanly(case, what, argv, "column 'image'", out, capsys, placeholders(world), watch=tmp_path)
    assert expected in line
