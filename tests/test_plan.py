"""The plan: every run listed before anything trains, printed by `recycle --dry-run` without touching the
output folder; the same target options mean the same split in every command."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace

import jsondoc
import pytest

from ratatouille_hub import cli, recycle
from ratatouille_hub.config import DiagnoseOptions, MergeOptions, RecipeConfig, draw_hparams
from ratatouille_hub.recipe import plan_recipe
from ratatouille_hub.recipe.plan import PLAN_FILE, load_plans, run_work, save_plans
from ratatouille_hub.strategies import FusionSpec
from ratatouille_hub.testing import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_plan_lists_every_run_with_its_init_hparams_seeds_and_key(tiny_world, tmp_path):
    config = tiny_recipe(tiny_world, tmp_path / "out")
    [plan] = plan_recipe(config, echo=lambda line: None)
    assert [spec.init.source for spec in plan.runs] == [config.base, *config.aux]
    assert [spec.hparams for spec in plan.runs] == [draw_hparams(config, i) for i in range(3)]
    assert [spec.warmup_steps for spec in plan.runs] == [0, 2, 2]  # only recycled inits warm their head up
    assert [spec.run_seed for spec in plan.runs] == ["0:0", "0:1", "0:2"]
    assert len({spec.key for spec in plan.runs}) == 3 and plan.lp.key not in {spec.key for spec in plan.runs}
    assert plan.target.train_domains == ("painting", "photo", "sketch") and plan.target.test_domain == "cartoon"
    assert plan_recipe(config, echo=lambda line: None) == [plan]  # frozen and deterministic
    # 87 training images over 3 domains (6 per class and domain, 80/20): 4 steps x 4 images x 3 domains
    assert run_work(plan.runs[1], plan.target) == ((2 + 4) * 4 * 3, 3 * plan.target.val_size + 36)
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_split_passes_are_part_of_a_runs_key_and_plans_saved_before_them_still_load(tiny_world, tmp_path):
    output = tmp_path / "out"
    [whole] = plan_recipe(tiny_recipe(tiny_world, output), echo=lambda line: None)
    [split] = plan_recipe(tiny_recipe(tiny_world, output, micro_batch=2), echo=lambda line: None)
    assert [spec.micro_batch for spec in whole.runs] == [None] * 3
    assert [spec.micro_batch for spec in split.runs] == [2] * 3
    assert not {spec.key for spec in whole.runs} & {spec.key for spec in split.runs}
    assert split.lp.key != whole.lp.key  # its features are computed in passes of 2
    [large] = plan_recipe(tiny_recipe(tiny_world, output, micro_batch=64), echo=lambda line: None)
    assert (large.lp, large.runs) == (whole.lp, whole.runs)  # 64 is a whole step and evaluation's own pass
    output.mkdir()
    save_plans([split], output)
    assert load_plans(output) == [split]
    saved = json.loads((output / PLAN_FILE).read_text())
    for run in saved["plans"][0]["runs"]:
        del run["micro_batch"]
    (output / PLAN_FILE).write_text(json.dumps(saved))
    assert [spec.micro_batch for spec in load_plans(output)[0].runs] == [None] * 3


def test_micro_batch_bounds_every_pass_through_the_model(tiny_world, tmp_path, monkeypatch):
    """Training, the probe's features, validation, predictions and assembly all go in passes of at most N."""
    import torch

    passes: list[int] = []

    def record(module, args):
        if isinstance(module, torch.nn.Conv2d):
            passes.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        recycle(tiny_recipe(tiny_world, tmp_path / "whole"), echo=lambda line: None)
        whole, passes[:] = max(passes), []
        recycle(tiny_recipe(tiny_world, tmp_path / "split", micro_batch=5), echo=lambda line: None)
    finally:
        handle.remove()
    assert whole == 36  # the test domain's 36 images in one evaluation pass
    assert max(passes) == 5


def test_fusing_plans_its_mixtures_before_building_any(tiny_world, tmp_path):
    [plan] = plan_recipe(tiny_recipe(tiny_world, tmp_path / "out", strategy="fusing"), echo=lambda line: None)
    for spec in plan.runs:
        assert isinstance(spec.init, FusionSpec) and spec.init.members[0] == plan.base
        assert sum(spec.init.weights) == pytest.approx(1.0) and spec.recycled
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_then_the_done_runs(tiny_world, tmp_path, capsys):
    config = tiny_recipe(tiny_world, tmp_path / "out")
    argv = ["recycle", "--config", str(tmp_path / "recipe.yaml"), "--dry-run"]
    config.save_yaml(tmp_path / "recipe.yaml")
    assert cli.main(argv) == 0
    before = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    [plan] = plan_recipe(config, echo=lambda line: None)
    for spec in plan.runs:
        assert f"{spec.index:>4}  pending" in before and spec.folder in before
    assert "pending: 3 of 3 runs" in before and f"linear probe {plan.lp.folder}: pending" in before
    assert f"from {config.aux[0]}@" in before and "lr" in before and "train imgs" in before

    recycle(config, echo=lambda line: None)
    assert cli.main(argv) == 0
    after = capsys.readouterr().out
    assert "pending: 0 of 3 runs, 0 images to train on" in after and " pending " not in after
    assert all(f"{spec.index:>4}  done" in after for spec in plan.runs)


def test_dry_run_and_plan_print_the_plan_as_json_and_the_api_plans_the_same(tiny_world, tmp_path, capsys):
    from ratatouille_hub.recipe import plan_summary
    from ratatouille_hub.records import to_jsonable

    config = tiny_recipe(tiny_world, tmp_path / "out")
    config.save_yaml(tmp_path / "recipe.yaml")
    assert cli.main(["recycle", "--config", str(tmp_path / "recipe.yaml"), "--dry-run", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)  # stdout holds the JSON alone: the progress lines went to stderr
    assert f"[fetch] base {config.base}" in err and not (tmp_path / "out").exists()
    [plan] = plan_recipe(config, echo=lambda line: None)
    assert printed == to_jsonable(plan_summary([plan], tmp_path / "out"))
    assert printed["output"] == str(tmp_path / "out")
    [report] = printed["plans"]
    assert report["strategy"] == "ratatouille" and report["target"] == plan.target.reference
    assert (report["train_domains"], report["test_domain"], report["image_size"]) == (
        ["painting", "photo", "sketch"],
        "cartoon",
        16,
    )
    # 108 images: 87 train, 21 validation; each run evaluates validation at steps 2 and 4 and at the end, then the 36 held out
    assert report["linear_probe"] == {"folder": plan.lp.folder, "done": False, "steps": 5, "images": 108}
    assert [(run["index"], run["done"], run["steps"], run["warmup_steps"]) for run in report["runs"]] == [
        (0, False, 4, 0),
        (1, False, 4, 2),
        (2, False, 4, 2),
    ]
    assert [(run["train_images"], run["eval_images"]) for run in report["runs"]] == [(48, 99), (72, 99), (72, 99)]
    assert report["runs"][0]["hparams"] == {"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0}
    assert [run["hparams"] for run in report["runs"]] == [vars(draw_hparams(config, i)) for i in range(3)]
    assert [run["folder"] for run in report["runs"]] == [spec.folder for spec in plan.runs]
    assert [run["init"].split("@sha256:")[0] for run in report["runs"]] == [config.base, *config.aux]
    assert report["left_out"] == []
    assert jsondoc.undocumented(printed, "plan") == []

    assert cli.main(["plan", "--config", str(tmp_path / "recipe.yaml"), "--format", "json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved == printed and (tmp_path / "out" / PLAN_FILE).is_file()  # the same plan, now saved
    assert cli.main(["recycle", "--config", str(tmp_path / "recipe.yaml"), "--dry-run", "--format", "quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_the_target_options_mean_the_same_in_merge_and_diagnose():
    parser = cli.build_parser()
    flags = [
        "--target",
        "t",
        "--seed",
        "3",
        "--holdout-fraction",
        "0.5",
        "--label-column",
        "y",
        "--domain-column",
        "env",
    ]
    merge = cli.options_from_args(
        parser.parse_args(["merge", "a", "b", "--output", "o", "--method", "greedy", *flags]), MergeOptions
    )
    diagnose = cli.options_from_args(parser.parse_args(["diagnose", "a", "b", *flags]), DiagnoseOptions)
    recipe = RecipeConfig(base="a", target="t", seed=3, holdout_fraction=0.5, label_column="y", domain_column="env")
    for options in (merge, diagnose):
        for name in ("target", "seed", "holdout_fraction", "label_column", "domain_column", "image_column"):
            assert getattr(options, name) == getattr(recipe, name), name


def test_merge_greedy_ranks_on_the_split_of_its_own_target_options(tiny_world, tmp_path, monkeypatch):
    import ratatouille_hub.recipe.assembly as assembly

    seen = []

    def record(options, base, token=None):
        seen.append(options)
        raise RuntimeError("stop before ranking")

    monkeypatch.setattr(assembly, "prepare_target", record)
    argv = ["--debug", "merge", str(tiny_world.base), str(tiny_world.base), "--output", str(tmp_path / "m")]
    argv += ["--method", "greedy", "--target", str(tiny_world.target), "--seed", "7", "--holdout-fraction", "0.3"]
    with pytest.raises(RuntimeError, match="stop before ranking"):
        cli.main(argv)
    (options,) = seen
    assert (options.seed, options.holdout_fraction, options.target) == (7, 0.3, str(tiny_world.target))


def test_recycling_less_than_given_is_said_and_one_fine_tune_named_twice_is_refused(
    tiny_world, tmp_path, caplog, capsys
):
    """Ratatouille from a local base with no --aux trained every run from the base, and fine-tunes past
    --runs - 1 started no run, both without a word; a fine-tune named twice started two runs and counted twice."""
    import refusals

    warnings = lambda: [r.getMessage() for r in caplog.records if "[plan] warning" in r.getMessage()]  # noqa: E731
    with caplog.at_level("WARNING"):
        plan_recipe(replace(tiny_recipe(tiny_world, tmp_path / "out"), aux=()), echo=lambda line: None)
    assert warnings() == [
        "[plan] warning: --strategy ratatouille recycles no fine-tune (no --aux given, and a local base is never "
        "searched on the Hub): every run starts from the base, as with --strategy soup"
    ]
    caplog.clear()
    with caplog.at_level("WARNING"):
        [plan] = plan_recipe(replace(tiny_recipe(tiny_world, tmp_path / "out"), runs=2), echo=lambda line: None)
    assert [spec.init.source for spec in plan.runs] == [str(tiny_world.base), str(tiny_world.aux[0])]
    assert warnings() == [
        f"[plan] warning: 1 of the 2 recycled fine-tunes starts no run with --runs 2: {tiny_world.aux[1]}"
    ]
    caplog.clear()
    with caplog.at_level("WARNING"):
        plan_recipe(tiny_recipe(tiny_world, tmp_path / "out"), echo=lambda line: None)  # 3 runs: base + both
        plan_recipe(replace(tiny_recipe(tiny_world, tmp_path / "out", strategy="soup"), aux=()), echo=lambda line: None)
        # fusing draws one fine-tune per auxiliary dataset for each run: with two of one dataset, one run leaves
        # the other out by design
        carded = []
        for aux in tiny_world.aux:
            carded.append(shutil.copytree(aux, tmp_path / "carded" / aux.name))
            (carded[-1] / "README.md").write_text("---\ndatasets:\n- cifar10\n---\n")
        fusing = replace(
            tiny_recipe(tiny_world, tmp_path / "out", strategy="fusing"), runs=1, aux=tuple(map(str, carded))
        )
        [fused] = plan_recipe(fusing, echo=lambda line: None)
    assert len(fused.runs[0].init.members) == 2  # the base and one of the two fine-tunes
    assert warnings() == []

    first, again = str(tiny_world.aux[0]), str(tiny_world.aux[0]) + "/"
    out = tmp_path / "twice"
    argv = ["recycle", "--base", str(tiny_world.base), "--aux", first, again, "--target", str(tiny_world.target),
            "--output", str(out), "--dry-run"]  # fmt: skip
    what = "--aux naming one fine-tune twice (as a folder and as that folder with a slash)"
    # the digest of random weights, whose draw differs by CPU kind: docs/errors.md shows a placeholder
    digest = hashlib.sha256((tiny_world.aux[0] / "model.safetensors").read_bytes()).hexdigest()[:16]
    places = {"<ckpt>": tiny_world.base.parent, "<world>": tiny_world.target.parent, "<digest>": digest}
    line = refusals.fails_cleanly("aux-named-twice", what, argv, again, out, capsys, places)
    assert (
        line
        == f"error: --aux names one fine-tune twice: {first} and {again} (sha256:{digest}); name each fine-tune once"
    )
