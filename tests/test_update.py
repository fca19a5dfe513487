"""Exact updates of uniform soups: update(soup of runs 1..k, add run k+1) against merge(runs 1..k+1), removal,
integer buffers, and every refusal, on tiny ResNets (BatchNorm buffers) and ViTs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ratatouille_hub
from ratatouille_hub import cli
from ratatouille_hub.config import UpdateOptions
from ratatouille_hub.merge_engine import read_safetensors_metadata
from ratatouille_hub.provenance import INGREDIENTS_KEY, RUN_FILE, file_sha256
from ratatouille_hub.testing import perturbed_backbone, save_tiny_checkpoint, tiny_processor, tiny_resnet, tiny_vit

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EPS32 = torch.finfo(torch.float32).eps
LABELS = ["a", "b", "c"]


def within_bound(updated: dict, merged: dict, ingredients: int) -> None:
    """Floating tensors agree within (n + 2) float32 epsilons of their largest entry (updating.py's bound);
    integer tensors exactly."""
    assert updated.keys() == merged.keys()
    for name, tensor in merged.items():
        assert updated[name].dtype == tensor.dtype, name
        if tensor.is_floating_point():
            scale = max(tensor.abs().max().item(), 1e-30)
            assert (updated[name] - tensor).abs().max().item() <= (ingredients + 2) * EPS32 * scale, name
        else:
            assert torch.equal(updated[name], tensor), name


@pytest.fixture(scope="module", params=["resnet", "vit"])
def runs(request, tmp_path_factory):
    """Five fine-tunes of one tiny base with the same labels: backbones, heads and BatchNorm statistics
    perturbed, each with its own integer buffers (num_batches_tracked = 100 + k)."""
    root = tmp_path_factory.mktemp(f"update-{request.param}")
    make = tiny_resnet if request.param == "resnet" else tiny_vit
    base = make(0, names=LABELS)
    folders = []
    for k in range(5):
        model = make(0, names=LABELS)
        model.load_state_dict(perturbed_backbone(base.state_dict(), 300 + k, integer_value=100 + k, head=True))
        folders.append(save_tiny_checkpoint(root / f"run{k}", model, processor=tiny_processor(16)))
    return folders


def merge(folders, output) -> dict:
    assert cli.main(["merge", *map(str, folders), "--output", str(output)]) == 0
    return load_file(output / "model.safetensors")


def update(soup, output=None, add=(), remove=(), target=()) -> int:
    argv = [
        "update",
        str(soup),
        *(["--add", *map(str, add)] if add else []),
        *(["--remove", *map(str, remove)] if remove else []),
    ]
    return cli.main([*argv, *(["--output", str(output)] if output else []), *target])


def test_adding_a_run_equals_merging_them_all(runs, tmp_path):
    merge(runs[:3], tmp_path / "soup3")
    assert update(tmp_path / "soup3", tmp_path / "soup4", add=[runs[3]]) == 0
    updated = load_file(tmp_path / "soup4" / "model.safetensors")
    within_bound(updated, merge(runs[:4], tmp_path / "merged4"), 4)
    assert not all(torch.equal(updated[k], v) for k, v in load_file(tmp_path / "soup3" / "model.safetensors").items())
    entries = json.loads(read_safetensors_metadata(tmp_path / "soup4" / "model.safetensors")[INGREDIENTS_KEY])
    assert [e["sha256"] for e in entries] == [file_sha256(r / "model.safetensors") for r in runs[:4]]
    assert (tmp_path / "soup4" / "config.json").is_file() and (
        tmp_path / "soup4" / "preprocessor_config.json"
    ).is_file()
    assert "4 runs of one recipe" in (tmp_path / "soup4" / "README.md").read_text()


def test_a_merge_declares_the_license_given_and_an_update_keeps_it(runs, tmp_path):
    from huggingface_hub import ModelCard

    assert cli.main(["merge", *map(str, runs[:3]), "--output", str(tmp_path / "soup3"), "--license", "mit"]) == 0
    assert ModelCard.load(tmp_path / "soup3" / "README.md").data.license == "mit"
    assert update(tmp_path / "soup3", tmp_path / "soup4", add=[runs[3]]) == 0
    grown = ModelCard.load(tmp_path / "soup4" / "README.md")
    assert grown.data.license == "mit" and "4 runs of one recipe" in grown.text  # the card rewritten, its license kept


def test_two_at_once_in_place_and_removal_gives_back_the_soup_without_them(runs, tmp_path):
    soup = tmp_path / "soup"
    merge(runs[:2], soup)
    assert update(soup, add=runs[2:5]) == 0  # in place
    within_bound(load_file(soup / "model.safetensors"), merge(runs, tmp_path / "merged5"), 5)
    assert update(soup, remove=[runs[3], runs[4]]) == 0
    within_bound(load_file(soup / "model.safetensors"), merge(runs[:3], tmp_path / "merged3"), 5)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert left == [".soup.lock"]  # no staging left behind; the soup's claim stays (a kernel lock, free)


def test_removing_the_first_ingredient_takes_integer_buffers_from_the_next(runs, tmp_path):
    merge(runs[:3], tmp_path / "soup")
    assert update(tmp_path / "soup", tmp_path / "without0", remove=[runs[0]]) == 0
    updated = load_file(tmp_path / "without0" / "model.safetensors")
    within_bound(updated, merge(runs[1:3], tmp_path / "merged12"), 3)
    integers = [name for name, t in updated.items() if not t.is_floating_point()]
    assert all(updated[name].item() == 101 for name in integers)  # run 1's, as merge(runs 1, 2) has them
    assert integers or "vit" in str(runs[0])


@pytest.mark.parametrize(
    "case", ["twice", "absent", "other-labels", "other-base", "other-recipe", "no-record", "empty"]
)
def test_refusals_are_one_line_and_change_nothing(runs, tmp_path, capsys, case):
    soup = tmp_path / "soup"
    merge(runs[:2], soup)
    before = (soup / "model.safetensors").read_bytes()
    stranger = tmp_path / "stranger"
    if case == "other-labels":
        model = (tiny_resnet if "resnet" in str(runs[0]) else tiny_vit)(0, names=["x", "y", "z"])
        save_tiny_checkpoint(stranger, model, processor=tiny_processor(16))
    elif case == "other-base":  # another architecture of the same family: other tensor shapes
        resnet = "resnet" in str(runs[0])
        model = (
            tiny_resnet(0, names=LABELS, hidden_sizes=(8, 8)) if resnet else tiny_vit(0, names=LABELS, hidden_size=8)
        )
        save_tiny_checkpoint(stranger, model, processor=tiny_processor(16))
    elif case == "other-recipe":
        for run in (runs[0], runs[1]):  # the soup's ingredients and the newcomer carry fingerprints
            (run / RUN_FILE).write_text(json.dumps({"fingerprint": "a" * 16}))
        merge(runs[:2], soup)
        before = (soup / "model.safetensors").read_bytes()
        save_tiny_checkpoint(
            stranger, tiny_resnet(9, names=LABELS) if "resnet" in str(runs[0]) else tiny_vit(9, names=LABELS)
        )
        (stranger / RUN_FILE).write_text(json.dumps({"fingerprint": "b" * 16}))
    elif case == "no-record":
        cli.main(
            ["merge", str(runs[0]), str(runs[1]), "--output", str(soup), "--method", "weighted", "--weights", "1", "3"]
        )
        before = (soup / "model.safetensors").read_bytes()
    capsys.readouterr()
    argv = {
        "twice": dict(add=[runs[1]]),
        "absent": dict(remove=[runs[4]]),
        "other-labels": dict(add=[stranger]),
        "other-recipe": dict(add=[stranger]),
        "other-base": dict(add=[stranger]),
        "no-record": dict(add=[runs[2]]),
        "empty": dict(remove=[runs[0], runs[1]]),
    }[case]
    expected = {
        "twice": "already in",
        "absent": "not an ingredient of",
        "other-labels": "id2label[0] is 'x', expected 'a'",
        "other-recipe": "a run of another recipe (fingerprint bbbb",
        "other-base": "has shape",
        "no-record": "record no ingredients",
        "empty": "leaves no soup",
    }[case]
    try:
        assert update(soup, **argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
        assert (soup / "model.safetensors").read_bytes() == before
    finally:
        for run in (runs[0], runs[1]):
            (run / RUN_FILE).unlink(missing_ok=True)


def test_a_recycle_soup_grows_and_finds_its_runs_relative_to_its_output_folder(tiny_world, tmp_path):
    from ratatouille_hub import recycle
    from ratatouille_hub.testing import tiny_recipe

    out = tmp_path / "out"
    results = recycle(tiny_recipe(tiny_world, out), echo=lambda line: None)
    runs = [out / run.folder / "model" for run in results.runs]
    entries = json.loads(read_safetensors_metadata(out / "soup" / "model.safetensors")[INGREDIENTS_KEY])
    assert [e["source"] for e in entries] == [f"../{run.folder}/model" for run in results.runs]
    moved = tmp_path / "moved"
    out.rename(moved)  # sources are relative: the folder may move
    runs = [moved / run.folder / "model" for run in results.runs]
    assert update(moved / "soup", tmp_path / "without0", remove=[runs[0]]) == 0  # integer buffers: run 1's
    within_bound(load_file(tmp_path / "without0" / "model.safetensors"), merge(runs[1:], tmp_path / "merged"), 3)


def test_with_a_target_the_update_is_scored_on_training_domain_validation(tiny_world, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from ratatouille_hub import recycle
    from ratatouille_hub.testing import tiny_recipe

    three = recycle(tiny_recipe(tiny_world, tmp_path / "three"), echo=lambda line: None)
    two = recycle(tiny_recipe(tiny_world, tmp_path / "two").replace(runs=2), echo=lambda line: None)
    run2 = tmp_path / "three" / three.runs[2].folder / "model"
    target = ["--target", str(tiny_world.target), "--image-size", "16"]
    assert update(tmp_path / "three" / "soup", tmp_path / "updated", remove=[run2], target=target) == 0
    assert f"[eval] training-domain validation {100 * two.soup.val_accuracy:.1f}%" in capsys.readouterr().err
    card = ModelCard.load(tmp_path / "updated" / "README.md")
    assert card.data.eval_results is None and "2 runs of one recipe" in card.text  # a local target: in the text
    assert (
        f"Training-domain validation accuracy on the local dataset **{tiny_world.target.name}**: "
        f"{100 * two.soup.val_accuracy:.1f}%." in card.text
    )
    options = UpdateOptions(
        soup=str(tmp_path / "three" / "soup"),
        remove=(str(run2),),
        output=str(tmp_path / "again"),
        target=str(tiny_world.target),
        image_size=16,
    )
    updated = ratatouille_hub.update(options, echo=lambda line: None)  # the same update through the API: its record
    assert updated.written_to == tmp_path / "again"
    assert updated.validation == pytest.approx(two.soup.val_accuracy, abs=1e-9)  # a count over the same images
    assert [i.sha256 for i in updated.ingredients] == [
        file_sha256(tmp_path / "three" / run.folder / "model" / "model.safetensors") for run in three.runs[:2]
    ]


def test_a_soup_holding_the_same_run_twice_loses_one_entry_per_removal(runs, tmp_path, capsys):
    merge([runs[0], runs[0], runs[1]], tmp_path / "twice")
    assert update(tmp_path / "twice", tmp_path / "once", remove=[runs[0]]) == 0
    within_bound(load_file(tmp_path / "once" / "model.safetensors"), merge(runs[:2], tmp_path / "merged"), 3)
    assert update(tmp_path / "twice", tmp_path / "o2", remove=[runs[0], runs[0]]) == 2
    assert "named twice in --remove" in capsys.readouterr().err


def test_updates_refuse_half_precision_soups_non_finite_runs_and_outputs_that_are_inputs(runs, tmp_path, capsys):
    from safetensors.torch import save_file

    merge(runs[:2], tmp_path / "soup")
    halves = []
    for k in range(3):  # bfloat16 copies of three runs (config and processor as they are)
        folder = tmp_path / f"bf16-{k}"
        shutil.copytree(runs[k], folder)
        state = {
            n: v.bfloat16() if v.is_floating_point() else v for n, v in load_file(folder / "model.safetensors").items()
        }
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        halves.append(folder)
    half = tmp_path / "half"
    merge(halves[:2], half)
    bad = tmp_path / "nan-run"
    save_tiny_checkpoint(bad, (tiny_resnet if "resnet" in str(runs[0]) else tiny_vit)(0, names=LABELS))
    nan = load_file(bad / "model.safetensors")
    first = next(k for k, v in nan.items() if v.is_floating_point())
    nan[first][...] = float("nan")
    save_file(nan, bad / "model.safetensors", metadata={"format": "pt"})
    for argv, expected in (
        (dict(soup=half, output=tmp_path / "o1", add=[halves[2]]), "an exact update needs float32"),
        (dict(soup=tmp_path / "soup", output=tmp_path / "o2", add=[bad]), f"{bad}/model.safetensors: tensor "),
        (dict(soup=tmp_path / "soup", output=runs[2], add=[runs[2]]), "is (or contains) the input"),
    ):
        assert update(**argv) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
