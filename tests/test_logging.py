"""Where lines go (docs/logging.md): results on stdout, progress and warnings through the `ratatouille_hub`
logger on stderr, -q/-v/--debug before or after the command, and the libraries' own bars hidden unless -v
(or the user's own variable says otherwise)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ratatouille_hub import cli, logs
from ratatouille_hub.recipe import plan_recipe, recycle
from ratatouille_hub.testing import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "discover", "--base", "b"],
        ["discover", "--base", "b", "-q"],
        ["--quiet", "local-hub", "--root", "r"],
        ["local-hub", "--root", "r", "--quiet"],
    ],
)
def test_quiet_is_accepted_before_and_after_the_command(argv):
    args = cli.build_parser().parse_args(argv)
    assert (args.quiet, args.verbose, args.debug) == (True, False, False)


@pytest.mark.parametrize(
    "argv",
    [["-v", "--debug", "merge", "a", "b", "--output", "o"], ["merge", "a", "b", "--output", "o", "-v", "--debug"]],
)
def test_verbose_and_debug_are_accepted_before_and_after_the_command(argv):
    args = cli.build_parser().parse_args(argv)
    assert (args.quiet, args.verbose, args.debug) == (False, True, True)


def test_a_flag_given_before_the_command_is_not_undone_after_it():
    args = cli.build_parser().parse_args(["--debug", "merge", "a", "b", "--output", "o", "-q"])
    assert (args.quiet, args.verbose, args.debug) == (True, False, True)


def test_quiet_and_verbose_together_are_refused_by_the_parser(capsys):
    assert cli.main(["-q", "merge", "a", "b", "--output", "o", "-v"]) == 2
    assert "-q/--quiet and -v/--verbose ask for opposite things" in capsys.readouterr().err


def test_a_progress_line_is_escaped_and_reaches_stderr_in_one_write(monkeypatch):
    """Ranks share one stderr: a line written in pieces could be glued to another rank's; and a name someone
    else chose must not act on the terminal."""
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    logging.getLogger("ratatouille_hub.recipe").info("[rank 1/2] [train] run 1 of 3 from \x1b[2Jorg/x\u202e")
    assert writes == ["[rank 1/2] [train] run 1 of 3 from \\x1b[2Jorg/x\\u202e\n"]


def test_quiet_hides_progress_and_our_bars_and_keeps_warnings(capsys):
    log = logging.getLogger("ratatouille_hub.recipe")
    assert logs.bar_disable() is None  # the default: drawn when stderr is a terminal
    with logs.verbosity(logs.QUIET, libraries=False):
        log.info("[train] progress")
        log.warning("[vet]   warning: flagged")
        assert logs.bar_disable() is True
    with logs.verbosity(logs.VERBOSE, libraries=False):
        log.debug("[fetch] where it came from")
    log.debug("[fetch] not at the default level")
    assert capsys.readouterr().err.splitlines() == ["[vet]   warning: flagged", "[fetch] where it came from"]
    assert logging.getLogger("ratatouille_hub").level == logs.DEFAULT  # put back


def test_a_command_sets_the_libraries_switches_and_puts_them_back(monkeypatch):
    import datasets
    from transformers.utils import logging as hf_logging

    for variable in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "DATASETS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(variable, raising=False)
    before = (datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity(), hf_logging.get_verbosity())
    with logs.verbosity(logs.DEFAULT):
        assert not datasets.is_progress_bar_enabled()
        assert datasets.logging.get_verbosity() == hf_logging.get_verbosity() == logging.ERROR
    with logs.verbosity(logs.VERBOSE):
        assert datasets.is_progress_bar_enabled()
        assert datasets.logging.get_verbosity() == hf_logging.get_verbosity() == logging.WARNING
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's: it wins
    with logs.verbosity(logs.DEFAULT):
        assert hf_logging.get_verbosity() == before[2]
    assert (datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity(), hf_logging.get_verbosity()) == before


def test_the_python_api_says_its_progress_on_stderr(tiny_world, tmp_path, capsys):
    plan_recipe(tiny_recipe(tiny_world, tmp_path / "out"))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"[fetch] base {tiny_world.base}" in captured.err.splitlines()


# -- the libraries' bars, in a fresh process (they read their variables at import) ---------------------------


@pytest.fixture(scope="module")
def two_runs(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("logging") / "out"
    results = recycle(tiny_recipe(tiny_world, out).replace(runs=2), echo=lambda line: None)
    return [str(out / run.folder / "model") for run in results.runs]


def diagnose(two_runs, tiny_world, *flags: str, **environment: str) -> subprocess.CompletedProcess:
    """`diagnose` of two runs in a fresh process whose environment sets no progress-bar variable (the test
    session sets HF_HUB_DISABLE_PROGRESS_BARS) unless `environment` does."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("DISABLE_PROGRESS_BARS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **environment)
    argv = ["diagnose", *two_runs, "--target", str(tiny_world.target), "--image-size", "16", *flags]
    done = subprocess.run(
        [sys.executable, "-m", "ratatouille_hub", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("model accuracies (training-domain validation):\n")
    return done


@pytest.fixture(scope="module")
def by_default(two_runs, tiny_world) -> subprocess.CompletedProcess:
    """`diagnose` with no flag and no variable set: what -v and -q are compared with."""
    return diagnose(two_runs, tiny_world)


def test_the_libraries_bars_are_hidden_by_default_and_shown_by_verbose(two_runs, tiny_world, by_default):
    assert "Loading weights" not in by_default.stderr and "it/s" not in by_default.stderr
    verbose = diagnose(two_runs, tiny_world, "-v")
    assert verbose.stderr.count("Loading weights") >= len(two_runs)  # transformers' bar, once a model at least
    assert verbose.stdout == by_default.stdout  # the result is the same, on stdout


def test_quiet_prints_the_result_alone(two_runs, tiny_world, by_default):
    quiet = diagnose(two_runs, tiny_world, "-q")
    assert quiet.stderr == ""
    assert quiet.stdout == by_default.stdout


def test_the_users_progress_bar_variable_wins(two_runs, tiny_world):
    shown = diagnose(two_runs, tiny_world, HF_HUB_DISABLE_PROGRESS_BARS="0")
    assert "Loading weights" in shown.stderr
    hidden = diagnose(two_runs, tiny_world, "-v", HF_HUB_DISABLE_PROGRESS_BARS="1")
    assert "Loading weights" not in hidden.stderr


LIBRARIES_AFTER_IMPORT = """
import logging, sys
from ratatouille_hub import logs
with logs.library_output(logs.DEFAULT):
    print("transformers" in sys.modules, "datasets" in sys.modules)
    from transformers.utils import logging as hf_logging
    import datasets
    print(hf_logging.get_verbosity() == logging.ERROR, datasets.logging.get_verbosity() == logging.ERROR,
          datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled())
print(hf_logging.get_verbosity() == logging.WARNING, datasets.logging.get_verbosity() == logging.WARNING,
      datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled(), type(sys.meta_path[0]).__name__)
"""


def test_a_library_is_switched_when_the_command_imports_it_and_not_imported_for_it():
    environment = {k: v for k, v in os.environ.items() if not k.endswith(("VERBOSITY", "PROGRESS_BARS"))}
    ran = subprocess.run(
        [sys.executable, "-c", LIBRARIES_AFTER_IMPORT], capture_output=True, text=True, env=environment, cwd=ROOT
    )
    assert ran.returncode == 0, ran.stderr
    before, inside, after = ran.stdout.splitlines()
    assert before == "False False"  # entering the command imported neither
    assert inside == "True True False False"  # imported during it: errors only, bars off
    # put back as a fresh import leaves them (transformers' bars too, though it read the hidden state of
    # huggingface_hub's when it was imported); the import hook is gone
    assert after.split()[:4] == ["True", "True", "True", "True"]
    assert after.split()[4] != "_PostImportFinder"
