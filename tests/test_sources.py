"""Dataset sources: dispatch over the registered layouts, and the DomainBed folder layout."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Image
from PIL import Image as PILImage

from ratatouille_hub.data import DataError, split_domains
from ratatouille_hub.sources import DATASET_SOURCES, load_dataset_source, source_for

# labelme lacks "bird", the first class: per-domain numbering would shift its other ids
LAYOUT = {
    "caltech": {"bird": ["a.png", "b.png"], "car": ["a.png", "c.JPG"], "dog": ["a.png", "b.png"]},
    "labelme": {"car": ["a.png", "b.png"], "dog": ["a.jpeg", "b.png"]},
    "sun": {"bird": ["a.png", "b.png"], "car": ["a.png", "b.png"], "dog": ["a.png", "b.tif"]},
}
ROWS = [(d, c, f) for d in sorted(LAYOUT) for c in sorted(LAYOUT[d]) for f in sorted(LAYOUT[d][c])]
LABELS = ["bird", "car", "dog"]


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)


def write_image(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF"}
    PILImage.fromarray(pixels(seed)).save(path, format=formats.get(path.suffix.lower(), "PNG"))


def domainbed(root):
    """LAYOUT under `root`, every image distinct, plus hidden entries the source must ignore."""
    for seed, (domain, label, name) in enumerate(ROWS):
        write_image(root / domain / label / name, seed)
    (root / ".cache").mkdir()
    (root / ".cache" / "notes.txt").write_text("not data")
    (root / "sun" / "dog" / ".DS_Store").write_bytes(b"\0")
    return root


def fingerprint(root) -> str:
    return load_dataset_source(str(root))._fingerprint


# -- DomainBed folders ------------------------------------------------------------------------------


def test_domainbed_folder_reads_images_labels_and_domains_in_sorted_order(tmp_path):
    dataset = load_dataset_source(str(domainbed(tmp_path / "VLCS")))

    assert dataset.column_names == ["image", "label", "domain"]
    assert len(dataset) == len(ROWS) == 16
    assert dataset.features["label"].names == LABELS
    assert dataset["domain"] == [domain for domain, _, _ in ROWS]
    assert dataset["label"] == [LABELS.index(label) for _, label, _ in ROWS]
    paths = dataset.cast_column("image", Image(decode=False))["image"]
    assert [p["path"].split("/")[-3:] for p in paths] == [list(row) for row in ROWS]
    for chosen in (ROWS.index(("labelme", "dog", "b.png")), ROWS.index(("sun", "dog", "b.tif"))):  # lossless
        image = dataset[chosen]["image"]
        assert isinstance(image, PILImage.Image)
        assert np.array_equal(np.asarray(image), pixels(chosen))


def test_domainbed_fingerprint_is_the_same_across_loads_processes_and_locations(tmp_path):
    root = domainbed(tmp_path / "VLCS")
    first = fingerprint(root)
    assert len(first) == 64 and fingerprint(root) == first
    code = f"from ratatouille_hub.sources import load_dataset_source; print(load_dataset_source({str(root)!r})._fingerprint)"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == first
    # the same files elsewhere are the same data: run folders named by it are found again
    assert fingerprint(shutil.copytree(root, tmp_path / "copy")) == first


@pytest.mark.parametrize(
    ("path", "moved_to"),
    [
        pytest.param("sun/car/a.png", None, id="bytes"),
        pytest.param("caltech/bird/b.png", "caltech/car/b.png", id="class"),
        pytest.param("caltech/car/c.JPG", "sun/car/c.JPG", id="domain"),
    ],
)
def test_domainbed_fingerprint_changes_with_an_images_bytes_class_or_domain(tmp_path, path, moved_to):
    root = domainbed(tmp_path / "VLCS")
    before = fingerprint(root)
    if moved_to is None:
        write_image(root / path, 1000)
    else:
        (root / path).rename(root / moved_to)
    assert fingerprint(root) != before


@pytest.mark.parametrize(
    ("defect", "offender"),
    [
        ("stray-file", "sun/car/readme.txt"),
        ("nested-folder", "sun/car/more"),
        ("empty-class", "labelme/bird"),
        ("empty-domain", "pacs"),
    ],
)
def test_a_malformed_domainbed_folder_is_refused_naming_the_path(tmp_path, defect, offender):
    root = domainbed(tmp_path / "VLCS")
    if defect == "stray-file":
        (root / offender).write_text("not an image")
    elif defect == "nested-folder":
        write_image(root / offender / "x.png", 0)
    else:
        (root / offender).mkdir()
        (root / offender / ".hidden").write_text("ignored: the folder still counts as empty")
    assert source_for(str(root)).name == "domainbed-folder"
    with pytest.raises(DataError) as error:
        load_dataset_source(str(root))
    message = str(error.value)
    assert "\n" not in message and str(root / offender) in message


def test_split_domains_runs_on_a_domainbed_folder(tmp_path):
    dataset = load_dataset_source(str(domainbed(tmp_path / "VLCS")))
    splits = split_domains(
        dataset, domain_column="domain", label_column="label", test_domain="labelme", holdout_fraction=0.5, seed=0
    )
    assert splits.label_names == tuple(LABELS)
    assert sorted(splits.test) == [i for i, (domain, _, _) in enumerate(ROWS) if domain == "labelme"]
    assert [split.domain for split in splits.train_domains] == ["caltech", "sun"]
    for split in splits.train_domains:
        assert len(split.train) == len(split.val) == 3


# -- dispatch ---------------------------------------------------------------------------------------


def test_the_registry_lists_the_sources_in_dispatch_order():
    assert DATASET_SOURCES.names() == (
        "parquet-file",
        "datasets-folder",
        "domainbed-folder",
        "hub-layout-folder",
        "hub",
    )


def test_each_layout_goes_to_its_source_and_loads(tmp_path):
    original = Dataset.from_dict({"x": [3, 1, 2], "domain": ["a", "b", "a"]})
    original.to_parquet(str(tmp_path / "rows.parquet"))
    original.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    original.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    (tmp_path / "hub" / "README.md").write_text("# rows\n")
    expected = {"rows.parquet": "parquet-file", "saved": "datasets-folder", "hub": "hub-layout-folder"}
    for name, source in expected.items():
        assert source_for(str(tmp_path / name)).name == source, name
        assert load_dataset_source(str(tmp_path / name))["x"] == [3, 1, 2], name
    assert source_for(str(domainbed(tmp_path / "VLCS"))).name == "domainbed-folder"
    assert source_for("org/some-dataset").name == "hub"


def test_dataset_dict_splits_are_joined_in_sorted_split_order(tmp_path):
    DatasetDict({"train": Dataset.from_dict({"x": [1, 2]}), "test": Dataset.from_dict({"x": [3]})}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert load_dataset_source(str(tmp_path / "dict"))["x"] == [3, 1, 2]


def test_an_imagefolder_with_split_folders_is_not_taken_for_domains(tmp_path):
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            write_image(tmp_path / "pets" / split / label / "a.png", 0)
    assert source_for(str(tmp_path / "pets")).name == "hub-layout-folder"


def test_a_missing_path_or_an_unknown_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such dataset folder or file \\(and not a Hub dataset id\\)"):
        load_dataset_source(str(tmp_path / "nowhere" / "data.parquet"))
    (tmp_path / "rows.csv").write_text("x\n1\n")
    with pytest.raises(DataError, match="not a .parquet file or a dataset folder"):
        source_for(str(tmp_path / "rows.csv"))


def test_a_hub_loading_script_is_refused_naming_the_repo(monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found org-data.py")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(DataError, match="^org/data: holds a dataset loading script .* is never run$"):
        load_dataset_source("org/data", revision="abc")


def test_recycle_takes_a_domainbed_folder_as_its_target(tiny_world, tmp_path):
    """`--target ./VLCS` on the folder DomainBed's download script leaves: ROOT/<domain>/<class>/<image>."""
    from ratatouille_hub import recycle
    from ratatouille_hub.testing import tiny_recipe
    from ratatouille_hub.toy import world as toyworld

    root = tmp_path / "ShapesDB"
    shapes = toyworld.target_dataset(per_class_per_domain=3, size=16)
    for i, row in enumerate(shapes):
        folder = root / row["domain"] / toyworld.SHAPES[row["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / f"{i:03d}.png")
    config = tiny_recipe(tiny_world, tmp_path / "out", strategy="erm", test_domain="sketch")
    config = config.replace(target=str(root), runs=1)
    results = recycle(config, echo=lambda line: None)
    assert results.test_domain == "sketch" and results.train_domains == ["cartoon", "painting", "photo"]
    assert list(results.id2label.values()) == sorted(toyworld.SHAPES)  # class folders, in sorted order
    assert results.target == str(root)
