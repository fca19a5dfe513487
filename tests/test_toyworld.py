"""The built-in toy world: deterministic, well-typed, balanced, and with a real domain shift."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Image, Value

from ratatouille_hub.toy import world as toyworld


@pytest.fixture(scope="module")
def target() -> Dataset:
    return toyworld.target_dataset(per_class_per_domain=8, seed=0)


@pytest.fixture(scope="module")
def aux() -> dict[str, Dataset]:
    return toyworld.aux_datasets(per_class=6, seed=0)


def _png_bytes(dataset: Dataset) -> list[bytes]:
    return [row["bytes"] for row in dataset.cast_column("image", Image(decode=False))["image"]]


def _pixels(dataset: Dataset) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in dataset["image"]])


def test_target_features(target):
    assert set(target.column_names) == {"image", "label", "domain"}
    assert isinstance(target.features["image"], Image)
    assert isinstance(target.features["label"], ClassLabel)
    assert target.features["label"].names == list(toyworld.SHAPES)
    assert target.features["domain"] == Value("string")
    assert set(target["domain"]) == set(toyworld.DOMAINS)


def test_target_is_balanced_per_domain(target):
    counts = Counter(zip(target["domain"], target["label"]))
    assert len(counts) == len(toyworld.DOMAINS) * len(toyworld.SHAPES)
    assert set(counts.values()) == {8}


@pytest.mark.parametrize("size", [16, 32, 48])
def test_images_are_rgb_of_the_requested_size(size):
    datasets = [
        toyworld.target_dataset(per_class_per_domain=1, size=size),
        toyworld.pretrain_dataset(n=10, size=size),
        *toyworld.aux_datasets(per_class=1, size=size).values(),
    ]
    for dataset in datasets:
        for image in dataset["image"]:
            assert image.mode == "RGB" and image.size == (size, size)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: toyworld.target_dataset(per_class_per_domain=2, seed=seed),
        lambda seed: toyworld.pretrain_dataset(n=20, seed=seed),
        lambda seed: toyworld.aux_datasets(per_class=2, seed=seed)["dots"],
    ],
    ids=["target", "pretrain", "aux"],
)
def test_same_seed_same_bytes_other_seed_other_images(make):
    first, again, other = _png_bytes(make(0)), _png_bytes(make(0)), _png_bytes(make(1))
    assert first == again
    assert sum(a != b for a, b in zip(first, other)) == len(first)


def test_generation_leaves_global_random_state_alone():
    np_state, py_state = np.random.get_state(), random.getstate()
    toyworld.target_dataset(per_class_per_domain=1)
    toyworld.pretrain_dataset(n=10)
    toyworld.aux_datasets(per_class=1)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_sketch_and_photo_differ_by_a_clear_margin(target):
    pixels, domains = _pixels(target), np.array(target["domain"])
    grey = pixels.mean(axis=-1)
    brightness = pixels.mean(axis=(1, 2, 3))
    colourfulness = pixels.std(axis=-1).mean(axis=(1, 2))  # spread across RGB channels
    edges = (np.abs(np.diff(grey, axis=2)) > 0.15).mean(axis=(1, 2))
    sketch, photo = domains == "sketch", domains == "photo"
    assert brightness[sketch].mean() > brightness[photo].mean() + 0.3
    assert colourfulness[photo].mean() > 3 * colourfulness[sketch].mean()
    assert edges[sketch].mean() > 3 * edges[photo].mean()


def test_pretrain_task_is_balanced_digits():
    pretrain = toyworld.pretrain_dataset(n=50)
    assert pretrain.column_names == ["image", "label"]
    assert pretrain.features["label"].names == list(toyworld.DIGITS)
    assert set(Counter(pretrain["label"]).values()) == {5}


def test_pretrain_photo_shapes_adds_the_six_shapes_as_photographs_and_keeps_the_digits():
    digits = toyworld.pretrain_dataset(n=40)
    mixed = toyworld.pretrain_dataset(n=64, photo_shapes=True)
    assert mixed.features["label"].names == [*toyworld.DIGITS, *toyworld.SHAPES]
    assert set(Counter(mixed["label"]).values()) == {4}
    # the digits are drawn from their own stream: every digit is the same image with or without shapes
    digit_rows = [i for i, label in enumerate(mixed["label"]) if label < len(toyworld.DIGITS)]
    mixed_bytes = _png_bytes(mixed)
    assert [mixed_bytes[i] for i in digit_rows] == _png_bytes(digits)
    shapes = mixed.filter(lambda row: row["label"] >= len(toyworld.DIGITS))
    photos = toyworld.target_dataset(per_class_per_domain=4, domains=("photo",))
    sketches = toyworld.target_dataset(per_class_per_domain=4, domains=("sketch",))

    def colourfulness(dataset):  # spread across RGB channels
        return _pixels(dataset).std(axis=-1).mean()

    # photographs: as colourful as the target's photo domain, never its sketches' near-white pages
    assert abs(colourfulness(shapes) - colourfulness(photos)) < 0.3 * colourfulness(photos)
    assert colourfulness(shapes) > 3 * colourfulness(sketches)
    assert _pixels(shapes).mean() < _pixels(sketches).mean() - 0.3
    # drawn from their own stream, so none is one of the target's photographs
    assert not set(_png_bytes(shapes)) & set(_png_bytes(photos))


def test_aux_tasks_are_balanced_with_readable_classes(aux):
    expected = {"stripes": toyworld.STRIPE_ORIENTATIONS, "dots": toyworld.DOT_COUNTS, "polygons": toyworld.POLYGONS}
    assert aux.keys() == expected.keys()
    for name, dataset in aux.items():
        assert dataset.column_names == ["image", "label"]
        assert dataset.features["label"].names == list(expected[name])
        assert set(Counter(dataset["label"]).values()) == {6}


def test_describe_names_every_task(aux):
    descriptions = toyworld.describe()
    assert set(descriptions) == {"shapes", "glyphs", *aux}
    assert all(isinstance(text, str) and text for text in descriptions.values())


def test_leaving_a_domain_out_changes_none_of_the_others(target):
    """What lets benchmarks/demo_criteria.py measure the demo's world without ever drawing its held-out domain."""
    kept = ("photo", "cartoon", "painting")
    without = toyworld.target_dataset(per_class_per_domain=8, seed=0, domains=kept)
    assert set(without["domain"]) == set(kept)
    rows = [i for i, domain in enumerate(target["domain"]) if domain in kept]
    assert _png_bytes(without) == [_png_bytes(target)[i] for i in rows]
    assert without["label"] == [target["label"][i] for i in rows]


def test_an_unknown_domain_is_refused():
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['sketches'\]"):
        toyworld.target_dataset(per_class_per_domain=1, domains=("photo", "sketches"))
