"""Issue #10: the runs of one recipe spread over processes (accelerate launch) and scheduler tasks
(`plan`, `run --index`, `assemble`), with the soup byte-identical to one process's and each run trained by
exactly one process, including after a rank is killed. Every process runs with one OpenMP thread, so
runs are bit-reproducible wherever they train."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_crash_safety import ENV, TIMEOUT, Watched, finished_runs, recycle_argv, sha256

from ratatouille_hub import cli
from ratatouille_hub.results import Results

BIN = Path(sys.executable).parent
ACCELERATE = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
ACCELERATE += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "ratatouille_hub"]
CLI = [sys.executable, "-m", "ratatouille_hub"]


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@pytest.fixture(scope="module")
def sequential(world, tmp_path_factory):
    """The recipe of test_crash_safety in one process: the soup every other way must reproduce."""
    out = tmp_path_factory.mktemp("sequential") / "out"
    done = subprocess.run([*CLI, *recycle_argv(world, out)], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def trainers(lines: list[str]) -> dict[int, list[str]]:
    """Run number -> the ranks whose log says they started training it."""
    started: dict[int, list[str]] = {}
    for line in lines:
        found = re.match(r"(?:\[(rank \d/\d)\] )?\[train\] run (\d+) of \d+ from ", line)
        if found:
            started.setdefault(int(found[2]), []).append(found[1] or "alone")
    return started


def test_accelerate_launch_on_two_processes_gives_the_sequential_soup(world, sequential, tmp_path):
    out = tmp_path / "launched"
    done = subprocess.run(
        [*ACCELERATE, *recycle_argv(world, out)], capture_output=True, text=True, env=ENV, timeout=2 * TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    progress = done.stderr.splitlines()
    started = trainers(progress)
    assert sorted(started) == [0, 1, 2] and all(len(ranks) == 1 for ranks in started.values()), started
    assert {rank for ranks in started.values() for rank in ranks} <= {"rank 0/2", "rank 1/2"}
    assert sum(line.startswith("soup: ") for line in done.stdout.splitlines()) == 1  # the tables print once
    assert sum("linear probe on the frozen base" in line for line in progress) == 1
    assert sha256(out / "soup" / "model.safetensors") == sha256(sequential / "soup" / "model.safetensors")
    assert Results.load(out / "soup" / "results.json").runs == Results.load(sequential / "soup" / "results.json").runs


def ranks_working_on(out: Path) -> dict[str, int]:
    """RANK -> pid of the launched processes working on `out` (read from /proc: no extra package; the
    launcher starts each rank in a session of its own, so they are found by their command line)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            if str(out).encode() not in arguments:
                continue
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if "RANK" in environ:
            ranks[environ["RANK"]] = int(entry.name)
    return ranks


def test_a_rank_killed_mid_run_then_a_relaunch_trains_the_rest_once(world, sequential, tmp_path):
    out = tmp_path / "killed"
    launch = Watched(world, out, argv=[*ACCELERATE, *recycle_argv(world, out)])
    try:
        deadline = time.monotonic() + 2 * TIMEOUT

        def wait_for(text: str) -> None:
            while not launch.saw(text):
                assert launch.process.poll() is None and time.monotonic() < deadline, launch.lines
                time.sleep(0.002)

        wait_for("[rank 0/2] [train] run 0 of 3 from")
        ranks = ranks_working_on(out)
        os.kill(ranks["0"], signal.SIGSTOP)  # rank 0 frozen in run 1, so rank 1 surely trains run 2
        wait_for("[rank 1/2] [train] run 1 of 3 from")
        os.kill(ranks["1"], signal.SIGKILL)  # rank 1 dies mid-run
        os.kill(ranks["0"], signal.SIGCONT)
        assert launch.process.wait(timeout=TIMEOUT) != 0  # the launcher stops the job
    finally:
        for pid in [launch.process.pid, *ranks_working_on(out).values()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    before = finished_runs(out)
    assert len(before) < 3
    relaunch = subprocess.run(
        [*ACCELERATE, *recycle_argv(world, out)], capture_output=True, text=True, env=ENV, timeout=2 * TIMEOUT
    )
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    after = finished_runs(out)
    assert len(after) == 3 and all(after[name] == marker for name, marker in before.items())  # reused, not redone
    retrained = trainers(relaunch.stderr.splitlines())
    assert len(retrained) == 3 - len(before) and all(len(ranks) == 1 for ranks in retrained.values())
    assert sha256(out / "soup" / "model.safetensors") == sha256(sequential / "soup" / "model.safetensors")


def test_plan_then_run_every_index_two_at_a_time_then_assemble_equals_recycle(
    world, sequential, tmp_path, capsys, one_torch_thread
):
    """The run tasks are processes, two at a time (what the test is about); plan and assemble run in-process,
    on one thread as the processes do."""
    out = tmp_path / "scheduled"
    argv = recycle_argv(world, out)
    assert cli.main(["plan", *argv[1:]]) == 0
    assert f"saved the plan of 3 runs in {out / 'plan.json'}" in capsys.readouterr().out
    assert not (out / "runs").exists()  # planned, nothing trained
    assert cli.main(["run", str(out), "--index", "3"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --index 3: the plan in {out} has runs 0 to 2"]

    assert cli.main(["assemble", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: 3 of 3 runs in {out} are not done (indices: 0, 1, 2); "
        f"train them with: ratatouille-hub run {out} --index I"
    ]

    def run(index: int) -> subprocess.Popen:
        return subprocess.Popen(
            [*CLI, "run", str(out), "--index", str(index)], stderr=subprocess.PIPE, text=True, env=ENV
        )

    for batch in ([0, 1], [2, 1]):  # two at a time; index 1 again while (or after) it is trained: idempotent
        tasks = [run(i) for i in batch]
        outputs = [task.communicate(timeout=TIMEOUT)[1] for task in tasks]  # their progress
        assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "done earlier" in outputs[1] or "claimed by another process" in outputs[1]
    assert len(finished_runs(out)) == 3
    assert cli.main(["assemble", str(out)]) == 0
    assert sha256(out / "soup" / "model.safetensors") == sha256(sequential / "soup" / "model.safetensors")
    assert (out / "soup" / "results.json").read_text() == (sequential / "soup" / "results.json").read_text().replace(
        str(sequential), str(out)
    )


def test_accelerate_launch_makes_each_intertrain_run_once_as_one_process_makes_it(world, tmp_path, one_torch_thread):
    argv = ["intertrain", "--base", str(world.base), "--dataset", str(world.target), "--runs", "3", "--steps", "2"]
    argv += ["--batch-size", "4", "--image-size", "16"]
    assert cli.main([*argv, "--output", str(tmp_path / "alone")]) == 0  # in-process, on one thread as the ranks
    launched = subprocess.run(
        [*ACCELERATE, *argv, "--output", str(tmp_path / "launched")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=2 * TIMEOUT,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    started: dict[int, list[str]] = {}
    for line in launched.stderr.splitlines():
        found = re.match(r"\[(rank \d/\d)\] \[train\] intertrain run (\d+) of 3 on ", line)
        if found:
            started.setdefault(int(found[2]), []).append(found[1])
    assert sorted(started) == [0, 1, 2] and all(len(ranks) == 1 for ranks in started.values()), started
    assert (
        sum(line.startswith("fine-tune ") for line in launched.stdout.splitlines()) == 3
    )  # the main rank reports them
    runs = {name: sorted((tmp_path / name / "runs").glob("[!.]*")) for name in ("alone", "launched")}
    assert [f.name for f in runs["launched"]] == [f.name for f in runs["alone"]] and len(runs["alone"]) == 3
    for mine, reference in zip(runs["launched"], runs["alone"]):
        assert sha256(mine / "model.safetensors") == sha256(reference / "model.safetensors")


def test_a_line_reaches_a_shared_stdout_in_one_write(monkeypatch):
    """Ranks share one stdout, unbuffered under PYTHONUNBUFFERED: a line written in two pieces (print writes its
    text and its newline apart) let another rank's line land between them, gluing two lines into one."""
    from ratatouille_hub.safe_text import say

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    say("[rank 1/2] [train] intertrain run 1 of 3 on data\nsecond line")
    assert writes == ["[rank 1/2] [train] intertrain run 1 of 3 on data\nsecond line\n"]


def test_the_demo_helper_processes_train_the_planned_runs_with_the_sequential_bytes(world, sequential, tmp_path):
    """`ratatouille-hub demo` trains in helper processes of one thread each (ratatouille_hub.toy.demo.Helpers):
    a helper given the plans trains every run, bit for bit the one-process runs, and `recycle` reuses them."""
    from ratatouille_hub import cli
    from ratatouille_hub.recipe import plan_recipe, recycle
    from ratatouille_hub.toy.demo import helpers, one_thread

    out = tmp_path / "helped"
    config = cli.options_from_args(cli.build_parser().parse_args(recycle_argv(world, out)))
    said: list[str] = []
    with one_thread(), helpers(1, said.append) as work:
        work.share(plan_recipe(config, echo=said.append), said.append)
    # the helper has ended, so every run is done
    assert said[-1] == "[demo] 2 processes train the runs, one thread each"
    assert len(finished_runs(out)) == 3
    progress: list[str] = []
    recycle(config, echo=progress.append)
    assert not trainers(progress)  # this process trained nothing
    assert sum(line.endswith(", reused") for line in progress) == 3
    assert sha256(out / "soup" / "model.safetensors") == sha256(sequential / "soup" / "model.safetensors")


def test_a_demo_helper_ends_with_the_process_that_started_it(tmp_path):
    """A demo killed mid-way leaves no helper behind (the queue it waits on never closes by itself)."""
    ready = tmp_path / "ready"
    script = (
        "import functools, os, pathlib, sys, time\n"
        "from ratatouille_hub.toy.demo import Helpers\n"
        "if __name__ == '__main__':\n"
        "    helpers = Helpers(1)\n"
        f"    helpers.submit([functools.partial(pathlib.Path.touch, pathlib.Path({str(ready)!r}))])\n"
        f"    while not pathlib.Path({str(ready)!r}).exists():\n"
        "        time.sleep(0.05)\n"
        "    print(helpers.processes[0].pid, flush=True)\n"
        "    os._exit(0)  # as SIGKILL would: no atexit, nothing said to the helper\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    status = Path(f"/proc/{int(done.stdout)}/status")

    def running() -> bool:
        try:
            return "State:\tZ" not in status.read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while running():
        assert time.monotonic() < deadline, "the helper outlived its parent"
        time.sleep(0.1)
