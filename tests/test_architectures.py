"""Architectures are head layouts: a ConvNeXt classifier, which no code names, recycles and merges as it is."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTImageProcessorPil

from ratatouille_hub import cli, recycle
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.merge_engine import average_state_dicts
from ratatouille_hub.models import ARCHITECTURES, architecture_of, head_linear, load_classifier
from ratatouille_hub.testing import labels, perturbed_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_convnext(seed: int, names) -> ConvNextForImageClassification:
    torch.manual_seed(seed)
    config = ConvNextConfig(patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **labels(names))
    return ConvNextForImageClassification(config)


@pytest.fixture(scope="module")
def convnext_world(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("convnext")
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    base = tiny_convnext(0, [f"digit-{i}" for i in range(10)])
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    aux = tiny_convnext(1, ["x", "y", "z"])
    missing, unexpected = aux.load_state_dict(perturbed_backbone(base.state_dict(), seed=5, scale=0.005), strict=False)
    assert not unexpected and all(name.startswith("classifier.") for name in missing)
    aux.save_pretrained(root / "aux")
    processor.save_pretrained(root / "aux")
    return root, tiny_world.target


def test_the_architectures_are_head_layouts_and_convnext_is_one_of_them(convnext_world):
    root, _ = convnext_world
    assert list(ARCHITECTURES) == ["timm-wrapper", "linear-classifier", "sequential-classifier"]
    model = load_classifier(root / "base", {0: "a", 1: "b"})
    assert architecture_of(model).name == "linear-classifier"
    assert head_linear(model) is model.classifier and model.classifier.out_features == 2


def test_a_convnext_base_recycles_and_merges_with_no_code_of_its_own(convnext_world, tmp_path):
    root, target = convnext_world
    config = RecipeConfig(
        base=str(root / "base"),
        target=str(target),
        aux=(str(root / "aux"),),
        runs=2,
        steps=3,
        eval_every=3,
        lp_steps=3,
        lp_lr=1e-2,
        warmup_steps=1,
        batch_size=4,
        lr=1e-3,
        lr_choices=(1e-3,),
        image_size=16,
        output=str(tmp_path / "out"),
    )
    results = recycle(config, echo=lambda line: None)
    assert [run.init.split("@")[0] for run in results.runs] == [config.base, *config.aux]
    runs = [load_file(tmp_path / "out" / run.folder / "model" / "model.safetensors") for run in results.runs]
    soup = load_file(tmp_path / "out" / "soup" / "model.safetensors")
    assert soup.keys() == runs[0].keys()
    assert all(torch.equal(soup[k], v) for k, v in average_state_dicts(runs).items())
    assert not torch.equal(
        runs[0]["convnext.embeddings.patch_embeddings.weight"], runs[1]["convnext.embeddings.patch_embeddings.weight"]
    )

    merged = tmp_path / "merged"
    folders = [str(tmp_path / "out" / run.folder / "model") for run in results.runs]
    assert cli.main(["merge", *folders, "--output", str(merged)]) == 0
    merged_state = load_file(merged / "model.safetensors")  # the same tensors; the provenance metadata differs
    assert merged_state.keys() == soup.keys() and all(torch.equal(merged_state[k], v) for k, v in soup.items())
