"""Issue #5, "failures lose nothing": a killed, locked-out or disk-full `recycle` never leaves anything a
later run would trust, and rerunning the same command finishes the job bit for bit.

A real process is killed with SIGKILL at several points (linear probe, a fine-tune, right after a run's
`done` marker, while the soup is staged); each rerun resumes, reuses every finished run, and the final soup
equals an uninterrupted run's byte for byte. Every subprocess runs with one OpenMP thread, so runs are
bit-reproducible whatever the machine.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import SafetensorError, safe_open

from ratatouille_hub import cli, merge_engine
from ratatouille_hub.artifacts import SoupFolder, replaced_builder
from ratatouille_hub.checkpoint import HEADER
from ratatouille_hub.io import PROGRESS
from ratatouille_hub.recipe import assembly
from ratatouille_hub.results import Results

ENTRY_POINT = Path(sys.executable).with_name("ratatouille-hub")
RECIPE_FLAGS = [
    "--runs",
    "3",
    "--steps",
    "60",
    "--eval-every",
    "10",
    "--lp-steps",
    "60",
    "--warmup-steps",
    "2",
    "--batch-size",
    "2",
    "--image-size",
    "16",
    "--seed",
    "0",
]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONWARNINGS": "ignore",
}
TIMEOUT = 120


@pytest.fixture(scope="module")
def world(tiny_world) -> SimpleNamespace:
    return tiny_world


def recycle_argv(world, out: Path, extra=()) -> list[str]:
    return [
        "recycle",
        "--base",
        str(world.base),
        "--aux",
        *map(str, world.aux),
        "--target",
        str(world.target),
        *RECIPE_FLAGS,
        "--output",
        str(out),
        *extra,
    ]


def command(world, out: Path, extra=()) -> list[str]:
    if ENTRY_POINT.exists():
        return [str(ENTRY_POINT), *recycle_argv(world, out, extra)]
    return [sys.executable, "-m", "ratatouille_hub.cli", *recycle_argv(world, out, extra)]


def run_to_completion(world, out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command(world, out), capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class Watched:
    """A recycle process whose progress lines (stderr) are collected as they come (for stage detection)."""

    def __init__(self, world, out: Path, extra=(), argv: list[str] | None = None):
        self.process = subprocess.Popen(
            argv or command(world, out, extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def kill_when(self, condition, *, delay: float = 0.0, timeout: float = TIMEOUT) -> None:
        """SIGKILL as soon as `condition()` holds (plus `delay`); fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"finished before the kill point; stderr: {self.lines[-5:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.002)
        if delay:
            time.sleep(delay)
        assert self.process.poll() is None, f"finished before the kill point; stderr: {self.lines[-5:]}"
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL
        self._reader.join(timeout=10)


def published(out: Path, stage: str) -> list[Path]:
    """The folders of a stage that a later run would look at (staging folders are hidden: `.name.*`)."""
    root = out / stage
    return [f for f in root.iterdir() if not f.name.startswith(".")] if root.is_dir() else []


def done_count(out: Path, stage: str) -> int:
    return sum((folder / "done").exists() for folder in published(out, stage))


def soup_staging(out: Path) -> list[Path]:
    return list(out.glob(".soup.*.partial"))


def finished_runs(out: Path) -> dict[str, tuple[int, int]]:
    """Each finished run folder -> (inode, mtime_ns) of its done marker: unchanged iff the run was reused."""
    return {
        folder.name: ((folder / "done").stat().st_ino, (folder / "done").stat().st_mtime_ns)
        for folder in published(out, "runs")
        if (folder / "done").exists()
    }


def accuracies(results: Results) -> dict:
    keep = ("val_accuracy", "val_accuracy_per_domain", "test_accuracy", "members")
    sections = {"soup": results.soup, "ensemble": results.ensemble, **results.averages}
    return {
        "sections": {
            name: {k: v for k, v in dataclasses.asdict(row).items() if k in keep} for name, row in sections.items()
        },
        "runs": [(run.index, run.best_step, run.val_accuracy, run.test_accuracy) for run in results.runs],
        "summary": results.summary,
        "greedy_order": results.greedy_order,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> SimpleNamespace:
    """One uninterrupted run (folder A)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "A"
    result = run_to_completion(world, out)
    return SimpleNamespace(
        out=out,
        stdout=result.stdout,
        weights=sha256(out / "soup" / "model.safetensors"),
        results=Results.load(out / "soup" / "results.json"),
    )


def test_kill_9_at_any_stage_then_rerun_gives_the_same_soup(world, reference, tmp_path):
    out = tmp_path / "B"
    rng = random.Random(5)
    kill_points = [
        ("while loading and checking the target data", lambda p: p.saw("[data]"), 0.0, (0, 0)),
        ("during the linear probe", lambda p: p.saw("[train] linear probe on"), rng.uniform(0.02, 0.15), (0, 0)),
        (
            "during run 1",
            lambda p: done_count(out, "lp") == 1 and p.saw("[train] run 0 of 3 from"),
            rng.uniform(0.02, 0.15),
            (1, 0),
        ),
        ("right after run 1's done", lambda p: done_count(out, "runs") >= 1, 0.0, (1, 1)),
        ("during a later run", lambda p: p.saw("[train] run 2 of 3 from"), rng.uniform(0.02, 0.15), (1, 2)),
        (
            "while the merge evaluates subsets",
            lambda p: p.saw("[merge] averaging runs"),
            rng.uniform(0.0, 0.05),
            (1, 3),
        ),
        ("while staging the soup", lambda p: bool(soup_staging(out)), 0.0, (1, 3)),
    ]
    for name, condition, delay, (lp_done, runs_done) in kill_points:
        before = finished_runs(out)
        process = Watched(world, out)
        process.kill_when(lambda condition=condition, process=process: condition(process), delay=delay)
        assert done_count(out, "lp") == lp_done and done_count(out, "runs") == runs_done, name
        assert finished_runs(out).items() >= before.items(), f"{name}: a finished run was redone"
        assert not (out / "soup").exists(), f"{name}: a soup appeared before the merge finished"
        for folder in [*published(out, "lp"), *published(out, "runs")]:  # a published folder is always whole
            assert (folder / "done").exists(), f"{name}: {folder} has no done marker"

    before = finished_runs(out)
    assert len(before) == 3
    result = run_to_completion(world, out)
    assert finished_runs(out) == before  # every finished run reused, not rewritten
    assert sum("done earlier" in line and "reused" in line for line in result.stderr.splitlines()) == 3
    assert "[train] linear probe on" not in result.stderr

    assert sha256(out / "soup" / "model.safetensors") == reference.weights
    results = Results.load(out / "soup" / "results.json")
    assert accuracies(results) == accuracies(reference.results)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp")), "staging left behind"

    # Killed while staging a new soup over a finished one (--method is a reusable change): the soup stays.
    soup = {p.name: p.read_bytes() for p in (out / "soup").iterdir()}
    process = Watched(world, out, extra=["--method", "greedy"])
    process.kill_when(lambda: bool(soup_staging(out)))
    assert {p.name: p.read_bytes() for p in (out / "soup").iterdir()} == soup


def saved_progress(out: Path) -> dict[str, int]:
    """Each run whose staging folder holds saved progress (by its key) -> the step it was saved at."""
    steps = {}
    for file in (out / "runs").glob(f".*.partial/{PROGRESS}"):
        try:
            with safe_open(file, "pt") as saved:
                steps[file.parent.name[1:].split(".")[0]] = json.loads(saved.metadata()[HEADER])["step"]
        except (OSError, SafetensorError):  # its staging folder was renamed into place meanwhile
            continue
    return steps


def run_files(out: Path, key: str) -> dict[str, object]:
    """What a finished run holds, with the seconds it took left out of its metrics."""
    folder = out / "runs" / key
    metrics = json.loads((folder / "metrics.json").read_text())
    del metrics["seconds"]
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {**{k: v for k, v in files.items() if k != "metrics.json"}, "metrics": metrics}


def test_kill_9_mid_run_resumes_from_its_last_evaluation_to_the_same_bytes(world, reference, tmp_path):
    """Runs are killed between evaluations (run 0 once it saved its progress at step 10 of 60, then again
    after it resumed; then run 1, whose init is recycled, and run 2): each rerun resumes the killed run at
    the step it saved, and every run, the soup and the results equal an uninterrupted run's."""
    out = tmp_path / "resumed"
    Watched(world, out).kill_when(lambda: any(step >= 10 for step in saved_progress(out).values()))
    [(run0, first_step)] = saved_progress(out).items()
    assert done_count(out, "runs") == 0

    for later_kill in (
        lambda: saved_progress(out).get(run0, 0) > first_step,  # run 0 again, once it saved after resuming
        lambda: done_count(out, "runs") == 1 and len(saved_progress(out)) == 1,  # in run 1
        lambda: done_count(out, "runs") == 2 and len(saved_progress(out)) == 1,  # in run 2
    ):
        [step] = saved_progress(out).values()
        process = Watched(world, out)
        process.kill_when(later_kill)
        assert process.saw(f": resuming at step {step} of 60, from the progress it saved")
        assert len(saved_progress(out)) == 1, "killed before its run saved any progress"

    [step] = saved_progress(out).values()
    result = run_to_completion(world, out)
    assert f": resuming at step {step} of 60, from the progress it saved" in result.stderr
    assert done_count(out, "runs") == 3
    assert not list(out.rglob("*.partial")) and not list(out.rglob(PROGRESS)), "progress left behind"

    for run in published(reference.out, "runs"):
        assert run_files(out, run.name) == run_files(reference.out, run.name), f"run {run.name} differs"
    assert sha256(out / "soup" / "model.safetensors") == reference.weights
    assert accuracies(Results.load(out / "soup" / "results.json")) == accuracies(reference.results)


def test_a_rerun_whose_soup_is_done_prints_its_results_without_merging_or_evaluating(
    world, reference, tmp_path, capsys, monkeypatch
):
    """The soup is reused when the same command runs again; a change of method or BatchNorm policy rebuilds
    it (and changing back rebuilds it again); its `done` marker is beside the folder, never in it."""
    out = tmp_path / "again"
    shutil.copytree(reference.out, out, symlinks=True)
    builds, scored = [], []
    build_soup, score = assembly._write_soup, assembly.score_predictions

    def counted_build(staging, *inputs):
        builds.append(inputs[0].config.method)
        build_soup(staging, *inputs)

    monkeypatch.setattr(assembly, "score_predictions", lambda *a, **k: scored.append(1) or score(*a, **k))

    def recycle(*extra: str) -> list[str]:
        capsys.readouterr()
        assert cli.main(recycle_argv(world, out, extra)) == 0
        printed = capsys.readouterr()
        return printed.err.splitlines() + printed.out.splitlines()  # progress (stderr), then the table

    def table(lines: list[str]) -> list[str]:
        return lines[lines.index("") :]

    with replaced_builder(SoupFolder, counted_build):
        built = recycle()  # a copy names another output (results.json records it): another soup
        assert builds == ["uniform"] and scored
        soup_files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "soup").iterdir()}
        scored.clear()
        reused = recycle()
        assert builds == ["uniform"] and not scored  # nothing merged, nothing evaluated
        assert "[merge] the soup of these runs with this recipe is done: reused, nothing merged or evaluated" in reused
        assert table(reused) == table(built)
        explained = [line for line in built if line.startswith(("[merge] greedy kept", "[diagnose]"))]
        assert explained and [line for line in reused if line.startswith(("[merge] greedy", "[diagnose]"))] == explained
        assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "soup").iterdir()} == soup_files

        recycle("--method", "greedy")
        recycle("--method", "greedy")
        recycle("--method", "greedy", "--bn-policy", "reestimate")
        assert table(recycle()) == table(built)  # back to the first command: rebuilt, the same results
        assert builds == ["uniform", "greedy", "greedy", "uniform"]
    assert sha256(out / "soup" / "model.safetensors") == reference.weights
    assert ".soup.done" not in {p.name for p in (out / "soup").iterdir()} and (out / ".soup.done").is_file()


def test_a_second_recycle_on_a_folder_in_use_trains_only_what_is_unclaimed(world, reference, tmp_path):
    """The first process is frozen while it trains run 1: the second trains runs 2 and 3, says it waits
    for run 1, and once the first resumes both finish with every run trained once and the same soup."""
    out = tmp_path / "busy"
    first, second = Watched(world, out), None
    try:
        deadline = time.monotonic() + TIMEOUT
        while not first.saw("[train] run 0 of 3 from"):  # run 1 claimed
            assert first.process.poll() is None and time.monotonic() < deadline, first.lines
            time.sleep(0.002)
        first.process.send_signal(signal.SIGSTOP)  # frozen while holding run 1's claim
        second = Watched(world, out)
        while not second.saw("run 0 of 3: claimed by another process; waiting for it"):
            assert second.process.poll() is None and time.monotonic() < deadline, second.lines
            time.sleep(0.01)
        assert first.process.poll() is None, "the first process ended before the second one was tried"
        first.process.send_signal(signal.SIGCONT)
        assert first.process.wait(timeout=TIMEOUT) == 0
        assert second.process.wait(timeout=TIMEOUT) == 0
    finally:
        for watched in (first, second):
            if watched is not None and watched.process.poll() is None:
                watched.process.kill()
    first._reader.join(timeout=10)
    second._reader.join(timeout=10)
    for run in (0, 1, 2):
        trained_by = [w for w in (first, second) if w.saw(f"[train] run {run} of 3 from")]
        assert len(trained_by) == 1, f"run {run} trained by {len(trained_by)} processes"
    assert second.saw("[train] run 1 of 3 from") and second.saw("[train] run 2 of 3 from")
    assert sha256(out / "soup" / "model.safetensors") == reference.weights


def test_disk_full_while_writing_the_soup_keeps_the_previous_soup(world, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    shutil.copytree(reference.out, out, symlinks=True)
    previous = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "soup").rglob("*") if p.is_file()}
    assert "model.safetensors" in {Path(k).name for k in previous}

    real_write = merge_engine._stream_merged_tensors
    writes = {"n": 0}

    def disk_full(sink, *args, **kwargs):
        class Full:
            def write(self, data):
                writes["n"] += 1
                if writes["n"] > 2:  # a header and a tensor land, then the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return sink.write(data)

        return real_write(Full(), *args, **kwargs)

    monkeypatch.setattr(merge_engine, "_stream_merged_tensors", disk_full)
    code = cli.main(recycle_argv(world, out))
    stderr = capsys.readouterr().err
    assert code == 2
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == stderr.splitlines()[-1:]
    assert stderr.splitlines()[-1] == f"error: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
    assert writes["n"] > 2
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "soup").rglob("*") if p.is_file()}
    assert after == previous  # the previous soup, byte for byte
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp", ".old"))]
    assert not leftovers, leftovers


def test_a_rerun_clears_what_a_killed_writer_left(tmp_path):
    """Staging folders and temp files go; a folder retired just before its replacement landed comes back."""
    from ratatouille_hub.io import sweep_staging

    out = tmp_path / "out"
    (out / ".soup.old").mkdir(parents=True)  # killed between the two renames of staged_folder
    (out / ".soup.old" / "model.safetensors").write_bytes(b"previous soup")
    (out / ".soup.1234abcd.partial").mkdir()
    (out / ".soup.1234abcd.partial" / "model.safetensors").write_bytes(b"half")
    (out / ".recipe.yaml.x1.tmp").write_text("half")
    (out / ".soup.lock").touch()
    (out / "runs" / "abc").mkdir(parents=True)
    (out / "runs" / ".abc.old").mkdir()
    sweep_staging(out)
    sweep_staging(out / "runs")
    assert sorted(p.name for p in out.iterdir()) == [".soup.lock", "runs", "soup"]
    assert (out / "soup" / "model.safetensors").read_bytes() == b"previous soup"
    assert [p.name for p in (out / "runs").iterdir()] == ["abc"]


# -- kill -9 while talking to the Hub: during a download, during a push ------------------------------


def _hub_process(argv: list[str], home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(ENTRY_POINT), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**ENV, "HF_HOME": str(home)},
    )


def _kill_once_answered(local_hub, process: subprocess.Popen, path_part: str, status: int) -> None:
    """SIGKILL `process` as soon as the local Hub has answered `status` to a request on `path_part`
    (the client is then waiting to retry: mid-download or mid-push)."""
    deadline = time.monotonic() + TIMEOUT
    while not any(r.status == status and path_part in r.path for r in local_hub.requests):
        assert process.poll() is None, "finished before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_kill_9_during_a_download_and_during_a_push_then_rerun(
    world, local_hub, new_hub_namespace, tmp_path, one_torch_thread
):
    """The kills land on the Hub's answers, not on training: the recipe is the smallest that trains. The
    reference and the push's rerun run in-process (one thread, as the processes); the killed commands and
    the rerun that resumes the killed one's cache are processes."""
    namespace = new_hub_namespace()
    base, aux = f"{namespace}/base", f"{namespace}/aux"
    local_hub.seed_model(base, world.base)
    local_hub.seed_model(aux, world.aux[0])
    argv = ["recycle", "--base", base, "--aux", aux, "--target", str(world.target), "--runs", "2", "--steps", "4"]
    argv += ["--eval-every", "2", "--lp-steps", "5", "--warmup-steps", "2", "--batch-size", "2", "--image-size", "16"]

    reference = tmp_path / "reference"
    assert cli.main([*argv, "--output", str(reference)]) == 0

    # During a download: the aux weights answer 429 (the client backs off, then retries); kill it there.
    out, home = tmp_path / "killed", tmp_path / "home-killed"
    local_hub.inject_failures(f"^/{aux}/resolve/.*model.safetensors$", [429], method="GET")
    _kill_once_answered(local_hub, _hub_process([*argv, "--output", str(out)], home), f"/{aux}/resolve/", 429)
    assert not (out / "soup").exists()
    assert _hub_process([*argv, "--output", str(out)], home).wait(timeout=TIMEOUT) == 0
    assert sha256(out / "soup" / "model.safetensors") == sha256(reference / "soup" / "model.safetensors")

    # During a push: the commit answers 503 (push_folder waits, then retries the whole push); kill it there.
    soup_id = f"{namespace}/soup"
    local_hub.inject_failures(f"^/api/models/{soup_id}/commit/", [503])
    _kill_once_answered(local_hub, _hub_process(["push", soup_id, str(out / "soup")], home), f"/{soup_id}/commit/", 503)
    assert cli.main(["push", soup_id, str(out / "soup")]) == 0
    repo = local_hub.store.get_repo("model", soup_id)
    assert len(list(repo.history(repo.resolve("main")))) == 2  # "initial commit" + exactly one upload
