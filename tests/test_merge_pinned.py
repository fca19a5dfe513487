"""The exact bytes of every merge method that existed before the one streaming engine: uniform, weighted
(one file and shards), Model Stock and interpolation written by `merge`, and greedy's selection, pinned as
sha256 literals computed by the code before the engine replaced it. A restructuring changes no numbers.

Model Stock and interpolation pin their tensors (name, dtype, shape, bytes), not the file: the code before
the engine wrote them with safetensors' `save_file`, whose header lists the metadata in an order that
changes from one process to the next, so no file digest of theirs was reproducible."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ratatouille_hub.merge_engine import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    merge_anchored_folders,
    merge_model_folders,
    read_safetensors_metadata,
)
from ratatouille_hub.merge_methods import MERGE_METHODS, MergeInputs
from ratatouille_hub.provenance import MERGE_KEY
from ratatouille_hub.testing import perturbed_backbone, tiny_resnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PINNED = {
    "inputs": "46ae723ea72937e285d1cca09e6d0f329d72f5edc703d85eeb153ed92f9b4bfb",
    "uniform": "13f2fc8bff2ce6826e69e9dc9e54e64ec52cdc202975ccf8930c0059251f0b7a",
    "weighted": "322e0dfab77e279c9a608c5458069aa1a25b94dc707c27d9baf324b549e7b3f2",
    "uniform-sharded": "a5cd1c0995c21b28511f266c852614b7c7c987146690190b959d29a03dd58d00",
    "model-stock": "c6a1045aebf4f3d41cc8a1cf797193e2532ca1bf8ef0a7a9a9875ed0f105c855",
    "interpolate": "ae4a4134bff9680262524e42373d1046972e87c345f50d9a43a2fac6552d2e18",
}
GREEDY_SELECTION = ((3, 0, 1, 2), (0, 1, 3))  # (ranking best first, members kept)


def _tensors_sha(folder: Path) -> str:
    """sha256 over every tensor of the folder's weights: name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        for name in sorted(tensors):
            tensor = tensors[name]
            digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sha(folder: Path) -> str:
    """sha256 over the folder's weight files and index, in name order."""
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.suffix == ".safetensors" or file.name == WEIGHTS_INDEX_NAME:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned")
    base = tiny_resnet(0)
    base.save_pretrained(root / "base")
    runs, sharded = [], []
    for seed in range(4):
        model = copy.deepcopy(base)
        model.load_state_dict(perturbed_backbone(base.state_dict(), seed, integer_value=100 + seed, head=True))
        model.save_pretrained(root / f"run{seed}")
        model.save_pretrained(root / f"shards{seed}", max_shard_size="20KB")
        runs.append(root / f"run{seed}")
        sharded.append(root / f"shards{seed}")
    return root, runs, sharded


def _merge(method: str, runs, base: Path, output: Path, **inputs) -> Path:
    mixture = MERGE_METHODS[method].mix(MergeInputs(count=len(runs), **inputs))
    members = [runs[i] for i in mixture.members]
    record = {MERGE_KEY: method}
    if mixture.anchored is None:
        merge_model_folders(members, output, weights=mixture.weights, metadata=record)
    else:
        merge_anchored_folders(members, base, output, mixture.anchored, metadata=record)
    return output


def test_the_inputs_are_the_ones_pinned(world):
    root, runs, sharded = world
    digest = hashlib.sha256(b"".join(_sha(folder).encode() for folder in [root / "base", *runs, *sharded]))
    assert digest.hexdigest() == PINNED["inputs"]


@pytest.mark.parametrize(("method", "inputs"), [("uniform", {}), ("weighted", {"weights": (1.0, 2.0, 3.0, 0.5)})])
def test_each_mean_writes_its_pinned_file_bytes(world, tmp_path, method, inputs):
    root, runs, _ = world
    assert _sha(_merge(method, runs, root / "base", tmp_path / method, **inputs)) == PINNED[method]


@pytest.mark.parametrize(("method", "inputs"), [("model-stock", {}), ("interpolate", {"alpha": 0.3})])
def test_each_anchored_method_writes_its_pinned_tensors(world, tmp_path, method, inputs):
    root, runs, _ = world
    output = _merge(method, runs, root / "base", tmp_path / method, **inputs)
    assert _tensors_sha(output) == PINNED[method]
    assert read_safetensors_metadata(output / WEIGHTS_NAME) == {"format": "pt", MERGE_KEY: method}


def test_a_sharded_uniform_merge_writes_its_pinned_shards(world, tmp_path):
    root, _, sharded = world
    output = _merge("uniform", sharded, root / "base", tmp_path / "out")
    assert len(list(output.glob("*.safetensors"))) > 1
    assert _sha(output) == PINNED["uniform-sharded"]


def test_greedy_selects_the_pinned_members(world, tmp_path):
    """Score: closeness of the candidate average's weights to the mean of runs 0, 1 and 3 (a stand-in for
    validation that every subset gives a different number): the best first ranking and the kept members."""
    root, runs, _ = world
    reference = load_file(
        _merge("uniform", [runs[0], runs[1], runs[3]], root / "base", tmp_path / "ref") / WEIGHTS_NAME
    )
    trials = iter(range(1000))

    def score(subset: list[int]) -> float:
        output = _merge("uniform", [runs[i] for i in subset], root / "base", tmp_path / f"trial{next(trials)}")
        merged = load_file(output / WEIGHTS_NAME)
        return -sum(
            float((merged[k] - reference[k]).double().norm()) for k in reference if reference[k].is_floating_point()
        )

    ranking = sorted(range(len(runs)), key=lambda i: (-score([i]), i))
    mixture = MERGE_METHODS["greedy"].mix(MergeInputs(count=len(runs), ranking=ranking, score=score))
    assert (tuple(ranking), mixture.members) == GREEDY_SELECTION
