"""Target data: leave-one-domain-out splits, decoding, and the batched DomainBed augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as DatasetImage
from PIL import Image

from ratatouille_hub.data import (
    DataError,
    Normalization,
    augment,
    decode_images,
    normalization_of,
    resolution_of,
    split_domains,
)
from ratatouille_hub.testing import write_hub_dataset
from ratatouille_hub.toy import world as toyworld

PER_CLASS = 5  # 6 classes x 5 = 30 rows per domain


@pytest.fixture(scope="module")
def target() -> Dataset:
    return toyworld.target_dataset(per_class_per_domain=PER_CLASS, size=8)


def split(dataset, test_domain="sketch", seed=0, holdout_fraction=0.2, **columns):
    return split_domains(
        dataset,
        domain_column=columns.get("domain_column", "domain"),
        label_column=columns.get("label_column", "label"),
        test_domain=test_domain,
        holdout_fraction=holdout_fraction,
        seed=seed,
    )


def rows_of(dataset, domain: str) -> set[int]:
    return {i for i, d in enumerate(dataset["domain"]) if d == domain}


# -- split_domains ----------------------------------------------------------------------------------


def test_held_out_domain_never_enters_train_or_validation(target):
    splits = split(target, "sketch")
    sketch = rows_of(target, "sketch")
    assert splits.test_domain == "sketch"
    assert set(splits.test) == sketch and len(splits.test) == 30
    assert [d.domain for d in splits.train_domains] == ["cartoon", "painting", "photo"]
    for domain in splits.train_domains:
        assert not (set(domain.train) | set(domain.val)) & sketch


def test_each_training_domain_is_split_80_20_without_overlap(target):
    splits = split(target, "sketch")
    for domain in splits.train_domains:
        train, val = set(domain.train), set(domain.val)
        assert not train & val
        assert train | val == rows_of(target, domain.domain)  # every row of the domain, nothing else
        assert (len(train), len(val)) == (24, 6)  # floor(30 * 0.2) = 6 held out for validation
        assert list(domain.train) == sorted(domain.train) and len(domain.train) == len(train)
    wider = split(target, "sketch", holdout_fraction=0.3)
    assert all((len(d.train), len(d.val)) == (21, 9) for d in wider.train_domains)


def test_labels_and_default_test_domain(target):
    splits = split(target, test_domain=None)
    assert splits.test_domain == "cartoon"  # first domain in sorted order
    assert splits.label_names == toyworld.SHAPES
    assert splits.id2label == dict(enumerate(toyworld.SHAPES))


def test_split_is_deterministic_per_seed_and_per_domain(target):
    first, again, other = split(target, seed=0), split(target, seed=0), split(target, seed=1)
    assert first == again
    for a, b in zip(first.train_domains, other.train_domains):
        assert a.domain == b.domain and set(a.val) != set(b.val)
    # Seeded per domain (DomainBed): holding out another domain leaves the shared domains' splits alone.
    by_domain = {d.domain: d for d in split(target, "cartoon").train_domains}
    for domain in first.train_domains:
        if domain.domain in by_domain:
            assert by_domain[domain.domain] == domain


def test_string_labels_are_sorted_into_names():
    data = Dataset.from_dict({"domain": ["a"] * 4 + ["b"] * 4, "label": ["dog", "cat"] * 4})
    splits = split(data, "b")
    assert splits.label_names == ("cat", "dog")


def _table(domains: list[str], labels: list[int]) -> Dataset:
    features = Features({"domain": Value("string"), "label": ClassLabel(names=["x", "y"])})
    return Dataset.from_dict({"domain": domains, "label": labels}, features=features)


@pytest.mark.parametrize(
    ("dataset", "kwargs", "message"),
    [
        (_table(["a", "a", "b", "b"], [0, 1, 0, 1]), {"test_domain": "c"}, "unknown test domain 'c'"),
        (_table(["a", "a", "b", "b"], [0, 1, 0, 1]), {"domain_column": "env"}, "no column 'env'"),
        (_table(["a", "a", "b", "b"], [0, 1, 0, 1]), {"label_column": "y"}, "no column 'y'"),
        (_table(["a", "a", "b", "b", "c", "c"], [0, 1, 0, 0, 1, 0]), {"test_domain": "a"}, "'b' holds a single class"),
        (_table(["a", "a", "b"], [0, 1, 0]), {"test_domain": "a"}, "'b' has 1 image"),
        (_table(["a", "a"], [0, 1]), {"test_domain": "a"}, "at least 2 domains"),
    ],
    ids=[
        "unknown-test-domain",
        "missing-domain-column",
        "missing-label-column",
        "one-class-domain",
        "one-image-domain",
        "single-domain",
    ],
)
def test_unusable_targets_raise_data_error(dataset, kwargs, message):
    with pytest.raises(DataError, match=message):
        split(dataset, **kwargs)


def test_a_one_class_test_domain_is_fine():
    splits = split(_table(["a", "a", "b", "b"], [0, 1, 0, 0]), "b")  # only training domains must hold 2 classes
    assert sorted(splits.test) == [2, 3]
    assert splits.test == splits.held_out.train + splits.held_out.val  # laid out as every domain is


def test_a_domain_splits_the_same_whichever_domain_is_held_out():
    """One decoded copy of the target serves every held-out domain (--test-domain all, the cache)."""
    dataset = _table(["a"] * 10 + ["b"] * 10 + ["c"] * 10, [0, 1] * 15)
    held_out_a, held_out_c = split(dataset, "a"), split(dataset, "c")
    assert [d.domain for d in held_out_a.train_domains] == ["b", "c"]
    assert [d.domain for d in held_out_c.train_domains] == ["a", "b"]
    assert held_out_a.train_domains[0] == held_out_c.train_domains[1]  # domain b, split the same
    assert held_out_a.held_out == held_out_c.train_domains[0]  # domain a, held out or not
    assert set(held_out_a.test) == set(range(10))


# -- loading ----------------------------------------------------------------------------------------


def test_load_target_reads_parquet_files_saved_datasets_and_hub_layout_folders(tmp_path):
    from datasets import DatasetDict

    from ratatouille_hub.sources import load_dataset_source as load_target

    original = toyworld.target_dataset(per_class_per_domain=1, size=8)
    parquet = tmp_path / "shapes.parquet"
    original.to_parquet(str(parquet))
    original.save_to_disk(str(tmp_path / "saved"))
    write_hub_dataset(original, tmp_path / "hub", card=None)
    for source in (parquet, tmp_path / "saved", tmp_path / "hub"):
        loaded = load_target(str(source))
        assert loaded.features == original.features, source
        assert loaded["label"] == original["label"] and loaded["domain"] == original["domain"], source
    # every split of a DatasetDict is used, in sorted split order
    DatasetDict({"train": original.select(range(10)), "test": original.select(range(10, 24))}).save_to_disk(
        str(tmp_path / "dict")
    )
    joined = load_target(str(tmp_path / "dict"))
    assert joined["domain"] == original["domain"][10:] + original["domain"][:10]


# -- decoding ---------------------------------------------------------------------------------------


def test_decode_images_keeps_row_order_channels_and_labels(target):
    rows = [7, 3, 95]
    images = decode_images(
        target, rows, image_column="image", label_column="label", label_names=toyworld.SHAPES, size=6
    )
    assert images.pixels.shape == (3, 3, 6, 6) and images.pixels.dtype == torch.uint8
    assert images.labels.tolist() == [target[r]["label"] for r in rows]
    for i, row in enumerate(rows):
        expected = np.asarray(target[row]["image"].convert("RGB").resize((6, 6), Image.BILINEAR))
        assert np.array_equal(images.pixels[i].permute(1, 2, 0).numpy(), expected)


def test_a_16_bit_grey_image_within_8_bit_values_decodes_as_its_8_bit_copy(tmp_path):
    """A 16-bit image (a PNG; a big-endian TIFF, as ImageJ writes them, which Pillow opens as I;16B) whose values
    stay within 0-255 loses nothing as RGB; one that uses its range is refused (tests/test_integrity_data.py), as is
    a 0-1 float image, which RGB would make black."""
    values = (np.arange(64).reshape(8, 8) * 4).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "wide.png")
    Image.frombytes("I;16B", (8, 8), values.astype(">u2").tobytes()).save(tmp_path / "big-endian.tif")
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "narrow.png")
    assert [Image.open(tmp_path / name).mode for name in ("wide.png", "big-endian.tif")] == ["I;16", "I;16B"]
    files = [str(tmp_path / name) for name in ("wide.png", "big-endian.tif", "narrow.png")]
    dataset = Dataset.from_dict({"image": files, "label": ["a", "b", "a"]}).cast_column("image", DatasetImage())
    images = decode_images(
        dataset, [0, 1, 2], image_column="image", label_column="label", label_names=["a", "b"], size=8
    )
    assert torch.equal(images.pixels[0], images.pixels[2]) and torch.equal(images.pixels[1], images.pixels[2])
    assert images.pixels[2][0].flatten().tolist() == values.flatten().tolist()

    Image.fromarray(values.astype(np.float32) / 252).save(tmp_path / "float.tif")
    floats = Dataset.from_dict({"image": [str(tmp_path / "float.tif")], "label": ["a"]}).cast_column(
        "image", DatasetImage()
    )
    with pytest.raises(
        DataError, match=r"row 0, column 'image': an F \(high bit depth\) image with values from 0 to 1: "
    ):
        decode_images(floats, [0], image_column="image", label_column="label", label_names=["a", "b"], size=8)


def test_normalization_and_processor_settings():
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(
        size={"height": 24, "width": 24}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.5]
    )
    normalize = normalization_of(processor)
    assert normalize == Normalization((0.4, 0.5, 0.6), (0.2, 0.25, 0.5))
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = torch.tensor([(1 - 0.4) / 0.2, (1 - 0.5) / 0.25, (1 - 0.6) / 0.5]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(normalize.from_uint8(white), expected)
    assert resolution_of(processor, None) == 24
    assert resolution_of(processor, 40) == 40


class _MappingProcessor:
    """A processor as `normalization_of` reads one: settings, and a call that maps each pixel with `mapping`."""

    image_mean, image_std = [0.5] * 3, [0.5] * 3

    def __init__(self, mapping):
        self.mapping = mapping

    def __call__(self, images, return_tensors):
        pixels = np.stack([np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255 for image in images])
        return {"pixel_values": self.mapping(pixels)}


def test_a_processor_that_does_more_than_its_settings_say_is_followed_and_one_that_cannot_be_is_refused():
    """The settings are checked against what the processor does to plain images: a scale and shift of each
    channel its settings do not say (rescale_offset's [-1, 1]) is followed; a mix of channels (grey), a curve,
    or a channel order with a normalisation (no transformers processor could be saved to serve it) refused."""
    offset = normalization_of(_MappingProcessor(lambda x: 2 * x - 1))
    assert offset == Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # what the settings say too
    twice = normalization_of(_MappingProcessor(lambda x: (x - 0.5) / 0.25))
    assert twice.mean == pytest.approx((0.5,) * 3) and twice.std == pytest.approx((0.25,) * 3)
    grey = _MappingProcessor(lambda x: x.mean(axis=1, keepdims=True).repeat(3, axis=1))
    with pytest.raises(DataError, match=r"maps pixel values in a way that is not a scale and shift of each channel"):
        normalization_of(grey, "org/base")
    with pytest.raises(DataError, match=r"^org/base/preprocessor_config.json: _MappingProcessor maps pixel values"):
        normalization_of(_MappingProcessor(lambda x: x**2), "org/base")
    bgr_normalised = _MappingProcessor(lambda x: (x[:, ::-1] - 0.5) / 0.5)
    with pytest.raises(DataError, match=r"reorders the channels \[2, 1, 0\] and normalises \(mean \[0.5, 0.5, 0.5\]"):
        normalization_of(bgr_normalised)


class _TorchOnlyProcessor(_MappingProcessor):
    """A processor that returns torch tensors only, as some remote-code processors do."""

    def __call__(self, images, return_tensors):
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported")
        return {"pixel_values": torch.from_numpy(super().__call__(images, return_tensors)["pixel_values"].copy())}


def test_a_processor_that_returns_torch_tensors_only_is_read_off_too():
    """Its settings say mean 0.5, std 0.5; what it does (a BGR flip alone; a division by 0.25) is what is followed."""
    bgr = normalization_of(_TorchOnlyProcessor(lambda x: x[:, ::-1]))
    assert bgr.channels == (2, 1, 0) and bgr.mean == pytest.approx((0.0,) * 3) and bgr.std == pytest.approx((1.0,) * 3)
    twice = normalization_of(_TorchOnlyProcessor(lambda x: (x - 0.5) / 0.25))
    assert twice.mean == pytest.approx((0.5,) * 3) and twice.std == pytest.approx((0.25,) * 3)


def test_the_resolution_is_the_crop_only_when_the_processor_crops():
    """google/efficientnet-b0's processor: resize to `size`, a `crop_size` it never applies (do_center_crop false)."""
    from transformers import EfficientNetImageProcessor

    sizes = {"size": {"height": 64, "width": 64}, "crop_size": {"height": 289, "width": 289}}
    assert resolution_of(EfficientNetImageProcessor(**sizes, do_center_crop=False), None) == 64
    assert resolution_of(EfficientNetImageProcessor(**sizes, do_center_crop=True), None) == 289


# -- augmentation -----------------------------------------------------------------------------------


def _batch(n: int = 64, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_augment_shape_range_and_input_untouched():
    pixels = _batch()
    before = pixels.clone()
    out = augment(pixels, torch.Generator().manual_seed(0))
    assert out.shape == pixels.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(pixels, before)
    assert not torch.allclose(out, pixels.float() / 255)  # it did change the images


def test_augment_is_deterministic_for_a_generator_state():
    pixels = _batch()
    a = augment(pixels, torch.Generator().manual_seed(3))
    b = augment(pixels, torch.Generator().manual_seed(3))
    c = augment(pixels, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    generator = torch.Generator().manual_seed(3)
    first, second = augment(pixels, generator), augment(pixels, generator)  # the generator advances
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_augment_of_a_flat_grey_image_only_changes_its_brightness():
    # Crop, flip, contrast, saturation and grayscale all leave a uniform grey image uniform grey;
    # brightness scales it by a factor in [0.7, 1.3].
    grey = torch.full((200, 3, 10, 10), 128, dtype=torch.uint8)
    out = augment(grey, torch.Generator().manual_seed(0))
    per_image = out.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image), rtol=0, atol=1e-5)
    value = per_image[:, 0]
    assert value.min() >= 0.7 * 128 / 255 - 1e-6 and value.max() <= 1.3 * 128 / 255 + 1e-6
    assert value.max() - value.min() > 0.3 * 128 / 255  # the factor really varies


def test_augment_flips_half_and_greys_a_tenth():
    n, size = 2000, 12
    generator = torch.Generator().manual_seed(0)
    # left half dark red, right half bright green: the crop (>= 72% of the width) always spans the middle
    pixels = torch.zeros((n, 3, size, size), dtype=torch.uint8)
    pixels[:, 0, :, : size // 2] = 90
    pixels[:, 1, :, size // 2 :] = 220
    out = augment(pixels, generator)
    brightness = out.mean(dim=1)
    flipped = brightness[:, :, : size // 2].mean(dim=(1, 2)) > brightness[:, :, size // 2 :].mean(dim=(1, 2))
    grey = (out.max(dim=1).values - out.min(dim=1).values).amax(dim=(1, 2)) < 1e-6
    assert 0.45 < flipped.float().mean().item() < 0.55
    assert 0.07 < grey.float().mean().item() < 0.13


def _augment_on_the_host(pixels_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The augmentation as the training loop ran it on the host before it moved to the device (commit cce991c):
    boolean masks, the jitter drawn after the crop. The device version must give its bytes on a CPU."""
    n = pixels_uint8.shape[0]
    x = pixels_uint8.float().div_(255.0)
    u = torch.rand((n, 6), generator=generator)
    area = 0.7 + 0.3 * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    crop_w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    crop_h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    center_x = (1 - crop_w) * u[:, 2] + crop_w / 2
    center_y = (1 - crop_h) * u[:, 3] + crop_h / 2
    theta = torch.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2] = crop_w, 2 * center_x - 1
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, 2 * center_y - 1
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    flip = u[:, 4] < 0.5
    out[flip] = out[flip].flip(-1)
    jitter = 1.0 + (torch.rand((n, 3, 1, 1, 1), generator=generator) * 0.6 - 0.3)
    out = (out * jitter[:, 0]).clamp_(0, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * jitter[:, 1] + mean).clamp_(0, 1)
    gray = 0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]
    out = ((out - gray) * jitter[:, 2] + gray).clamp_(0, 1)
    to_gray = u[:, 5] < 0.1
    if to_gray.any():
        g = 0.299 * out[to_gray, 0:1] + 0.587 * out[to_gray, 1:2] + 0.114 * out[to_gray, 2:3]
        out[to_gray] = g.expand(-1, 3, -1, -1)
    return out


def test_augment_on_a_cpu_gives_the_host_augmentations_bytes_and_draws():
    pixels = _batch(n=300, size=20)  # 300 images: flips and greyed rows both occur
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):  # the generator advances the same way, batch after batch
        assert torch.equal(augment(pixels, ours), _augment_on_the_host(pixels, theirs))
    assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=theirs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_on_a_gpu_matches_the_cpu_up_to_rounding_from_the_same_draws():
    pixels = _batch(n=300, size=20)
    on_gpu = augment(pixels.cuda(), torch.Generator().manual_seed(7))
    on_cpu = augment(pixels, torch.Generator().manual_seed(7))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-4)
