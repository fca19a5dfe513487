"""What is evaluated is what is served: `pipeline(model=soup)` on the held-out images scores exactly the
held-out accuracy results.json and the card report, whatever the base's own processor does (a shortest-edge
resize and centre crop as microsoft/resnet-50 ships, a squash, or a timm model's pretrained_cfg), on
non-square images."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    ConvNextImageProcessorPil,
    EfficientNetConfig,
    EfficientNetForImageClassification,
    EfficientNetImageProcessorPil,
    MobileViTConfig,
    MobileViTForImageClassification,
    MobileViTImageProcessorPil,
    ViTImageProcessorPil,
    pipeline,
)

from ratatouille_hub import recycle
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.fetch import resolve_model
from ratatouille_hub.sources import load_dataset_source
from ratatouille_hub.target import TargetPreparation
from ratatouille_hub.testing import labels, tiny_resnet, tiny_timm, write_hub_dataset
from ratatouille_hub.toy import world as toyworld

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 16
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
DIGITS = [f"digit-{i}" for i in range(10)]


def crop_processor():
    """As microsoft/resnet-50 ships it: shortest edge to size / 0.875, then a size x size centre crop."""
    return ConvNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_pct=0.875, image_mean=MEAN, image_std=STD)


def squash_processor():
    return ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD)


def timm_base(folder):
    cfg = {"input_size": [3, SIZE, SIZE], "mean": MEAN, "std": STD}  # as timm's EfficientNets ship: bicubic, crop
    return tiny_timm(
        folder,
        {**cfg, "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"},
        names=DIGITS,
        variance=(0.05, 0.2),
    )


@pytest.fixture(scope="module")
def wide_target(tmp_path_factory):
    """The toy shapes drawn at 32 px, then stretched to 40 x 24: no image is square."""
    shapes = toyworld.target_dataset(per_class_per_domain=4, size=32)
    wide = shapes.map(lambda row: {"image": row["image"].resize((40, 24))})
    return write_hub_dataset(wide, tmp_path_factory.mktemp("wide") / "shapes")


def resnet_base(folder, processor):
    tiny_resnet(0, names=DIGITS).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def mobilevit_base(folder):
    """As apple/mobilevit-small ships: its processor flips RGB to BGR and does not normalise. 32 px: the
    smallest input its five halvings take."""
    torch.manual_seed(0)
    config = MobileViTConfig(
        image_size=32, hidden_sizes=[16] * 3, neck_hidden_sizes=[8] * 6 + [16], num_attention_heads=1, **labels(DIGITS)
    )
    MobileViTForImageClassification(config).save_pretrained(folder)
    processor = MobileViTImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


def efficientnet_base(folder):
    """As google/efficientnet-b0 ships: include_top, so its processor divides by the std twice."""
    torch.manual_seed(0)
    config = EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, **labels(DIGITS)
    )
    EfficientNetForImageClassification(config).save_pretrained(folder)
    EfficientNetImageProcessorPil(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD).save_pretrained(
        folder
    )
    return folder


BASES = {"crop": lambda f: resnet_base(f, crop_processor()), "squash": lambda f: resnet_base(f, squash_processor())}
BASES["timm"] = timm_base
BASES["mobilevit"] = mobilevit_base
BASES["efficientnet"] = efficientnet_base


@pytest.mark.parametrize("kind", list(BASES))
def test_pipeline_on_the_soup_scores_what_results_json_reports(kind, wide_target, tmp_path):
    base = BASES[kind](tmp_path / "base")
    config = RecipeConfig(
        base=str(base),
        target=str(wide_target),
        test_domain="sketch",
        strategy="soup",
        runs=2,
        steps=20,
        eval_every=10,
        lp_steps=300,
        lp_lr=3e-2,
        batch_size=4,
        lr=3e-3,
        lr_choices=(3e-3,),
        output=str(tmp_path / "out"),
    )
    results = recycle(config, echo=lambda line: None)
    soup = tmp_path / "out" / "soup"
    held_out = load_dataset_source(str(wide_target)).filter(lambda d: d == "sketch", input_columns="domain")
    assert {image.size for image in held_out["image"]} == {(40, 24)}
    truth = [toyworld.SHAPES[y] for y in held_out["label"]]
    served = accuracy(pipeline("image-classification", model=str(soup)), held_out["image"], truth)
    print(f"{kind}: soup reported {results.soup.test_accuracy:.4f}, served {served:.4f}")
    assert served == results.soup.test_accuracy

    # The pixels the served processor feeds the model are those evaluation fed it, up to the resize's
    # rounding: one uint8 step of the image at most.
    preparation = TargetPreparation(config, resolve_model(config.base))
    target = preparation.decode()
    evaluated_pixels = target.data.normalize.from_uint8(target.test.pixels)
    in_test_order = load_dataset_source(str(wide_target)).select(list(preparation.splits.test))  # as evaluated
    served_pixels = pipeline("image-classification", model=str(soup)).image_processor(
        list(in_test_order["image"]), return_tensors="pt"
    )["pixel_values"]
    size = 32 if kind in ("mobilevit", "efficientnet") else SIZE
    assert served_pixels.shape == evaluated_pixels.shape == (len(held_out), 3, size, size)
    std = torch.tensor(target.data.normalize.std).view(1, 3, 1, 1)
    steps = (served_pixels - evaluated_pixels).abs() * std * 255  # in uint8 steps of the image
    print(
        f"{kind}: pixels differ by at most {float(steps.max()):.3f} uint8 steps, {float(steps.mean()):.4f} on average"
    )
    assert float(steps.mean()) < 0.05 and float(steps.max()) < 1.001

    # The best run (what --strategy erm serves, from the same runs): the served probabilities of every
    # held-out image are those evaluation computed, up to the resize's rounding.
    best = recycle(config.replace(strategy="erm"), echo=lambda line: None)
    evaluated = load_file(tmp_path / "out" / best.best_single.folder / "predictions.safetensors")["test"].softmax(1)
    classify = pipeline("image-classification", model=str(soup))
    rows = classify(list(in_test_order["image"]), top_k=len(toyworld.SHAPES))
    served_probabilities = torch.tensor(
        [[next(r["score"] for r in row if r["label"] == c) for c in toyworld.SHAPES] for row in rows]
    )
    print(f"{kind}: largest probability difference {float((served_probabilities - evaluated).abs().max()):.2e}")
    torch.testing.assert_close(served_probabilities, evaluated, atol=2e-3, rtol=0)
    assert accuracy(classify, held_out["image"], truth) == best.soup.test_accuracy


def accuracy(classify, images, truth) -> float:
    predicted = [top[0]["label"] for top in classify(list(images), top_k=1)]
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


@pytest.mark.parametrize("kind", ["squash", "mobilevit", "efficientnet"])
def test_training_feeds_the_base_what_its_own_processor_feeds_it(kind, tmp_path):
    """On images already at the base's resolution (so no resize differs), the pixels training and evaluation
    feed the model are the base's own processor's: MobileViT's BGR and no normalisation, EfficientNet's second
    division by the std (include_top), as ViT's plain mean and std."""
    base = BASES[kind](tmp_path / "base")
    size = 32 if kind != "squash" else SIZE
    shapes = toyworld.target_dataset(per_class_per_domain=2, size=size)
    target = write_hub_dataset(shapes, tmp_path / "shapes")
    config = RecipeConfig(base=str(base), target=str(target), test_domain="sketch", output=str(tmp_path / "out"))
    preparation = TargetPreparation(config, resolve_model(config.base))
    evaluated = preparation.decode()
    in_test_order = load_dataset_source(str(target)).select(list(preparation.splits.test))
    own = AutoImageProcessor.from_pretrained(base, backend="pil")
    expected = own(list(in_test_order["image"]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(evaluated.data.normalize.from_uint8(evaluated.test.pixels), expected, rtol=0, atol=1e-5)
