"""Task arithmetic, TIES and DARE against hand computations, and the contract every registered method keeps
in the one streaming engine: shapes, dtypes, integer buffers, files equal to states (one file and shards),
determinism, and input tensors held flat in N (one tensor at a time, or N slices of a bounded size)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ratatouille_hub import cli, merge_engine
from ratatouille_hub.merge_engine import MergeError, merge_model_folders, merge_states
from ratatouille_hub.merge_methods import MERGE_METHODS, MergeInputs, MergeParameterError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rule(method: str, count: int, **parameters):
    return MERGE_METHODS[method].mix(MergeInputs(count=count, parameters=parameters)).tensor_rule


def _merge(method: str, runs, base, **parameters):
    return merge_states(_rule(method, len(runs), **parameters), runs, base=base)


# -- hand computations -------------------------------------------------------------------------------


def test_task_arithmetic_adds_the_scaled_sum_of_the_deltas():
    base = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    runs = [
        {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)},
        {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(6)},
    ]
    # deltas (1, -1) and (0, 2) sum to (1, 1); base + 0.5 x (1, 1)
    merged = _merge("task-arithmetic", runs, base, scaling=0.5)
    assert torch.equal(merged["w"], torch.tensor([1.5, 1.5])) and merged["n"].item() == 5
    assert torch.equal(_merge("task-arithmetic", runs, base)["w"], torch.tensor([2.0, 2.0]))  # default scaling 1


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_deltas():
    base = torch.ones(5)
    deltas = [
        torch.tensor([1.0, -2.0, 3.0, 0.5, -4.0]),  # top 2 by magnitude: -4, 3
        torch.tensor([-1.0, 1.0, 2.0, -3.0, 0.1]),  # -3, 2
        torch.tensor([2.0, -0.5, -1.0, 1.5, 1.0]),  # 2, 1.5
    ]
    # trimmed: (0, 0, 3, 0, -4), (0, 0, 2, -3, 0), (2, 0, 0, 1.5, 0); summed: (2, 0, 5, -1.5, -4), so the
    # elected signs are (+, none, +, -, -); the agreeing entries' means: (2, 0, 2.5, -3, -4)
    merged = _merge("ties", [{"w": base + d} for d in deltas], {"w": base}, density=0.4, scaling=2.0)
    assert torch.equal(merged["w"], base + 2.0 * torch.tensor([2.0, 0.0, 2.5, -3.0, -4.0]))


def test_ties_at_full_density_with_agreeing_signs_is_the_mean_delta():
    base = {"w": torch.zeros(3)}
    runs = [{"w": torch.tensor([1.0, 2.0, -1.0])}, {"w": torch.tensor([3.0, 4.0, -3.0])}]
    assert torch.equal(_merge("ties", runs, base, density=1.0)["w"], torch.tensor([2.0, 3.0, -2.0]))


def test_dare_drops_each_entry_or_keeps_it_rescaled():
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(10_000, generator=generator)}
    delta = torch.randn(10_000, generator=generator)
    merged = _merge("dare", [{"w": base["w"] + delta}], base, drop_rate=0.5, scaling=1.0)["w"]
    moved = merged - base["w"]
    dropped = moved == 0
    # a kept entry is the delta rescaled by 1 / (1 - 0.5) = 2
    assert torch.allclose(moved[~dropped], 2 * delta[~dropped], atol=1e-5, rtol=0)
    assert 0.47 < dropped.float().mean().item() < 0.53  # Bernoulli(0.5) over 10 000 entries: 0.5 +- 6 sigma


def test_dare_without_drops_is_task_arithmetic():
    base = {"w": torch.tensor([1.0, -1.0, 0.5])}
    runs = [{"w": torch.tensor([2.0, 0.0, 0.5])}, {"w": torch.tensor([0.0, 1.0, 1.5])}]
    assert torch.equal(
        _merge("dare", runs, base, drop_rate=0.0, scaling=0.5)["w"],
        _merge("task-arithmetic", runs, base, scaling=0.5)["w"],
    )


def test_dare_masks_are_seeded_by_seed_tensor_name_and_run():
    base = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    runs = [{"a": torch.ones(1000), "b": torch.ones(1000)}] * 2
    first = _merge("dare", runs, base, drop_rate=0.5)
    again = _merge("dare", runs, base, drop_rate=0.5)
    alone = _merge("dare", [{"b": run["b"]} for run in runs], {"b": base["b"]}, drop_rate=0.5)
    other_seed = _merge("dare", runs, base, drop_rate=0.5, seed=1)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a replay gives the same bytes
    assert torch.equal(first["b"], alone["b"])  # whatever else the model holds
    assert not torch.equal(first["a"], first["b"])  # each name its own mask
    assert not torch.equal(first["a"], other_seed["a"])
    # two identical runs with independent masks: entries of 0, 2 (one kept) and 4 (both kept), all present
    assert set(first["a"].unique().tolist()) == {0.0, 2.0, 4.0}


@pytest.mark.parametrize(
    ("method", "parameters", "message"),
    [
        ("ties", {"density": 0.0}, "ties: density must be in \\(0, 1\\] \\(got 0.0\\)"),
        ("dare", {"drop_rate": 1.0}, "dare: drop_rate must be in \\[0, 1\\) \\(got 1.0\\)"),
        ("dare", {"seed": -1}, "dare: seed must be a non-negative integer \\(got -1\\)"),
        ("task-arithmetic", {"scaling": float("nan")}, "task-arithmetic: scaling must be a finite number"),
        ("interpolate", {"alpha": "half"}, "interpolate: could not convert string to float: 'half'"),
    ],
)
def test_parameters_outside_their_range_are_refused_before_any_read(method, parameters, message):
    with pytest.raises(MergeParameterError, match=message):
        MERGE_METHODS[method].mix(MergeInputs(count=2, parameters=parameters))


# -- tiny models through `merge` ---------------------------------------------------------------------


def _independent_ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES as PEFT writes it (topk mask, sign of the sum, disjoint mean), in float64."""
    trimmed = []
    for delta in deltas:
        flat = delta.double().flatten()
        mask = torch.zeros_like(flat)
        mask[torch.topk(flat.abs(), int(density * flat.numel())).indices] = 1
        trimmed.append(flat * mask)
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return ((stacked * agree).sum(0) / agree.sum(0).clamp(min=1)).view(deltas[0].shape)


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory, tiny_checkpoints):
    """Three fine-tunes of the tiny base for one 3-label task; the base keeps its 10-class head."""
    from transformers import AutoModelForImageClassification

    from ratatouille_hub.testing import finetune_of, save_tiny_checkpoint, tiny_processor, tiny_resnet

    root = tmp_path_factory.mktemp("finetunes")
    base = AutoModelForImageClassification.from_pretrained(tiny_checkpoints["base"])
    folders = []
    for k in range(3):
        model = finetune_of(base, tiny_resnet(10 + k, names=["a", "b", "c"]), 200 + k, integer_value=40 + k)
        folders.append(save_tiny_checkpoint(root / f"ft{k}", model, processor=tiny_processor(16)))
    return tiny_checkpoints["base"], folders


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_merge_of_tiny_models_matches_the_hand_computation(finetunes, tmp_path, method, capsys):
    base, folders = finetunes
    cli.main(["merge", *map(str, folders), "--output", str(tmp_path / method), "--method", method, "--base", str(base)])
    assert "2 tensors the base lacks or shapes otherwise take the plain mean" in capsys.readouterr().err
    merged = load_file(tmp_path / method / "model.safetensors")
    anchor = load_file(base / "model.safetensors")
    runs = [load_file(folder / "model.safetensors") for folder in folders]
    for name in (
        "resnet.embedder.embedder.convolution.weight",
        "resnet.encoder.stages.1.layers.0.shortcut.normalization.bias",
    ):
        deltas = [run[name].double() - anchor[name].double() for run in runs]
        moved = sum(deltas) if method == "task-arithmetic" else _independent_ties(deltas, 0.2)
        assert torch.allclose(merged[name].double(), anchor[name].double() + moved, atol=1e-6, rtol=0), name
    mean_head = sum(run["classifier.1.weight"] for run in runs) / 3  # the base's head has 10 classes: the mean
    assert torch.allclose(merged["classifier.1.weight"], mean_head, atol=1e-7, rtol=0)
    assert merged["resnet.embedder.embedder.normalization.num_batches_tracked"].item() == 40  # the first run's


# -- the contract of every registered method ---------------------------------------------------------

TENSOR_COUNT, TENSOR_SIZE = 12, 16_384  # 64 KiB per float32 tensor, 768 KiB per model


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {f"layer{k}.weight": torch.randn(128, TENSOR_SIZE // 128, generator=generator) for k in range(TENSOR_COUNT)}
    state["half"] = torch.randn(3, 5, generator=generator).half()
    state["brain"] = torch.randn(7, generator=generator).bfloat16()
    state["double"] = torch.randn(2, 2, generator=generator).double()
    state["steps"] = torch.tensor(100 + seed)
    state["mask"] = torch.tensor([seed % 2 == 0, True])
    return state


def _inputs(count: int) -> MergeInputs:
    """Everything any method may need: a ranking and a score (greedy keeps all on a flat score), weights."""
    return MergeInputs(
        count=count, ranking=list(range(count)), score=lambda subset: 1.0, weights=[1.0 + k for k in range(count)]
    )


def _folder(root: Path, name: str, state: dict[str, torch.Tensor], *, shards: bool = False) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    if not shards:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names = sorted(state)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    files = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    for part, file in zip(parts, files):
        save_file({k: state[k] for k in part}, folder / file, metadata={"format": "pt"})
    weight_map = {k: file for part, file in zip(parts, files) for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    states = [_state(seed) for seed in range(6)]
    base = _state(99)
    return {
        "states": states,
        "base": base,
        "folders": [_folder(root, f"run{k}", s) for k, s in enumerate(states)],
        "shards": [_folder(root, f"shards{k}", s, shards=True) for k, s in enumerate(states[:3])],
        "base_folder": _folder(root, "base", base),
    }


def _merge_folders(method: str, folders, base: Path, output: Path) -> list[str]:
    mixture = MERGE_METHODS[method].mix(_inputs(len(folders)))
    members = [folders[i] for i in mixture.members]
    return merge_model_folders(members, output, mixture.weights, rule=mixture.tensor_rule, base=base)


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for file in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(file))
    return merged


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_method_keeps_shapes_dtypes_and_integer_buffers_in_files_and_states(toy, tmp_path, method):
    folders = toy["folders"][:3]
    _merge_folders(method, folders, toy["base_folder"], tmp_path / "one")
    _merge_folders(method, toy["shards"], toy["base_folder"], tmp_path / "sharded")
    mixture = MERGE_METHODS[method].mix(_inputs(3))
    in_memory = merge_states(mixture.tensor_rule, toy["states"][:3], mixture.weights, base=toy["base"])
    from_file, from_shards = _read_all(tmp_path / "one"), _read_all(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) == 2
    first = toy["states"][0]
    assert from_file.keys() == from_shards.keys() == in_memory.keys() == first.keys()
    for name, tensor in first.items():
        for merged in (from_file, from_shards, in_memory):
            assert merged[name].dtype == tensor.dtype and merged[name].shape == tensor.shape, name
        assert torch.equal(from_file[name], in_memory[name]) and torch.equal(from_shards[name], in_memory[name]), name
        if tensor.is_floating_point():
            assert torch.isfinite(in_memory[name].double()).all(), name
            assert not torch.equal(in_memory[name], tensor), name  # merged, not the first run copied
        else:
            assert torch.equal(in_memory[name], tensor), name  # integer buffers: the first run's


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_method_replays_to_the_same_bytes(toy, tmp_path, method):
    for output in ("first", "second"):
        _merge_folders(method, toy["folders"][:3], toy["base_folder"], tmp_path / output)
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == (
        tmp_path / "second" / "model.safetensors"
    ).read_bytes()


def _held_bytes(method: str, count: int, toy, output: Path) -> int:
    """Peak Python-heap bytes of one merge of `count` runs: the engine reads every input tensor into a
    bytearray, so this counts the input tensors held at once (headers and handles add a little per run)."""
    tracemalloc.start()
    try:
        _merge_folders(method, toy["folders"][:count], toy["base_folder"], output)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_method_holds_input_tensors_flat_in_the_number_of_runs(toy, tmp_path, method, monkeypatch):
    monkeypatch.setattr(merge_engine, "CHUNK_BYTES", TENSOR_SIZE * 4)  # slices smaller than a tensor, as at scale
    few, many = (_held_bytes(method, n, toy, tmp_path / f"n{n}") for n in (2, 6))
    tensor = TENSOR_SIZE * 4
    model = TENSOR_COUNT * tensor
    growth = many - few
    assert growth < tensor, growth  # 4 more runs: their headers and handles, less than one tensor
    assert growth < model  # never a whole model per run


def test_a_non_finite_input_is_named_by_every_method(toy, tmp_path):
    broken = {**toy["states"][1], "layer3.weight": toy["states"][1]["layer3.weight"].clone()}
    broken["layer3.weight"][0, 0] = float("nan")
    folder = _folder(tmp_path, "broken", broken)
    for method in MERGE_METHODS:
        with pytest.raises(MergeError, match=f"{folder}/model.safetensors: tensor 'layer3.weight' contains NaN"):
            _merge_folders(method, [toy["folders"][0], folder], toy["base_folder"], tmp_path / method)


def test_the_scoring_path_merges_runs_whose_files_are_not_their_states(tmp_path):
    """ViT in transformers 5 renames tensors on load: the averager saves each loaded run once to a scratch
    file in the model's key space, the engine reads those, and the scratch goes with the averager."""
    import gc
    from types import SimpleNamespace

    from ratatouille_hub.merge_engine import average_state_dicts
    from ratatouille_hub.merge_methods import Mixture
    from ratatouille_hub.models import load_classifier
    from ratatouille_hub.recipe.assembly import RunAverager
    from ratatouille_hub.testing import perturbed_backbone, tiny_vit

    id2label = {0: "a", 1: "b", 2: "c"}
    base = tiny_vit(0, names=list(id2label.values()))
    folders = []
    for seed in range(3):
        base.load_state_dict(
            perturbed_backbone(tiny_vit(0, names=list(id2label.values())).state_dict(), seed, head=True)
        )
        base.save_pretrained(tmp_path / f"run{seed}")
        folders.append(tmp_path / f"run{seed}")
    states = [load_classifier(folder, id2label).state_dict() for folder in folders]
    assert load_file(folders[0] / "model.safetensors").keys() != states[0].keys()  # the case under test
    anchor = tiny_vit(0, names=list(id2label.values())).state_dict()
    averager = RunAverager(folders, SimpleNamespace(id2label=id2label), "average", anchor=lambda: anchor)
    mean = averager.state(Mixture((0, 1, 2)))
    assert mean.keys() == states[0].keys()
    assert all(torch.equal(mean[k], v) for k, v in average_state_dicts(states).items())
    stock = MERGE_METHODS["model-stock"].mix(MergeInputs(count=3))
    expected = merge_states(stock.tensor_rule, states, base=anchor)
    assert all(torch.equal(averager.state(stock)[k], v) for k, v in expected.items())
    scratch = averager._converted
    assert sorted(p.name for p in scratch.iterdir()) == ["0.safetensors", "1.safetensors", "2.safetensors"]
    del averager
    gc.collect()
    assert not scratch.exists()
