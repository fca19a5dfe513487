"""Merges anchored at the base: Model Stock (the authors' mean pairwise angle) and interpolation toward the
base, as pure functions against hand computations, in `recycle` and in `merge`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ratatouille_hub import cli, recycle
from ratatouille_hub.merge_engine import merge_states
from ratatouille_hub.merge_math import model_stock_ratio, model_stock_ratio_of
from ratatouille_hub.merge_methods import MERGE_METHODS, MergeInputs
from ratatouille_hub.testing import finetune_of, save_tiny_checkpoint, tiny_processor, tiny_recipe, tiny_resnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_stock_streamed(runs, anchor):
    """The engine's Model Stock over states, and each anchored tensor's t computed on its own."""
    rule = MERGE_METHODS["model-stock"].mix(MergeInputs(count=len(runs))).tensor_rule
    ratios = {
        name: model_stock_ratio_of([run[name] for run in runs], tensor)
        for name, tensor in anchor.items()
        if tensor.is_floating_point() and tensor.shape == runs[0][name].shape
    }
    return merge_states(rule, runs, base=anchor), ratios


def interpolate(base, soup, alpha):
    """The engine's interpolation of one run (the soup) toward the base."""
    return merge_states(
        MERGE_METHODS["interpolate"].mix(MergeInputs(count=1, alpha=alpha)).tensor_rule, [soup], base=base
    )


def test_model_stock_uses_the_mean_pairwise_angle_computed_by_hand():
    # deltas (1,0), (0,1), (1,1) from the origin: angles 90, 45 and 45 degrees, mean 60, cos 0.5;
    # t = 3 x 0.5 / (1 + 2 x 0.5) = 0.75 and the mean is (2/3, 2/3), so the result is (0.5, 0.5).
    # mergekit's mean cosine, (0 + 0.707 + 0.707) / 3 = 0.471, would give t = 0.728 and (0.485, 0.485).
    anchor = {"w": torch.zeros(2), "steps": torch.tensor(7)}
    runs = [
        {"w": torch.tensor(w), "steps": torch.tensor(s)} for w, s in (([1.0, 0.0], 1), ([0.0, 1.0], 2), ([1.0, 1.0], 3))
    ]
    merged, ratios = model_stock_streamed(runs, anchor)
    assert ratios == {"w": pytest.approx(0.75, abs=1e-12)}
    assert torch.allclose(merged["w"], torch.tensor([0.5, 0.5]), atol=1e-7, rtol=0)
    assert merged["w"].dtype == torch.float32
    assert merged["steps"].item() == 1  # integer tensors: the first input's, as in the mean
    assert model_stock_ratio(0.5, 3) == 0.75 and model_stock_ratio(1.0, 20) == 1.0


def test_model_stock_of_two_runs_and_the_tensors_without_an_angle():
    # two deltas at 60 degrees: t = 2 x 0.5 / 1.5 = 2/3 of the way from the base to their mean
    anchor = {"w": torch.tensor([1.0, 1.0]), "same": torch.ones(3), "head": torch.zeros(5)}
    half = math.sqrt(3) / 2
    runs = [
        {"w": torch.tensor([2.0, 1.0]), "same": torch.ones(3), "head": torch.zeros(2)},
        {"w": torch.tensor([1.5, 1.0 + half]), "same": torch.ones(3), "head": torch.ones(2)},
    ]
    merged, ratios = model_stock_streamed(runs, anchor)
    mean = torch.tensor([1.75, 1.0 + half / 2])
    assert ratios["w"] == pytest.approx(2 / 3, abs=1e-6)
    assert torch.allclose(merged["w"], 1 + (2 / 3) * (mean - 1), atol=1e-6, rtol=0)
    assert ratios["same"] == 1.0 and torch.equal(merged["same"], torch.ones(3))  # no delta, no angle: the mean
    assert "head" not in ratios and torch.equal(merged["head"], torch.full((2,), 0.5))  # shaped otherwise: the mean


def test_model_stock_of_opposing_deltas_is_the_base_not_a_division_by_zero():
    # opposite deltas (180 degrees) would divide by 1 + cos = 0; three at 120 degrees would give t = -3e15
    anchor = {"w": torch.tensor([1.0, 1.0])}
    opposite = [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([0.0, 1.0])}]
    merged, ratios = model_stock_streamed(opposite, anchor)
    assert ratios == {"w": 0.0} and torch.equal(merged["w"], anchor["w"])
    star = [
        {"w": anchor["w"] + torch.tensor([math.cos(a), math.sin(a)])} for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
    ]
    merged, ratios = model_stock_streamed(star, anchor)
    assert ratios["w"] == 0.0 and torch.equal(merged["w"], anchor["w"])


def test_model_stock_of_one_run_is_that_run():
    run = {"w": torch.tensor([3.0, -1.0])}
    merged, ratios = model_stock_streamed([run], {"w": torch.zeros(2)})
    assert ratios == {"w": 1.0} and torch.equal(merged["w"], run["w"])


def test_interpolation_toward_the_base():
    base = {"w": torch.tensor([0.0, 4.0]), "head": torch.zeros(3), "n": torch.tensor(1)}
    soup = {"w": torch.tensor([2.0, 0.0]), "head": torch.ones(2), "n": torch.tensor(5)}
    merged = interpolate(base, soup, 0.25)
    assert torch.equal(merged["w"], torch.tensor([0.5, 3.0]))  # 0.75 x base + 0.25 x soup
    assert torch.equal(merged["head"], soup["head"]) and merged["n"].item() == 5
    assert torch.equal(interpolate(base, soup, 1.0)["w"], soup["w"])
    assert torch.equal(interpolate(base, soup, 0.0)["w"], base["w"])
    with pytest.raises(ValueError, match="interpolate: alpha must be in \\[0, 1\\] \\(got 1.5\\)"):
        interpolate(base, soup, 1.5)


def _anchor(config, output):
    """The base's weights with the shared linear-probe head, read from the files by hand."""
    base = load_file(f"{config.base}/model.safetensors")
    [lp] = [p for p in (output / "lp").iterdir() if not p.name.startswith(".")]  # not the claim files
    head = load_file(lp / "head.safetensors")
    return {**base, "classifier.1.weight": head["weight"], "classifier.1.bias": head["bias"]}


def _angle_ratio(anchor, runs, name):
    deltas = [(r[name].double() - anchor[name].double()).flatten().numpy() for r in runs]
    units = [d / np.linalg.norm(d) for d in deltas]
    angles = [
        math.acos(np.clip(units[i] @ units[j], -1, 1)) for i in range(len(units)) for j in range(i + 1, len(units))
    ]
    c = max(0.0, math.cos(sum(angles) / len(angles)))  # past 90 degrees: the base (merge_engine.py)
    return len(runs) * c / (1 + (len(runs) - 1) * c)


def test_recycle_with_model_stock_anchors_at_the_base_and_the_shared_head(tiny_world, tmp_path):
    output = tmp_path / "out"
    results = recycle(tiny_recipe(tiny_world, output, method="model-stock"), echo=lambda line: None)
    assert results.soup.method == "model-stock" and results.soup.members == [0, 1, 2]
    soup = load_file(output / "soup" / "model.safetensors")
    runs = [load_file(output / run.folder / "model" / "model.safetensors") for run in results.runs]
    anchor = _anchor(tiny_recipe(tiny_world, output), output)
    for name in ("classifier.1.weight", "resnet.embedder.embedder.convolution.weight"):
        t = _angle_ratio(anchor, runs, name)
        assert abs(1 - t) > 0.01  # not the mean: the angle moves it
        mean = sum(r[name].double() for r in runs) / 3
        expected = anchor[name].double() + t * (mean - anchor[name].double())
        assert torch.allclose(soup[name].double(), expected, atol=1e-6, rtol=0), name
    card = (output / "soup" / "README.md").read_text()
    assert "model-stock, angle mean of the pairwise angles average of 3 runs" in card
    assert results.averages["interpolate"].parameters == {"alpha": 0.5}
    assert "soup, interpolate, alpha 0.5 (3 runs)" in [row.name for row in results.summary]


def test_recycle_interpolates_with_its_alpha(tiny_world, tmp_path):
    output = tmp_path / "out"
    results = recycle(tiny_recipe(tiny_world, output, method="interpolate", alpha=0.25), echo=lambda line: None)
    soup = load_file(output / "soup" / "model.safetensors")
    runs = [load_file(output / run.folder / "model" / "model.safetensors") for run in results.runs]
    anchor = _anchor(tiny_recipe(tiny_world, output), output)
    for name in ("classifier.1.weight", "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"):
        mean = sum(r[name] for r in runs) / 3
        assert torch.allclose(soup[name], 0.75 * anchor[name] + 0.25 * mean, atol=1e-6, rtol=0), name
    assert results.soup.method == "interpolate" and results.averages["interpolate"].parameters == {"alpha": 0.25}


@pytest.fixture
def finetunes(tmp_path, tiny_checkpoints):
    """Three fine-tunes of the tiny base for one 3-label task; the base keeps its 10-class head."""
    from transformers import AutoModelForImageClassification

    base = AutoModelForImageClassification.from_pretrained(tiny_checkpoints["base"])
    folders = []
    for k in range(3):
        model = finetune_of(base, tiny_resnet(10 + k, names=["a", "b", "c"]), 200 + k)
        folders.append(save_tiny_checkpoint(tmp_path / f"ft{k}", model, processor=tiny_processor(16)))
    return tiny_checkpoints["base"], folders


def test_merge_model_stock_and_interpolate_over_folders(finetunes, tmp_path, capsys):
    base, folders = finetunes
    inputs = [str(f) for f in folders]
    anchor = load_file(base / "model.safetensors")
    runs = [load_file(f / "model.safetensors") for f in folders]
    cli.main(["merge", *inputs, "--output", str(tmp_path / "stock"), "--method", "model-stock", "--base", str(base)])
    out = capsys.readouterr().err  # a warning
    assert (
        "2 tensors the base lacks or shapes otherwise take the plain mean: classifier.1.bias, classifier.1.weight"
        in out
    )
    stock = load_file(tmp_path / "stock" / "model.safetensors")
    name = "resnet.embedder.embedder.convolution.weight"
    t = _angle_ratio(anchor, runs, name)
    expected = anchor[name].double() + t * (sum(r[name].double() for r in runs) / 3 - anchor[name].double())
    assert torch.allclose(stock[name].double(), expected, atol=1e-6, rtol=0)
    assert torch.allclose(stock["classifier.1.weight"], sum(r["classifier.1.weight"] for r in runs) / 3, atol=1e-7)

    args = ["--output", str(tmp_path / "wise"), "--method", "interpolate", "--base", str(base), "--alpha", "0.5"]
    cli.main(["merge", *inputs, *args])
    wise = load_file(tmp_path / "wise" / "model.safetensors")
    mean = sum(r[name] for r in runs) / 3
    assert torch.allclose(wise[name], 0.5 * anchor[name] + 0.5 * mean, atol=1e-6, rtol=0)
    assert (tmp_path / "wise" / "preprocessor_config.json").is_file()
