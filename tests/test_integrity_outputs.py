"""Folders a command replaces (issue 19, integrity): a command replaces a folder only when it is one it wrote (a
merge output, a soup) holding nothing else, and never deletes a user's file; `push` uploads only the soup's own
files, never a path its index names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import refusals
from huggingface_hub import HfApi
from safetensors import safe_open

from ratatouille_hub import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    *("--runs", "2", "--steps", "2", "--eval-every", "2", "--lp-steps", "2", "--warmup-steps", "1"),
    *("--batch-size", "2", "--image-size", "16"),
]


def recycle_argv(world, out: Path) -> list[str]:
    aux = [str(a) for a in world.aux]
    return [
        "recycle",
        "--base",
        str(world.base),
        "--aux",
        *aux,
        "--target",
        str(world.target),
        *TINY,
        "--output",
        str(out),
    ]


@pytest.fixture(scope="module")
def recycled(tiny_world, tmp_path_factory) -> Path:
    """One finished recycle output (two runs, a uniform soup); tests work on copies of it."""
    out = tmp_path_factory.mktemp("outputs") / "out"
    assert cli.main(recycle_argv(tiny_world, out)) == 0
    return out


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def placeholders(tmp_path: Path, world) -> dict:
    return {"<tmp>": tmp_path, "<ckpt>": world.base.parent}


# -- push: only the soup's own files ---------------------------------------------------------------------


def test_push_never_uploads_a_file_the_index_names_outside_the_soup(
    recycled, tiny_world, hub_namespace, tmp_path, capsys
):
    soup = shutil.copytree(recycled / "soup", tmp_path / "soup")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    with safe_open(soup / "model.safetensors", "pt") as weights:
        weight_map = dict.fromkeys(weights.keys(), "model.safetensors")
    index = soup / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**weight_map, "x": str(secret)}}))
    repo_id = f"{hub_namespace}/leak"
    line = refusals.fails_cleanly(
        "push-index-names-a-path",
        "model.safetensors.index.json naming a file outside the soup",
        ["push", repo_id, str(soup)],
        "model.safetensors.index.json",
        soup,
        capsys,
        placeholders(tmp_path, tiny_world),
    )
    assert line == f"error: {index}: weight_map must map tensor names to .safetensors files in the same folder"
    assert not HfApi().repo_exists(repo_id)  # nothing created, nothing uploaded

    index.unlink()  # the corrected folder is pushed, without the secret
    assert cli.main(["push", repo_id, str(soup)]) == 0
    assert sorted(HfApi().list_repo_files(repo_id)) == [".gitattributes", *sorted(p.name for p in soup.iterdir())]


# -- merge: never the base, never a folder no merge wrote -----------------------------------------------


def test_merge_refuses_the_base_as_its_output(tiny_world, tmp_path, capsys):
    victim = shutil.copytree(tiny_world.base, tmp_path / "victim")
    aux = str(tiny_world.aux[0])
    argv = ["merge", aux, aux, "--method", "model-stock", "--base", str(victim)]
    line = refusals.fails_cleanly(
        "output-is-the-base",
        "merge --output naming the --base of model-stock",
        [*argv, "--output", str(victim)],
        str(victim),
        victim,
        capsys,
        placeholders(tmp_path, tiny_world),
    )
    assert line == f"error: output {victim} is (or contains) the input {victim}; choose another folder"
    assert cli.main([*argv, "--output", str(tmp_path / "merged")]) == 0


def test_merge_refuses_an_output_holding_anything_a_merge_does_not_write(tiny_world, tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "model-2023-photos").mkdir(parents=True)
    (victim / "model-2023-photos" / "a.jpg").write_text("precious")
    (victim / "config.json").write_text("{}")
    line = refusals.fails_cleanly(
        "output-holds-other-files",
        "merge --output a folder holding a folder named model-...",
        ["merge", str(tiny_world.aux[0]), "--output", str(victim)],
        "model-2023-photos",
        victim,
        capsys,
        placeholders(tmp_path, tiny_world),
    )
    assert line == (
        f"error: output {victim} holds other files (model-2023-photos); it would be replaced whole - choose an empty folder"
    )


def test_merge_refuses_to_replace_a_model_no_merge_wrote(tiny_world, tmp_path, capsys):
    victim = shutil.copytree(tiny_world.aux[1], tmp_path / "someones-finetune")  # not an input of the merge
    line = refusals.fails_cleanly(
        "output-is-a-model-no-merge-wrote",
        "merge --output an existing fine-tune that is not an input",
        ["merge", str(tiny_world.aux[0]), "--output", str(victim)],
        str(victim),
        victim,
        capsys,
        placeholders(tmp_path, tiny_world),
    )
    assert line == (
        f"error: output {victim} holds a model no merge wrote (its weights carry no merge record); it would be "
        "replaced whole - choose an empty folder"
    )
    assert cli.main(["merge", str(tiny_world.aux[0]), "--output", str(tmp_path / "empty")]) == 0


def test_merge_replaces_its_own_earlier_output_whatever_the_method(tiny_world, tmp_path):
    aux, out = str(tiny_world.aux[0]), tmp_path / "merged"
    for method in (
        ["--method", "weighted", "--weights", "1", "3"],
        ["--method", "model-stock", "--base", str(tiny_world.base)],
        [],
    ):
        assert cli.main(["merge", aux, aux, *method, "--output", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert weights.metadata()["ratatouille.merge"] == "uniform"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "merge.yaml",
        "model.safetensors",
        "preprocessor_config.json",
    ]


# -- recycle: the soup folder holds only a soup ---------------------------------------------------------


def test_recycle_replaces_its_own_soup_but_never_a_file_it_did_not_write(recycled, tiny_world, tmp_path, capsys):
    out = shutil.copytree(recycled, tmp_path / "out")
    soup = out / "soup"
    assert cli.main(recycle_argv(tiny_world, out)) == 0  # the rerun replaces its own soup
    capsys.readouterr()
    (soup / "thesis.tex").write_text("my thesis draft")
    line = refusals.fails_cleanly(
        "output-soup-holds-other-files",
        "recycle whose <output>/soup holds a user's file",
        recycle_argv(tiny_world, out),
        "thesis.tex",
        out,  # refused at planning: nothing in the output folder changes, nothing trains
        capsys,
        placeholders(tmp_path, tiny_world),
    )
    assert line == (
        f"error: {soup} holds files a soup is not made of (thesis.tex); the soup is replaced whole - move them or "
        "choose another --output"
    )
    assert (soup / "thesis.tex").read_text() == "my thesis draft"


# -- update: the user's files in the soup folder stay ---------------------------------------------------


def test_update_in_place_carries_the_users_files_over_and_names_every_stale_one(recycled, tmp_path, capsys):
    out = shutil.copytree(recycled, tmp_path / "out")
    soup = out / "soup"
    (soup / "NOTES.txt").write_text("my notes")
    (soup / "eval-images").mkdir()
    (soup / "eval-images" / "a.png").write_bytes(b"\x89PNG not really")
    mine = {name: data for name, data in tree(soup).items() if name == "NOTES.txt" or name.startswith("eval-images")}
    run = sorted((out / "runs").glob("*/model"))[0]
    capsys.readouterr()
    assert cli.main(["update", str(soup), "--remove", str(run)]) == 0
    printed = capsys.readouterr().err.splitlines()
    assert (
        "[update] not carried over, they describe the soup before the update: results.json, diagnostics.png, accuracies.png"
        in printed
    )
    assert {name: data for name, data in tree(soup).items() if name in mine} == mine
    assert sorted(p.name for p in soup.iterdir()) == [
        "NOTES.txt",
        "README.md",
        "config.json",
        "eval-images",
        "model.safetensors",
        "preprocessor_config.json",
        "recipe.yaml",
    ]


# -- update: a local run says which recipe it belongs to ---------------------------------------------------


def test_update_adds_only_local_runs_of_the_soups_recipe(recycled, tiny_world, tmp_path, capsys):
    """Run folders carry their recipe fingerprint (as contributed runs do): a run of another recipe, or a folder
    that declares none, is refused; a run of the soup's own recipe is taken back in."""
    other = tmp_path / "other"
    assert cli.main([*recycle_argv(tiny_world, other), "--seed", "1"]) == 0  # another split: another recipe
    capsys.readouterr()
    runs = json.loads((recycled / "soup" / "results.json").read_text())["runs"]
    own = [recycled / run["folder"] / "model" for run in runs]
    stranger = other / json.loads((other / "soup" / "results.json").read_text())["runs"][0]["folder"] / "model"
    fingerprints = {json.loads((run / "ratatouille.json").read_text())["fingerprint"] for run in own}
    assert (
        len(fingerprints) == 1
        and json.loads((stranger / "ratatouille.json").read_text())["fingerprint"] not in fingerprints
    )

    smaller = tmp_path / "smaller"
    assert cli.main(["update", str(recycled / "soup"), "--remove", str(own[1]), "--output", str(smaller)]) == 0
    anonymous = shutil.copytree(own[1], tmp_path / "anonymous")
    (anonymous / "ratatouille.json").unlink()
    own_fingerprint, other_fingerprint = fingerprints.pop(), json.loads((stranger / "ratatouille.json").read_text())
    places = {
        **placeholders(tmp_path, tiny_world),
        "<own>": own_fingerprint,
        "<other>": other_fingerprint["fingerprint"],
        "<other-run>": stranger,  # its key names the target's path
    }
    for case, what, run, expected in (
        ("update-run-of-another-recipe", "--add a local run of another recipe", stranger, "a run of another recipe"),
        ("update-run-without-fingerprint", "--add a folder that declares no recipe", anonymous,
         f"carries no recipe fingerprint (ratatouille.json), so nothing says it is a run of {smaller}'s recipe"),
    ):  # fmt: skip
        argv = ["update", str(smaller), "--add", str(run), "--output", str(tmp_path / "grown")]
        line = refusals.fails_cleanly(case, what, argv, str(run), tmp_path / "grown", capsys, places)
        assert expected in line
    assert cli.main(["update", str(smaller), "--add", str(own[1]), "--output", str(tmp_path / "grown")]) == 0


# -- files for sharing: the user's umask, not mkstemp's 0600 ----------------------------------------------

WRITE_SHARED_FILES = """
import sys
from pathlib import Path
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.io import atomic_write_json
from ratatouille_hub.results import Results

out = Path(sys.argv[1])
RecipeConfig(base="org/base", target="org/pacs").save_yaml(out / "recipe.yaml")
Results.load(Path(sys.argv[2])).save(out / "results.json")
atomic_write_json(out / "plan.json", {"plans": []})
"""


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_recipe_and_results_are_written_with_the_users_umask(recycled, tmp_path, umask, mode):
    """A shared Slurm filesystem: other jobs and users read recipe.yaml and results.json as the umask allows."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [sys.executable, "-c", WRITE_SHARED_FILES, str(out), str(recycled / "soup" / "results.json")],
        preexec_fn=lambda: os.umask(umask),
        check=True,
    )
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ("recipe.yaml", "results.json", "plan.json"), mode
    )


def test_every_file_of_a_recycled_output_follows_the_umask(recycled):
    """What recycle itself wrote, in this process (the test runs under its own umask)."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    written = {p.relative_to(recycled).as_posix(): p.stat().st_mode & 0o777 for p in recycled.rglob("*") if p.is_file()}
    assert {"soup/recipe.yaml", "soup/results.json", "recipe.yaml", "plan.json"} <= written.keys()
    locks = {name for name in written if name.rsplit("/", 1)[-1].endswith(".lock")}  # filelock's own mode
    assert {name: mode for name, mode in written.items() if name not in locks} == dict.fromkeys(
        written.keys() - locks, 0o666 & ~umask
    )


def test_recycle_names_a_local_base_by_its_hub_id_and_declares_its_license(tiny_world, tmp_path, capsys):
    """A local copy of a Hub base: --base-model names it in the lineage, its card's license is the soup's unless
    --license says otherwise; both only change the card, so a rerun that changes them reuses every run."""
    from huggingface_hub import ModelCard

    base = shutil.copytree(tiny_world.base, tmp_path / "resnet-tiny")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# resnet-tiny\n")
    out = tmp_path / "out"
    argv = recycle_argv(SimpleNamespace(base=base, aux=tiny_world.aux, target=tiny_world.target), out)
    assert cli.main([*argv, "--base-model", "org/resnet-tiny"]) == 0
    card = ModelCard.load(out / "soup" / "README.md")
    assert (card.data.base_model, card.data.base_model_relation, card.data.license) == (
        ["org/resnet-tiny"],  # the recycled fine-tunes are local folders: the base is the one Hub parent
        "merge",
        "apache-2.0",  # the base's card's
    )
    assert f"`{base}` (a local copy of `org/resnet-tiny`)" in card.text
    runs = sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/done"))
    capsys.readouterr()
    assert cli.main([*argv, "--base-model", "org/resnet-tiny", "--license", "mit"]) == 0
    assert ModelCard.load(out / "soup" / "README.md").data.license == "mit"
    assert sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/done")) == runs  # no run trained again
