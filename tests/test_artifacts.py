"""The one artifact protocol (artifacts.materialize): built once, whole or not at all, by one process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ratatouille_hub.artifacts import DONE, Artifact, SoupFolder, builds, materialize, replaced_builder


class Note(Artifact):
    """A kind of this test: one file of text."""

    NAME = "note.txt"

    def text(self) -> str:
        return (self.folder / self.NAME).read_text()


@builds(Note)
def write_note(staging: Path, text: str) -> None:
    (staging / Note.NAME).write_text(text)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_kind_is_built_once_then_reused_whole(tmp_path):
    note = materialize(Note, tmp_path / "a", "first")
    again = materialize(Note, tmp_path / "a", "second")
    assert note.text() == again.text() == "first"  # done: the second build never ran
    assert entries(tmp_path / "a") == [DONE, Note.NAME]
    assert entries(tmp_path) == [".a.lock", "a"]  # the claim, and nothing staged left over


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path):
    def fail(staging: Path, text: str) -> None:
        write_note(staging, text)
        raise RuntimeError("power cut")

    with replaced_builder(Note, fail), pytest.raises(RuntimeError, match="power cut"):
        materialize(Note, tmp_path / "a", "lost")
    assert entries(tmp_path) == [".a.lock"]
    assert materialize(Note, tmp_path / "a", "kept").text() == "kept"


def test_a_claimed_artifact_is_left_to_its_claimant_unless_waited_for(tmp_path):
    holder = textwrap.dedent(
        f"""
        import sys, time
        from ratatouille_hub.io import claimed_folder
        with claimed_folder({str(tmp_path / "a")!r}, wait=True):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        assert materialize(Note, tmp_path / "a", "mine", wait=False) is None
        assert not (tmp_path / "a").exists()
        process.stdin.write("\n")  # the claimant ends without building: a waiting process builds it
        process.stdin.flush()
        assert materialize(Note, tmp_path / "a", "mine").text() == "mine"
    finally:
        process.kill()
        process.wait()


def test_a_soup_is_reused_for_the_same_key_and_files_only_and_its_marker_stays_outside(tmp_path):
    builds = []

    def soup(staging: Path, weights: bytes) -> None:
        builds.append(weights)
        (staging / "model.safetensors").write_bytes(weights)

    folder = tmp_path / "soup"
    with replaced_builder(SoupFolder, soup):
        assert materialize(SoupFolder, folder, b"one", key="a").built
        assert not materialize(SoupFolder, folder, b"ignored", key="a").built  # the same key: reused
        assert builds == [b"one"]
        materialize(SoupFolder, folder, b"two", key="b")  # another key (method, policy, runs): rebuilt
        materialize(SoupFolder, folder, b"three", key="a")  # back to the first: rebuilt, not the old marker
        assert builds == [b"one", b"two", b"three"]
        (folder / "model.safetensors").write_bytes(b"edited in place")
        materialize(SoupFolder, folder, b"four", key="a")  # its files changed: another soup, rebuilt
        (folder / "NOTES.txt").write_text("mine")
        materialize(SoupFolder, folder, b"five", key="a")  # a file was added: rebuilt
        (folder.with_name(".soup.done")).write_text("{not json")
        materialize(SoupFolder, folder, b"six", key="a")  # a marker this tool did not write counts for nothing
        materialize(SoupFolder, folder, b"seven")  # no key: never reused
        materialize(SoupFolder, folder, b"eight")
    assert builds == [b"one", b"two", b"three", b"four", b"five", b"six", b"seven", b"eight"]
    assert entries(folder) == ["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == b"eight"
    assert entries(tmp_path) == [".soup.lock", "soup"]  # built without a key: no marker


def test_a_killed_build_that_saved_progress_is_resumed_from_it_and_the_progress_never_lands(tmp_path):
    """A builder that saves progress and is killed (SIGKILL) after it: the next build adopts its staging
    folder (a sweep keeps it), sees the progress and nothing else it wrote, and the finished folder holds no
    progress."""
    from ratatouille_hub.io import PROGRESS, sweep_staging

    killed = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from ratatouille_hub.artifacts import builds, materialize
        import test_artifacts

        @builds(test_artifacts.Note)
        def save_then_die(staging, text):
            (staging / {PROGRESS!r}).write_text("step 7")
            (staging / "half-written.txt").write_text("lost")
            os.kill(os.getpid(), signal.SIGKILL)

        materialize(test_artifacts.Note, {str(tmp_path / "a")!r}, "x")
        """
    )
    process = subprocess.run([sys.executable, "-c", killed], cwd=Path(__file__).parent, capture_output=True)
    assert process.returncode == -9, process.stderr
    [staging] = tmp_path.glob(".a.*.partial")
    sweep_staging(tmp_path)  # what every rerun does first: a dead writer's progress is kept
    assert staging.is_dir()

    seen = []

    def resume(staging: Path, text: str) -> None:
        seen.append((staging.name, entries(staging)))
        write_note(staging, text + " from " + (staging / PROGRESS).read_text())

    with replaced_builder(Note, resume):
        note = materialize(Note, tmp_path / "a", "resumed")
    assert seen == [(staging.name, [".writer.lock", PROGRESS])]  # adopted, with its progress alone
    assert note.text() == "resumed from step 7"
    assert entries(tmp_path / "a") == [DONE, Note.NAME]
    assert entries(tmp_path) == [".a.lock", "a"]


def test_a_build_that_fails_after_saving_progress_keeps_it_for_the_next(tmp_path):
    from ratatouille_hub.io import PROGRESS

    def fail(staging: Path, text: str) -> None:
        (staging / PROGRESS).write_text("step 3")
        raise KeyboardInterrupt

    with replaced_builder(Note, fail), pytest.raises(KeyboardInterrupt):
        materialize(Note, tmp_path / "a", "lost")
    with replaced_builder(Note, lambda staging, text: write_note(staging, (staging / PROGRESS).read_text())):
        assert materialize(Note, tmp_path / "a", "kept").text() == "step 3"
    assert entries(tmp_path) == [".a.lock", "a"]
