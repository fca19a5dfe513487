"""Merge math and the streaming safetensors merge, on tiny random transformers models."""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, ResNetForImageClassification

from ratatouille_hub.merge_engine import (
    WEIGHTS_NAME,
    MergeError,
    average_state_dicts,
    greedy_select,
    merge_model_folders,
    merge_safetensors,
    normalize_weights,
    read_safetensors_header,
)
from ratatouille_hub.testing import perturbed_backbone, tiny_resnet, tiny_resnet_config, tiny_vit

NUM_BATCHES = "resnet.embedder.embedder.normalization.num_batches_tracked"


@dataclass
class Members:
    folders: list[Path]
    models: list[torch.nn.Module]

    @property
    def files(self) -> list[Path]:
        return [folder / WEIGHTS_NAME for folder in self.folders]


def _members(base: torch.nn.Module, root: Path, count: int = 3, **save_kwargs) -> Members:
    """Copies of one base with seeded noise (each its own fine-tune) and distinct integer buffers."""
    folders, models = [], []
    for seed in range(count):
        model = copy.deepcopy(base)
        noisy = perturbed_backbone(
            model.state_dict(), seed, integer_value=100 + seed, rescale_running_var=False, head=True
        )
        model.load_state_dict(noisy)
        folder = root / f"member{seed}"
        model.save_pretrained(folder, **save_kwargs)
        folders.append(folder)
        models.append(model.eval())
    return Members(folders, models)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Members:
    return _members(tiny_resnet(0), tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Members:
    members = _members(tiny_vit(0), tmp_path_factory.mktemp("vit"))
    processor = {"image_processor_type": "ViTImageProcessor"}
    (members.folders[0] / "preprocessor_config.json").write_text(json.dumps(processor))
    return members


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path, metadata={"format": "pt"})
    return path


# -- pure functions ---------------------------------------------------------------------------------


def test_normalize_weights_uniform_and_scaled():
    assert normalize_weights(None, 4) == [0.25] * 4
    assert normalize_weights([1, 3], 2) == [0.25, 0.75]
    assert normalize_weights([0, 2], 2) == [0.0, 1.0]


@pytest.mark.parametrize(
    ("weights", "n", "message"),
    [
        ([1.0], 2, "1 weights for 2 inputs"),
        ([1.0, -0.5], 2, "non-negative"),
        ([0.0, 0.0], 2, "sum to zero"),
        ([math.nan, 1.0], 2, "finite"),
        ([math.inf, 1.0], 2, "finite"),
        (None, 0, "at least one input"),
    ],
)
def test_normalize_weights_rejects(weights, n, message):
    with pytest.raises(ValueError, match=message):
        normalize_weights(weights, n)


def test_average_state_dicts_accumulates_in_float32_and_copies_integers():
    state_dicts = [
        {"w": torch.tensor([value], dtype=torch.bfloat16), "steps": torch.tensor(7 + i), "mask": torch.tensor([i == 0])}
        for i, value in enumerate([256.0, 1.0, 1.0, 1.0])
    ]
    merged = average_state_dicts(state_dicts)
    # the exact mean 64.75 rounds to 65 in bf16; a bf16 running sum would stay stuck at 64
    assert merged["w"].dtype == torch.bfloat16 and merged["w"].item() == 65.0
    assert merged["steps"].dtype == torch.int64 and merged["steps"].item() == 7
    assert torch.equal(merged["mask"], torch.tensor([True]))


def test_average_state_dicts_rejects_mismatch_and_nan():
    with pytest.raises(MergeError, match="state dict 1 .* tensor 'w' has shape \\[3\\], expected \\[2\\]"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    with pytest.raises(MergeError, match="state dict 1: tensor 'w' contains NaN or Inf"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.tensor([0.0, math.nan])}])


def test_greedy_keeps_ties_and_rejects_drops():
    scores = {(3,): 0.50, (3, 1): 0.60, (3, 1, 4): 0.55, (3, 1, 0): 0.60, (3, 1, 0, 2): 0.61}
    calls = []

    def score(selection: list[int]) -> float:
        calls.append(tuple(selection))
        return scores[tuple(selection)]

    assert greedy_select([3, 1, 4, 0, 2], score) == [3, 1, 0, 2]
    assert calls == [(3,), (3, 1), (3, 1, 4), (3, 1, 0), (3, 1, 0, 2)]
    assert greedy_select([5], lambda selection: 0.0) == [5]
    with pytest.raises(ValueError):
        greedy_select([], lambda selection: 0.0)


# -- streaming file merge ---------------------------------------------------------------------------


def test_merge_equals_exact_mean(resnet, tmp_path):
    out = tmp_path / "soup.safetensors"
    merge_safetensors(resnet.files, out)
    merged, inputs = load_file(out), [load_file(f) for f in resnet.files]
    assert merged.keys() == inputs[0].keys()
    for name, tensor in merged.items():
        assert tensor.dtype == inputs[0][name].dtype
        if tensor.is_floating_point():
            exact = torch.stack([sd[name].double() for sd in inputs]).mean(0)
            torch.testing.assert_close(tensor.double(), exact, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(merged[k], v) for k, v in average_state_dicts(inputs).items())


def test_weighted_merge_equals_weighted_mean(resnet, tmp_path):
    out = tmp_path / "soup.safetensors"
    merge_safetensors(resnet.files, out, weights=[1, 2, 5])
    merged, inputs = load_file(out), [load_file(f) for f in resnet.files]
    for name, tensor in merged.items():
        if tensor.is_floating_point():
            exact = sum(w / 8 * sd[name].double() for w, sd in zip([1, 2, 5], inputs))
            torch.testing.assert_close(tensor.double(), exact, rtol=1e-6, atol=1e-7)


def test_integer_buffers_come_from_first_input(resnet, tmp_path):
    out = tmp_path / "soup.safetensors"
    merge_safetensors(resnet.files, out)
    merged = load_file(out)
    buffers = [name for name in merged if name.endswith("num_batches_tracked")]
    assert NUM_BATCHES in buffers
    for name in buffers:
        assert merged[name].dtype == torch.int64 and merged[name].shape == () and merged[name].item() == 100


def test_half_precision_merge_matches_in_memory_average(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state_dicts = [
        {"a": torch.randn(5, 3, generator=generator).bfloat16(), "b": torch.randn(4, generator=generator).half()}
        for _ in range(3)
    ]
    files = [_save(tmp_path / f"{i}.safetensors", sd) for i, sd in enumerate(state_dicts)]
    merge_safetensors(files, tmp_path / "soup.safetensors", weights=[1, 1, 2])
    merged = load_file(tmp_path / "soup.safetensors")
    expected = average_state_dicts(state_dicts, weights=[1, 1, 2])
    assert merged["a"].dtype == torch.bfloat16 and merged["b"].dtype == torch.float16
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_output_header_has_pt_format_and_no_leftovers(resnet, tmp_path):
    out = tmp_path / "soup.safetensors"
    merge_safetensors(resnet.files, out)
    length = struct.unpack("<Q", out.read_bytes()[:8])[0]
    header = json.loads(out.read_bytes()[8 : 8 + length])
    assert header["__metadata__"] == {"format": "pt"}
    assert length % 8 == 0
    assert read_safetensors_header(out).keys() == read_safetensors_header(resnet.files[0]).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup.safetensors"]


# -- folders and transformers round trips -----------------------------------------------------------


def test_vit_merged_in_file_key_space_loads_without_missing_keys(vit, tmp_path):
    out = tmp_path / "soup"
    merge_model_folders(vit.folders, out)
    model, info = AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = [AutoModelForImageClassification.from_pretrained(folder).state_dict() for folder in vit.folders]
    expected = average_state_dicts(loaded)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    assert set(state) != set(load_file(out / WEIGHTS_NAME))  # files keep Hub names, memory renames
    assert (out / "preprocessor_config.json").read_text() == (vit.folders[0] / "preprocessor_config.json").read_text()


def test_resnet_round_trip_logits_equal_averaged_state_dict(resnet, tmp_path):
    out = tmp_path / "soup"
    merge_model_folders(resnet.folders, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_NAME]
    reference = ResNetForImageClassification(tiny_resnet_config())
    reference.load_state_dict(average_state_dicts([model.state_dict() for model in resnet.models]))
    loaded = AutoModelForImageClassification.from_pretrained(out)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixels).logits, reference.eval()(pixels).logits)


def test_sharded_folders_merge_like_single_files(resnet, tmp_path):
    sharded = _members(resnet.models[0], tmp_path / "sharded", max_shard_size="20KB")
    single = _members(resnet.models[0], tmp_path / "single")
    merge_model_folders(sharded.folders, tmp_path / "soup-sharded")
    merge_model_folders(single.folders, tmp_path / "soup-single")
    shards = sorted((tmp_path / "soup-sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "soup-sharded" / "model.safetensors.index.json").is_file()
    merged = {name: t for shard in shards for name, t in load_file(shard).items()}
    expected = load_file(tmp_path / "soup-single" / WEIGHTS_NAME)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], expected[name]) for name in expected)
    with pytest.raises(MergeError, match="reshard"):
        merge_model_folders([single.folders[0], sharded.folders[1]], tmp_path / "mixed")


@pytest.mark.parametrize(("key", "value"), [("model_type", "vit"), ("id2label", {"0": "a", "1": "b", "2": "z"})])
def test_folders_with_other_configs_are_rejected(resnet, tmp_path, key, value):
    other = tmp_path / "other"
    shutil.copytree(resnet.folders[1], other)
    config = json.loads((other / "config.json").read_text())
    config[key] = value
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=f"{other}: config.json .*{key}"):
        merge_model_folders([resnet.folders[0], other], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


# -- rejected inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"a": torch.zeros(2), "c": torch.zeros(3)}, "tensor 'b' is missing"),
        ({"a": torch.zeros(2), "b": torch.zeros(4)}, "tensor 'b' has shape \\[4\\], expected \\[3\\]"),
        ({"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.float16)}, "tensor 'b' has dtype F16, expected F32"),
        ({"a": torch.zeros(2), "b": torch.zeros(3), "d": torch.zeros(1)}, "unexpected tensor 'd'"),
    ],
)
def test_mismatched_files_are_rejected(tmp_path, second, message):
    first = _save(tmp_path / "first.safetensors", {"a": torch.zeros(2), "b": torch.zeros(3)})
    other = _save(tmp_path / "second.safetensors", second)
    with pytest.raises(MergeError, match=f"{other} does not match {first}: {message}"):
        merge_safetensors([first, other], tmp_path / "soup.safetensors")
    assert not (tmp_path / "soup.safetensors").exists()


def _raw(header: object, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _f32(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


VALID = {"a": torch.ones(2), "b": torch.ones(3)}
FOUR_FLOATS = b"\0" * 16


def _corrupt(kind: str, valid: bytes) -> bytes:
    """A broken variant of `valid` (a safetensors file of VALID), one per kind of corruption."""
    header_len = struct.unpack("<Q", valid[:8])[0]
    variants = {
        "no header": lambda: valid[:5],
        "header larger than file": lambda: struct.pack("<Q", 10**12) + valid[8:],
        "truncated data": lambda: valid[:-4],
        "trailing bytes": lambda: valid + b"\0" * 8,
        "malformed JSON": lambda: valid[:8] + b"{" * header_len + valid[8 + header_len :],
        "absurd shape": lambda: _raw({"a": _f32([2**40, 2**40], 0, 16)}, FOUR_FLOATS),
        "negative dim": lambda: _raw({"a": _f32([-4], 0, 16)}, FOUR_FLOATS),
        "offsets outside file": lambda: _raw({"a": _f32([8], 0, 32)}, FOUR_FLOATS),
        "overlap": lambda: _raw({"a": _f32([4], 0, 16), "b": _f32([2], 8, 16)}, FOUR_FLOATS),
        "unknown dtype": lambda: _raw({"a": _f32([4], 0, 16, dtype="Q4")}, FOUR_FLOATS),
        "not an object": lambda: _raw([1, 2]),
    }
    return variants[kind]()


CORRUPTIONS = {
    "no header": "truncated file",
    "header larger than file": "larger than the file",
    "truncated data": "truncated file",
    "trailing bytes": "bytes after the last tensor",
    "malformed JSON": "malformed safetensors header",
    "absurd shape": "needs 4835703278458516698824704 bytes but data_offsets span 16",
    "negative dim": "invalid shape",
    "offsets outside file": "truncated file",
    "overlap": "overlap",
    "unknown dtype": "unsupported dtype 'Q4'",
    "not an object": "not a JSON object",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_files_are_rejected_before_reading_data(tmp_path, kind):
    valid = _save(tmp_path / "valid.safetensors", VALID)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(_corrupt(kind, valid.read_bytes()))
    with pytest.raises(MergeError, match=f"{broken}.*{CORRUPTIONS[kind]}"):
        merge_safetensors([valid, broken], tmp_path / "soup.safetensors")
    assert not (tmp_path / "soup.safetensors").exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_rejected(tmp_path, bad):
    first = _save(tmp_path / "first.safetensors", {"a": torch.ones(2), "b": torch.ones(3)})
    second = _save(tmp_path / "second.safetensors", {"a": torch.ones(2), "b": torch.tensor([1.0, bad, 1.0])})
    with pytest.raises(MergeError, match=f"{second}: tensor 'b' contains NaN or Inf"):
        merge_safetensors([first, second], tmp_path / "soup.safetensors", weights=[1, 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.safetensors", "second.safetensors"]


def test_a_weighted_average_of_states_skips_zero_weights_and_keeps_dtypes():
    """The engine over states: float32 accumulation, each dtype kept, integer buffers from the first input."""
    generator = torch.Generator().manual_seed(0)
    inputs = [
        {"w": torch.randn(3, 4, generator=generator), "n": torch.tensor(7 + k), "h": torch.randn(2).half()}
        for k in range(5)
    ]
    merged = average_state_dicts(inputs, weights=[1, 1, 2, 0, 1])
    expected = (inputs[0]["w"] + inputs[1]["w"] + 2 * inputs[2]["w"] + inputs[4]["w"]) / 5
    assert torch.allclose(merged["w"], expected, atol=1e-6, rtol=0)
    assert merged["n"].item() == 7 and merged["h"].dtype == torch.float16
