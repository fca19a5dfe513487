"""The command shaped like `hf`: --version, env, required flags named by their flag, the grouped --help, the
`hf ratatouille` extension and docs/cli.md generated from the parser."""

from __future__ import annotations

import importlib
import os
import stat
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pytest

from ratatouille_hub import cli
from ratatouille_hub.cli_reference import REGENERATE, reference

ROOT = Path(__file__).resolve().parent.parent
HF = Path(sys.executable).with_name("hf")


def usage(capsys, *argv: str) -> str:
    """The usage lines of `argv --help`, joined into one line."""
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    return " ".join(help_text.split("\n\n")[0].split())


def error_line(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert "Traceback" not in captured.err + captured.out
    return line


# -- --version and env -----------------------------------------------------------------------------


def test_version_names_the_installed_package_then_torch_and_transformers(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == f"ratatouille-hub {metadata.version('ratatouille-hub')}"
    assert f"torch {metadata.version('torch')}, transformers {metadata.version('transformers')}" in second


def test_env_reports_versions_devices_and_hub_settings_and_never_the_token(tmp_path):
    secret, password = "hf_QxZv93KpLw0TmY7RbJdN", "Pw4Jq8Ze2Vu6Xc"
    environment = {
        **os.environ,
        "HF_TOKEN": secret,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": f"http://someone:{password}@127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HUGGING_FACE_HUB_TOKEN"):
        environment.pop(variable, None)
    done = subprocess.run(
        [sys.executable, "-m", "ratatouille_hub", "env"], capture_output=True, text=True, env=environment, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Copy-and-paste the text below in your GitHub issue."
    report = dict(line[2:].split(": ", 1) for line in lines[2:])
    assert list(report)[:9] == [
        "ratatouille-hub version",
        "Platform",
        "Python version",
        "torch version",
        "transformers version",
        "datasets version",
        "huggingface_hub version",
        "safetensors version",
        "accelerate version",
    ]
    for library in ("torch", "transformers", "datasets", "huggingface_hub", "safetensors", "accelerate"):
        assert report[f"{library} version"] == metadata.version(library)
    assert report["Python version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["torch threads"] == "1"
    assert report["CPU cores"].endswith(f" of {os.cpu_count()}")
    assert report["CUDA"] == "not available" or report["CUDA"].startswith("available, ")
    assert report["MPS"] in ("available", "not available")
    assert report["HF endpoint"] == "http://127.0.0.1:9"  # the password in the URL is left out too
    assert report["HF cache"] == str(tmp_path / "hf-home" / "hub")
    assert report["HF_HUB_OFFLINE"] == "True"
    assert report["Hub token"] == "present (from HF_TOKEN)"
    assert report["OMP_NUM_THREADS"] == "1"
    printed = done.stdout + done.stderr
    for hidden in (secret, password):  # nor any 6 characters of either
        assert not [hidden[i : i + 6] for i in range(len(hidden) - 5) if hidden[i : i + 6] in printed]


# -- required options: shown as required, named by their flag --------------------------------------


def test_contribute_shows_to_as_required_and_names_it_by_its_flag(capsys, tmp_path):
    assert "--to TO" in usage(capsys, "contribute") and "[--to TO]" not in usage(capsys, "contribute")
    assert error_line(capsys, "contribute", str(tmp_path)) == (
        "error: the following arguments are required: --to (see ratatouille-hub contribute --help)"
    )
    assert error_line(capsys, "contribute", str(tmp_path), "--to", "not an id") == (
        "error: --to must be a Hub model id, namespace/name (got 'not an id')"
    )
    assert not list(tmp_path.iterdir())


def test_recycle_shows_base_and_target_as_required_and_a_config_file_may_give_them(capsys, tmp_path):
    shown = usage(capsys, "recycle")
    for required in ("--base BASE", "--target TARGET"):
        assert f" {required} " in shown and f"[{required}]" not in shown
    assert "[--runs RUNS]" in shown
    assert error_line(capsys, "recycle", "--target", "org/pacs") == (
        "error: the following arguments are required: --base (see ratatouille-hub recycle --help)"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: org/base\nruns: 0\n")
    # the file gives --base, so it is no longer required of the flags; what is still missing is named by its flag,
    # and a bad value by where it was written: its key in the file, or its flag
    assert error_line(capsys, "recycle", "--config", str(recipe)) == (
        f"error: {recipe}: runs must be at least 1 (got 0); --target is required"
    )
    assert error_line(capsys, "recycle", "--config", str(recipe), "--target", "org/pacs", "--runs", "-2") == (
        "error: --runs must be at least 1 (got -2)"
    )
    assert error_line(capsys, "recycle", "--base", "b", "--target", "t", "--holdout-fraction", "1") == (
        "error: --holdout-fraction must be in (0, 1) (got 1.0)"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_the_python_api_still_names_fields():
    from ratatouille_hub.config import ConfigError, RecipeConfig

    with pytest.raises(ConfigError, match=r"^target is required; holdout_fraction must be in \(0, 1\) \(got 1.0\)$"):
        RecipeConfig(base="b", holdout_fraction=1.0)


# -- --revision ------------------------------------------------------------------------------------


def test_revision_without_push_to_hub_is_refused_rather_than_ignored(capsys, tmp_path):
    line = error_line(
        capsys, "recycle", "--base", "org/base", "--target", "org/pacs", "--revision", "v1", "--output", str(tmp_path)
    )
    assert line.startswith("error: --revision is the branch --push-to-hub writes to, and goes with it")
    assert "--base org/base@v1.0" in line
    assert not list(tmp_path.iterdir())


# -- the grouped --help ----------------------------------------------------------------------------


def test_top_level_help_groups_every_command_under_one_heading(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    groups = {
        "Recipe (train fine-tunes on a target, then average them):": [
            "recycle",
            "plan",
            "run",
            "assemble",
            "sweep",
            "intertrain",
        ],
        "Soups (merge and share checkpoints, no training):": ["merge", "update", "contribute", "push"],
        "Inspect:": ["discover", "diagnose", "results"],
        "Tools:": ["local-hub", "demo", "env"],
    }
    blocks = {block.splitlines()[0]: block.splitlines()[1:] for block in text.split("\n\n")}
    assert list(groups) == [heading for heading in blocks if heading in groups]
    for heading, names in groups.items():
        assert [line.split()[0] for line in blocks[heading]] == names
        assert all(len(line.split()) > 3 for line in blocks[heading])  # each with its one line of help
    assert sorted(name for names in groups.values() for name in names) == sorted(
        cli.command_parsers(cli.build_parser())
    )


def test_no_arguments_prints_the_help(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().out.startswith("usage: ratatouille-hub [-h] [--version] [-q] [-v] [--debug] COMMAND ...")


# -- the hf extension ------------------------------------------------------------------------------


def console_scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_hf_ratatouille_is_a_console_script_of_the_same_main(monkeypatch, capsys):
    scripts = console_scripts()
    assert scripts["hf-ratatouille"] == scripts["ratatouille-hub"]
    module, _, function = scripts["hf-ratatouille"].partition(":")
    entry = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/hf-ratatouille", "--version"])
    with pytest.raises(SystemExit) as exited:
        entry()
    assert exited.value.code == 0
    assert capsys.readouterr().out.splitlines()[0] == f"ratatouille-hub {metadata.version('ratatouille-hub')}"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/hf-ratatouille", "merge", "--help"])
    with pytest.raises(SystemExit):
        entry()
    assert capsys.readouterr().out.startswith("usage: hf ratatouille merge [-h]")


def test_hf_runs_it_as_an_installed_extension(tmp_path):
    """huggingface_hub's `hf` runs `hf ratatouille ...` through the hf-ratatouille script of an extension
    `hf extensions install` installed (its manifest under ~/.local/share/hf/extensions); it does not look on
    PATH. The script here is the one pip writes for the pyproject entry; the manifest is hf's own record."""
    extensions = pytest.importorskip("huggingface_hub.cli.extensions")
    if not HF.exists():
        pytest.skip(f"{HF} is not installed")
    module, _, function = console_scripts()["hf-ratatouille"].partition(":")
    script = tmp_path / "venv" / "bin" / "hf-ratatouille"
    script.parent.mkdir(parents=True)
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    home = tmp_path / "home"
    extensions.ExtensionManifest(
        owner="someone",
        repo="hf-ratatouille",
        repo_id="someone/hf-ratatouille",
        short_name="ratatouille",
        executable_path=str(script),
        type="python",
        installed_at=datetime.now(timezone.utc),
    ).save(home / ".local" / "share" / "hf" / "extensions" / "hf-ratatouille")
    environment = {**os.environ, "HOME": str(home), "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}

    def hf(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(HF), *argv], capture_output=True, text=True, env=environment, timeout=120)

    version = hf("ratatouille", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[0] == f"ratatouille-hub {metadata.version('ratatouille-hub')}"
    help_text = hf("ratatouille", "push", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: hf ratatouille push [-h]")
    refused = hf("ratatouille", "contribute", str(tmp_path))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: the following arguments are required: --to (see hf ratatouille contribute --help)"
    )


# -- docs/cli.md -----------------------------------------------------------------------------------


def test_docs_cli_md_is_generated_from_the_parser():
    documented = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert documented == reference(), f"docs/cli.md is out of date: regenerate it with `{REGENERATE}`"
    for name in cli.command_parsers(cli.build_parser()):
        assert f"\n### {name}\n\n```text\nusage: ratatouille-hub {name} [-h]" in documented
