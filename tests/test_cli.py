"""The `ratatouille-hub` command: help, flags generated from RecipeConfig, merge, and clean errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ratatouille_hub import cli
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.fetch import FetchError
from ratatouille_hub.merge_engine import average_state_dicts
from ratatouille_hub.testing import perturbed_backbone, tiny_resnet

ENTRY_POINT = Path(sys.executable).with_name("ratatouille-hub")


def subcommands() -> list[str]:
    return sorted(cli.command_parsers(cli.build_parser()))


def run_entry_point(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.exists():
        pytest.skip(f"{ENTRY_POINT} is not installed")
    return subprocess.run(
        [str(ENTRY_POINT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cli-checkpoints")
    folders = []
    for seed in (0, 1):
        model = tiny_resnet(seed)
        # a trained look: no two tensors alike, BatchNorm statistics included
        model.load_state_dict(perturbed_backbone(model.state_dict(), seed, integer_value=5 + seed, head=True))
        model.save_pretrained(root / f"model{seed}")
        folders.append(root / f"model{seed}")
    return folders


# -- help -------------------------------------------------------------------------------------------


def test_every_command_is_listed():
    assert {"recycle", "merge", "demo"} <= set(subcommands())


@pytest.mark.parametrize("argv", [[]] + [[name] for name in subcommands()], ids=lambda a: " ".join(a) or "top")
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ratatouille-hub {' '.join(argv)}".rstrip())


def test_help_through_the_installed_entry_point_is_light():
    result = run_entry_point("recycle", "--help")
    assert result.returncode == 0, result.stderr
    assert "--lr-choices" in result.stdout and "--no-augment" in result.stdout
    probe = (
        "import sys\nfrom ratatouille_hub import cli\ntry:\n    cli.main(['recycle', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets', 'evaluate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("HEAVY []")


# -- recycle flags ----------------------------------------------------------------------------------


def test_every_config_field_has_a_recycle_flag_but_what_the_plan_records():
    flags = {option for a in cli.command_parsers(cli.build_parser())["recycle"]._actions for option in a.option_strings}
    recorded = {"discovered"}  # written into recipe.yaml by the plan (what discovery chose), never typed
    assert {
        f.name for f in dataclasses.fields(RecipeConfig) if "--" + f.name.replace("_", "-") not in flags
    } == recorded


def test_config_file_with_overrides(tmp_path):
    saved = RecipeConfig(
        base="org/base",
        target="org/pacs",
        aux=("a/one",),
        runs=3,
        lr=1e-4,
        augment=True,
        test_domain="photo",
        output=str(tmp_path / "out"),
    )
    saved.save_yaml(tmp_path / "recipe.yaml")
    parser = cli.build_parser()

    replayed = cli.options_from_args(parser.parse_args(["recycle", "--config", str(tmp_path / "recipe.yaml")]))
    assert replayed == saved

    argv = [
        "recycle",
        "--config",
        str(tmp_path / "recipe.yaml"),
        "--runs",
        "5",
        "--aux",
        "b/two",
        "c/three",
        "--no-augment",
        "--lr-choices",
        "1e-3",
        "2e-3",
        "--test-domain",
        "sketch",
        "--image-size",
        "32",
        "--method",
        "greedy",
    ]
    overridden = cli.options_from_args(parser.parse_args(argv))
    assert overridden == saved.replace(
        runs=5,
        aux=("b/two", "c/three"),
        augment=False,
        lr_choices=(1e-3, 2e-3),
        test_domain="sketch",
        image_size=32,
        method="greedy",
    )


def test_flags_alone_fill_in_the_defaults():
    args = cli.build_parser().parse_args(["recycle", "--base", "org/base", "--target", "org/pacs", "--steps", "7"])
    assert cli.options_from_args(args) == RecipeConfig(base="org/base", target="org/pacs", steps=7)


def test_a_bad_choice_is_refused_by_the_parser_in_one_line(capsys):
    assert cli.main(["recycle", "--base", "b", "--target", "t", "--method", "median"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: argument --method: invalid choice: 'median'")
    assert line.endswith("(see ratatouille-hub recycle --help)")


# -- merge ------------------------------------------------------------------------------------------


def test_merge_writes_the_mean_of_two_checkpoints(checkpoints, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["merge", *map(str, checkpoints), "--output", str(out)]) == 0
    assert "merged 2 models" in capsys.readouterr().out
    merged, a, b = load_file(out / "model.safetensors"), *(load_file(c / "model.safetensors") for c in checkpoints)
    assert merged.keys() == a.keys()
    for name, tensor in merged.items():
        if tensor.is_floating_point():
            # with two inputs the float32 mean is exact: a/2 and b/2 are exact, their sum is rounded once
            assert torch.equal(tensor, ((a[name].double() + b[name].double()) / 2).float()), name
            assert not torch.equal(a[name], b[name]), name
        else:
            assert torch.equal(tensor, a[name]) and not torch.equal(tensor, b[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((checkpoints[0] / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging leftovers


def test_weighted_merge(checkpoints, tmp_path):
    out = tmp_path / "merged"
    assert (
        cli.main(["merge", *map(str, checkpoints), "--output", str(out), "--method", "weighted", "--weights", "1", "3"])
        == 0
    )
    merged, a, b = load_file(out / "model.safetensors"), *(load_file(c / "model.safetensors") for c in checkpoints)
    expected = average_state_dicts([a, b], weights=[0.25, 0.75])
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    name = "classifier.1.weight"
    torch.testing.assert_close(
        merged[name].double(), 0.25 * a[name].double() + 0.75 * b[name].double(), rtol=1e-6, atol=1e-7
    )


def _bad_inputs(checkpoints: list[Path], tmp_path: Path) -> dict[str, list[str]]:
    a, b = map(str, checkpoints)
    out = str(tmp_path / "out")
    (tmp_path / "not-a-yaml.yaml").write_text("- just\n- a list\n")
    return {
        "merge-missing-folder": ["merge", a, str(tmp_path / "missing"), "--output", out],
        "weighted-without-weights": ["merge", a, b, "--output", out, "--method", "weighted"],
        "weights-without-weighted": ["merge", a, b, "--output", out, "--weights", "1", "2"],
        "one-weight-for-two-models": ["merge", a, b, "--output", out, "--method", "weighted", "--weights", "1"],
        "negative-weight": ["merge", a, b, "--output", out, "--method", "weighted", "--weights", "1", "-1"],
        "recycle-without-base": ["recycle", "--target", "org/pacs", "--output", out],
        "recycle-missing-config": ["recycle", "--config", str(tmp_path / "missing.yaml")],
        "recycle-config-not-a-mapping": ["recycle", "--config", str(tmp_path / "not-a-yaml.yaml")],
        "recycle-zero-runs": ["recycle", "--base", "b", "--target", "t", "--runs", "0", "--output", out],
    }


BAD = [
    "merge-missing-folder",
    "weighted-without-weights",
    "weights-without-weighted",
    "one-weight-for-two-models",
    "negative-weight",
    "recycle-without-base",
    "recycle-missing-config",
    "recycle-config-not-a-mapping",
    "recycle-zero-runs",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_exit_code_2(case, checkpoints, tmp_path, capsys):
    argv = _bad_inputs(checkpoints, tmp_path)[case]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 5, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_bad_input_through_the_entry_point(tmp_path):
    result = run_entry_point(
        "merge", str(tmp_path / "missing-a"), str(tmp_path / "missing-b"), "--output", str(tmp_path / "o")
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(result.stderr.splitlines()) == 1 and "missing-a" in result.stderr


def test_debug_shows_the_real_exception(checkpoints, tmp_path):
    with pytest.raises(FetchError, match="no such model folder"):
        cli.main(["--debug", "merge", str(checkpoints[0]), str(tmp_path / "missing"), "--output", str(tmp_path / "o")])


def test_merge_into_an_existing_folder_never_deletes_unrelated_files(checkpoints, tmp_path):
    out = tmp_path / "my-models"
    out.mkdir()
    (out / "notes.txt").write_text("years of work")
    cli.main(["merge", *map(str, checkpoints), "--output", str(out)])
    assert (out / "notes.txt").read_text() == "years of work"


def test_merge_refuses_an_output_that_is_a_file(checkpoints, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    assert cli.main(["merge", *map(str, checkpoints), "--output", str(target)]) == 2
    assert capsys.readouterr().err.startswith("error: output")
    assert target.read_bytes() == b"keep me"


def test_help_groups_flags_and_the_target_group_is_the_same_in_every_command_that_reads_a_target():
    commands = cli.command_parsers(cli.build_parser())

    def groups(command: str) -> dict[str, set[str]]:
        parser = commands[command]
        return {g.title: {o for a in g._group_actions for o in a.option_strings} for g in parser._action_groups}

    recycle = groups("recycle")
    titles = [title for title in recycle if title not in ("positional arguments", "options")]
    assert [title.split(" (")[0] for title in titles] == [
        "model",
        "target",
        "runs",
        "training",
        "merging",
        "output",
        "Hub",
    ]
    target = next(flags for title, flags in recycle.items() if title.startswith("target"))
    assert {"--target", "--test-domain", "--seed", "--holdout-fraction", "--domain-column", "--label-column"} <= target
    for command in ("merge", "diagnose"):
        assert next(flags for title, flags in groups(command).items() if title.startswith("target")) == target
