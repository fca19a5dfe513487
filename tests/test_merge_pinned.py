"""The exact bytes of every merge method that existed before the one streaming engine: uniform, weighted
(one file and shards), Model Stock and interpolation written by `merge`, and greedy's selection, pinned as
sha256 literals computed by the code before the engine replaced it. A restructuring changes no numbers.

Model Stock and interpolation pin their tensors (name, dtype, shape, bytes), not the file: the code before
the engine wrote them with safetensors' `save_file`, whose header lists the metadata in an order that
changes from one process to the next, so no file digest of theirs was reproducible.

The inputs are dyadic numbers of a few bits drawn as integers (no float random numbers, no training), so
every mean, delta and dot product of theirs is exact: the pins hold on any CPU. Drawn with `torch.randn`,
the same pins held on the Intel Xeon and not on the AMD EPYC, whose vector code rounds other bits."""

from __future__ import annotations

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
from ratatouille_hub.testing import tiny_resnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PINNED = {
    "inputs": "37240e32257952ad4e94e81ebd09d740cd91ba9c1c6082b6ec4c02efaa483dd5",
    "uniform": "34e3c1a10a1e2243408d88480b76335f8245b9f86a2fa1e3948c1878e799158f",
    "weighted": "0a6347a64d597e5e7773f0e6487b479ff78c665f9164fe880a56f61e52a101c1",
    "uniform-sharded": "04a397d55e6ddff80fcb706c9297e7e066e07354f9a499f58aeface0c05df943",
    "model-stock": "3c1aa2022420e31eef36ca8539e10d9fb870dc7603ada373ccddfb7dd82496b4",
    "interpolate": "0c2ebc9948192209e9538728aee8548aaa5d93d87bc7c0582342def678890243",
}
GREEDY_SELECTION = ((1, 3, 0, 2), (0, 1, 3))  # (ranking best first, members kept)


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


def _dyadic(shape, generator: torch.Generator, low: int, high: int, denominator: int) -> torch.Tensor:
    """Integers in [low, high) over a power of two: exact in float32, the same bytes on every CPU."""
    return torch.randint(low, high, shape, generator=generator).float() / denominator


def _base_state(template: dict) -> dict:
    """The template's names and shapes, each float tensor k / 128 (a running variance 32..95 / 64)."""
    generator = torch.Generator().manual_seed(0)
    return {
        name: (
            _dyadic(tensor.shape, generator, 32, 96, 64)
            if name.endswith("running_var")
            else _dyadic(tensor.shape, generator, -64, 65, 128)
            if tensor.is_floating_point()
            else tensor.clone()
        )
        for name, tensor in template.items()
    }


def _run_state(base: dict, seed: int) -> dict:
    """A fine-tune of `base`: every float tensor moved by j / 1024 (|j| <= 16), integer buffers 100 + seed."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return {
        name: tensor + _dyadic(tensor.shape, generator, -16, 17, 1024)
        if tensor.is_floating_point()
        else torch.full_like(tensor, 100 + seed)
        for name, tensor in base.items()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned")
    model = tiny_resnet(0)
    base = _base_state(model.state_dict())
    model.load_state_dict(base)
    model.save_pretrained(root / "base")
    runs, sharded = [], []
    for seed in range(4):
        model.load_state_dict(_run_state(base, seed))
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


# The weights normalise to eighths, so every product with an input is exact.
@pytest.mark.parametrize(("method", "inputs"), [("uniform", {}), ("weighted", {"weights": (1.0, 2.0, 4.0, 1.0)})])
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
