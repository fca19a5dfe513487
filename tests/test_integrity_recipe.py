"""Integrity of the recipe's own files: dataset strings never become paths, recipe and plan files that are not
what they claim are refused naming them, nothing is written before the input is checked, a failed command
never blocks the corrected one, a diverged run is never marked done, and killed or long-named writers leave
nothing that a rerun trips on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest
import refusals
import torch
from datasets import Value
from safetensors.torch import load_file

from ratatouille_hub import cli
from ratatouille_hub.io import WRITER_LOCK, staged_folder
from ratatouille_hub.toy import world as toyworld

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    *("--runs", "1", "--steps", "2", "--eval-every", "2", "--lp-steps", "2", "--warmup-steps", "1"),
    *("--batch-size", "2", "--image-size", "16"),
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A small target (4 domains x 6 shapes x 3 images) as a parquet folder."""
    folder = tmp_path_factory.mktemp("integrity-recipe") / "shapes"
    (folder / "data").mkdir(parents=True)
    toyworld.target_dataset(per_class_per_domain=3, size=16).to_parquet(str(folder / "data" / "train.parquet"))
    return folder


def recycle_argv(world, target: Path, out: Path, *extra: str) -> list[str]:
    return ["recycle", "--base", str(world.base), "--aux", str(world.aux[0]), "--target", str(target), *TINY,
            "--output", str(out), *extra]  # fmt: skip


def _placeholders(tmp_path: Path, world) -> dict:
    return {"<tmp>": tmp_path, "<ckpt>": world.base.parent}


def test_domain_names_from_the_dataset_never_become_paths(tiny_world, tmp_path, capsys):
    """A domain named by an absolute path to an existing folder, and one climbing out with `../`: the folder
    named stays untouched, nothing is written outside --output, and the soups sit in safe subfolders."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    dataset = toyworld.target_dataset(per_class_per_domain=3, size=16)
    hostile = {"photo": str(victim), "sketch": "../../escaped"}
    domains = [hostile.get(d, d) for d in dataset["domain"]]
    dataset = dataset.remove_columns("domain").add_column("domain", domains, feature=Value("string"))
    target = tmp_path / "hostile" / "data"
    target.mkdir(parents=True)
    dataset.to_parquet(str(target / "train.parquet"))
    work = tmp_path / "work"
    out = work / "deep" / "out"
    before = sorted([*(p.name for p in tmp_path.iterdir()), "work"])

    assert cli.main(recycle_argv(tiny_world, target.parent, out, "--test-domain", "all")) == 0

    assert (victim / "precious.txt").read_text() == "keep me" and sorted(p.name for p in victim.iterdir()) == [
        "precious.txt"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing beside the work folder
    assert sorted(p.name for p in work.iterdir()) == ["deep"] and sorted(p.name for p in (work / "deep").iterdir()) == [
        "out"
    ]
    table = json.loads((out / "results.json").read_text())
    assert table["soups"] == {
        "cartoon": "soups/cartoon",
        "painting": "soups/painting",
        str(victim): f"soups/{_component(str(victim))}",
        "../../escaped": f"soups/{_component('../../escaped')}",
    }
    assert table["soups"]["../../escaped"].startswith("soups/escaped-")  # readable, and never `..`
    for folder in table["soups"].values():
        assert (out / folder / "model.safetensors").is_file() and (out / folder).resolve().parent == out / "soups"
    printed = capsys.readouterr().out
    assert str(victim) in printed  # the table names the domain as the dataset does


def _component(name: str) -> str:
    from ratatouille_hub.safe_text import path_component

    return path_component(name)


# -- recipe and plan files that are not what they claim ---------------------------------------------------

BAD_RECIPES = {  # case: (what, file content, the line's end)
    "config-malformed-yaml": (
        "--config holding YAML that does not parse",
        b"base: [unclosed\n",
        "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)",
    ),
    "config-python-tag": (
        "--config with a `!!python/object` tag",
        b"base: !!python/object/apply:os.system ['echo pwned']\n",
        "not valid YAML (could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' at line 1, column 7)",
    ),
    "config-not-utf8": ("--config that is not UTF-8 text", b"base: \xff\xfe\n", "not UTF-8 text (byte 6); a recipe is a YAML file"),
    "config-not-a-mapping": ("--config holding a list", b"- base\n- target\n", "a recipe is a mapping of option names to values"),
    "config-seed-out-of-range": (
        "--config with seed: 1.0e+23",
        b"seed: 1.0e+23\n",
        "seed must be an integer from 0 to 4294967295 (got 99999999999999991611392)",
    ),
    "config-lr-infinite": ("--config with lr: .inf", b"lr: .inf\n", "lr must be a finite number (got inf)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_a_config_file_that_is_not_a_recipe_is_refused_naming_it(case, tiny_world, shapes, tmp_path, capsys):
    what, content, message = BAD_RECIPES[case]
    config = tmp_path / "recipe.yaml"
    config.write_bytes(content)
    out = tmp_path / "out"
    argv = [*recycle_argv(tiny_world, shapes, out), "--config", str(config)]
    line = refusals.fails_cleanly(case, what, argv, str(config), out, capsys, _placeholders(tmp_path, tiny_world))
    assert line == f"error: {config}: {message}"


def test_flags_that_would_train_nothing_sound_are_refused_before_the_folder_is_taken(
    tiny_world, shapes, tmp_path, capsys
):
    out = tmp_path / "out"
    places = _placeholders(tmp_path, tiny_world)
    for case, what, extra, line in (
        ("flag-lr-infinite", "--lr inf", ("--lr", "inf"), "error: --lr must be a finite number (got inf)"),
        ("flag-lp-lr-nan", "--lp-lr nan", ("--lp-lr", "nan"), "error: --lp-lr must be a finite number (got nan)"),
        (
            "flag-weight-decay-infinite",
            "--weight-decay inf",
            ("--weight-decay", "inf"),
            "error: --weight-decay must be a finite number (got inf)",
        ),
        (
            "flag-seed-out-of-range",
            "--seed 4294967296",
            ("--seed", "4294967296"),
            "error: --seed must be an integer from 0 to 4294967295 (got 4294967296)",
        ),
    ):
        argv = recycle_argv(tiny_world, shapes, out, *extra)
        assert refusals.fails_cleanly(case, what, argv, extra[0], out, capsys, places) == line
    assert cli.main(recycle_argv(tiny_world, shapes, out, "--lr", "1e-3")) == 0  # the corrected command


def test_an_output_recipe_that_is_not_yaml_is_refused_naming_it(tiny_world, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text("base: [broken\n")
    line = refusals.fails_cleanly(
        "output-recipe-malformed",
        "--output whose recipe.yaml does not parse",
        recycle_argv(tiny_world, shapes, out),
        str(out / "recipe.yaml"),
        out,
        capsys,
        _placeholders(tmp_path, tiny_world),
    )
    assert line.startswith(f"error: {out / 'recipe.yaml'}: not valid YAML (")


@pytest.fixture
def planned(tiny_world, shapes, tmp_path, capsys) -> Path:
    out = tmp_path / "planned"
    assert cli.main(["plan", *recycle_argv(tiny_world, shapes, out)[1:]]) == 0
    capsys.readouterr()
    return out


def _edit_plan(out: Path, edit) -> None:
    plan = json.loads((out / "plan.json").read_text())
    edit(plan)
    (out / "plan.json").write_text(json.dumps(plan))


BAD_PLANS = {  # case: (what, edit of the saved plan or raw text, message after `<plan.json>: `)
    "plan-not-json": ("plan.json that is not JSON", "{\n", "not a plan written by ratatouille-hub (Expecting property name"),
    "plan-wrong-shape": (
        "plan.json whose plan lacks its target",
        lambda plan: plan["plans"][0].pop("target"),
        "not a plan written by ratatouille-hub (KeyError: 'target')",
    ),
    "plan-key-escapes": (
        "plan.json naming a run folder `../../x`",
        lambda plan: plan["plans"][0]["runs"][0].update(key="../../x"),
        "not a plan written by ratatouille-hub (folder key '../../x' is not a content hash)",
    ),
    "plan-lp-key-absolute": (
        "plan.json naming a probe folder `/tmp/x`",
        lambda plan: plan["plans"][0]["lp"].update(key="/tmp/x"),
        "not a plan written by ratatouille-hub (folder key '/tmp/x' is not a content hash)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_PLANS))
@pytest.mark.parametrize("command", ["run", "assemble"])
def test_a_plan_file_that_is_not_a_plan_is_refused_naming_it(case, command, planned, tiny_world, tmp_path, capsys):
    what, edit, message = BAD_PLANS[case]
    if isinstance(edit, str):
        (planned / "plan.json").write_text(edit)
    else:
        _edit_plan(planned, edit)
    argv = [command, str(planned), *(("--index", "0") if command == "run" else ())]
    line = refusals.fails_cleanly(
        f"{command}-{case}", f"{command} on a {what}", argv, "plan.json", planned, capsys,
        _placeholders(tmp_path, tiny_world), watch=tmp_path,
    )  # fmt: skip
    assert line.startswith(f"error: {planned / 'plan.json'}: {message}"), line


# -- a failed command never blocks the corrected one; a diverged run is never done -------------------------


def test_a_diverged_run_is_never_done_and_the_corrected_recipe_takes_the_folder(tiny_world, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(recycle_argv(tiny_world, shapes, out, "--lr", "1e30")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]  # not progress
    assert err == [
        f"error: run 0 of 1 from {tiny_world.base} (lr 1e+30) diverged: its trained weights are not finite "
        "(first: resnet.embedder.embedder.convolution.weight); nothing was saved; lower the learning rate "
        "(--lr, --lr-choices, --lp-lr)"
    ], err
    assert not list((out / "runs").glob("*/done")) and not (out / "soup").exists()
    assert list((out / "lp").glob("*/done"))  # the probe trained fine: it is content-addressed, reused below

    assert cli.main(recycle_argv(tiny_world, shapes, out, "--lr", "1e-3")) == 0
    soup = load_file(out / "soup" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in soup.values() if t.is_floating_point())
    assert "lr: 0.001" in (out / "recipe.yaml").read_text()


def test_a_folder_with_finished_runs_still_refuses_another_recipe(tiny_world, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(recycle_argv(tiny_world, shapes, out)) == 0
    capsys.readouterr()
    assert cli.main(recycle_argv(tiny_world, shapes, out, "--lr", "1e-3")) == 2
    assert "holds the runs of another recipe (differs in: lr: 5e-05 -> 0.001)" in capsys.readouterr().err


# -- killed writers and long names ---------------------------------------------------------------------------


def test_a_merge_killed_mid_write_leaves_nothing_the_rerun_keeps(tiny_world, tmp_path, capsys):
    """A real kill -9 of a process inside the merge's staging folder; the rerun sweeps it (and only a dead
    writer's: a live one's staging folder stays)."""
    out = tmp_path / "merged"
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from ratatouille_hub.io import staged_folder
            with staged_folder({str(out)!r}) as staging:
                (staging / "model.safetensors").write_bytes(b"half")
                print("staged", flush=True)
                time.sleep(600)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert writer.stdout.readline().strip() == "staged"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert len(list(tmp_path.glob(".merged.*.partial"))) == 1
    with staged_folder(tmp_path / "other") as live:  # someone else's merge, alive: never swept
        assert cli.main(["merge", str(tiny_world.aux[0]), str(tiny_world.aux[0]), "--output", str(out)]) == 0
        assert live.is_dir() and (live / WRITER_LOCK).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "other"]
    expected = ["README.md", "config.json", "merge.yaml", "model.safetensors", "preprocessor_config.json"]
    assert sorted(p.name for p in out.iterdir()) == expected  # the merge card and merge.yaml beside the model


def test_a_long_output_name_is_legal_for_every_file_written_beside_it(tiny_world, tmp_path, capsys):
    """A 250-character folder name is legal (255 is the limit): the staging, lock and retired names written
    beside it must stay legal too."""
    out = tmp_path / ("soup-" + "x" * 245)
    argv = ["merge", str(tiny_world.aux[0]), str(tiny_world.aux[0]), "--output", str(out)]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0  # replaces the earlier merge: the retired copy's name is legal too
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    long_recipe = tmp_path / ("r" * 250)
    assert cli.main(["plan", "--base", str(tiny_world.base), "--target", str(tiny_world.target), *TINY,
                     "--output", str(long_recipe)]) == 0  # fmt: skip


def test_a_saved_recipe_replays_with_push_to_hub_as_the_card_says(tiny_world, shapes, tmp_path, capsys, hub_namespace):
    """`recycle --config out/recipe.yaml` (the Quickstart's and every card's replay line), then the same with
    --push-to-hub: both run to the end, the replay trains nothing again, and the soup lands on the Hub."""
    out = tmp_path / "out"
    assert cli.main(recycle_argv(tiny_world, shapes, out)) == 0
    soup = (out / "soup" / "model.safetensors").read_bytes()
    capsys.readouterr()
    repo_id = f"{hub_namespace}/replayed"
    assert cli.main(["recycle", "--config", str(out / "recipe.yaml"), "--push-to-hub", repo_id]) == 0
    captured = capsys.readouterr()
    assert "[train] run 0 of 1: done earlier" in captured.err and f"pushed {out / 'soup'} to " in captured.out
    assert (out / "soup" / "model.safetensors").read_bytes() == soup
    from huggingface_hub import hf_hub_download

    assert Path(hf_hub_download(repo_id, "model.safetensors")).read_bytes() == soup


def test_a_domain_name_cannot_forge_a_line_of_the_plan(tiny_world, tmp_path, capsys):
    """A domain named with a newline and an escape sequence: every printed line of the dry run is one of ours."""
    dataset = toyworld.target_dataset(per_class_per_domain=3, size=16)
    hostile = "ph\n[train] run 9/9: done\x1b[2J"
    domains = [hostile if d == "photo" else d for d in dataset["domain"]]
    dataset = dataset.remove_columns("domain").add_column("domain", domains, feature=Value("string"))
    target = tmp_path / "forged" / "data"
    target.mkdir(parents=True)
    dataset.to_parquet(str(target / "train.parquet"))
    argv = [*recycle_argv(tiny_world, target.parent, tmp_path / "out", "--test-domain", hostile), "--dry-run"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # the plan (a result) and the progress lines before it
    assert "\x1b" not in printed and not any(line.startswith("[train] run 9/9") for line in printed.splitlines())
    assert "held out: ph\\n[train] run 9/9: done\\x1b[2J;" in captured.out
    assert "held out: ph\\n[train] run 9/9: done\\x1b[2J\n" in captured.err  # the [data] line


def test_an_image_size_the_base_cannot_take_is_refused_at_planning(shapes, tmp_path, capsys):
    """A ViT's position embeddings fix its grid of patches: --image-size 24 on a 16 px ViT failed in the linear
    probe as an internal error, after the output folder was taken; recycle and intertrain now refuse it at
    planning (merge, diagnose and update --target before decoding it), naming the size and the processor's. The ViT
    at its own size, and a ResNet (whose pooling takes any size) at 24 px, plan."""
    from ratatouille_hub.testing import save_tiny_checkpoint, tiny_processor, tiny_resnet, tiny_vit

    vit = save_tiny_checkpoint(tmp_path / "vit", tiny_vit(0), processor=tiny_processor(16))
    resnet = save_tiny_checkpoint(tmp_path / "resnet", tiny_resnet(0), processor=tiny_processor(16))
    out, places = tmp_path / "out", {"<tmp>": tmp_path}
    expected = (
        f"error: {vit} cannot take 24 px images (--image-size 24): Input image size (24*24) doesn't match model "
        "(16*16); its processor feeds it 16 px (leave --image-size out to use that)"
    )
    recycle = [
        "recycle",
        "--base",
        str(vit),
        "--strategy",
        "soup",
        "--target",
        str(shapes),
        *TINY,
        "--output",
        str(out),
    ]
    what = "recycle --image-size 24 on a ViT of 16 px position embeddings"
    argv = [*recycle, "--image-size", "24"]
    assert (
        refusals.fails_cleanly("flag-image-size-untakeable", what, argv, "--image-size 24", out, capsys, places)
        == expected
    )
    intertrain = ["intertrain", "--base", str(vit), "--dataset", str(shapes), "--steps", "2", "--output", str(out)]
    what = "intertrain --image-size 24 on a ViT of 16 px position embeddings"
    argv = [*intertrain, "--image-size", "24"]
    assert (
        refusals.fails_cleanly(
            "flag-image-size-untakeable-intertrain", what, argv, "--image-size 24", out, capsys, places
        )
        == expected
    )
    copy = save_tiny_checkpoint(tmp_path / "vit-copy", tiny_vit(1), processor=tiny_processor(16))
    merge = [
        "merge",
        str(vit),
        str(copy),
        "--method",
        "greedy",
        "--target",
        str(shapes),
        "--image-size",
        "24",
        "--output",
        str(out),
    ]
    what = "merge --method greedy --image-size 24 of two ViTs of 16 px position embeddings"
    assert (
        refusals.fails_cleanly("flag-image-size-untakeable-merge", what, merge, "--image-size 24", out, capsys, places)
        == expected
    )
    assert cli.main([*recycle, "--dry-run"]) == 0
    assert cli.main(["recycle", "--base", str(resnet), "--strategy", "soup", "--target", str(shapes), *TINY,
                     "--image-size", "24", "--output", str(out), "--dry-run"]) == 0  # fmt: skip


def test_a_swin_is_refused_exactly_at_the_sizes_its_windows_cannot_take(tmp_path):
    """A failed forward shrinks a Swin's later windows in place: the size check builds a model per forward, so
    the processor's size is judged on a fresh one (with one model, no size was ever refused). The sizes refused
    are those where the real model fails (measured: 8-16 px for windows of 2 over 4 px patches, 3 stages)."""
    import torch
    from transformers import SwinConfig, SwinForImageClassification

    from ratatouille_hub.models import ArchitectureError, refuse_image_size

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1], window_size=2)
    SwinForImageClassification(config).save_pretrained(tmp_path / "swin")
    for size in (16, 20):
        with torch.no_grad(), pytest.raises(RuntimeError) if size == 16 else nullcontext():
            SwinForImageClassification(config).eval()(pixel_values=torch.zeros(1, 3, size, size))
    with pytest.raises(ArchitectureError, match=r"^swin cannot take 16 px images \(--image-size 16\): "):
        refuse_image_size(tmp_path / "swin", "swin", 16, 32)
    for size in (20, 48):
        refuse_image_size(tmp_path / "swin", "swin", size, 32)
