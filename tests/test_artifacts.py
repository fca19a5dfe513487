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


def test_a_soup_is_rebuilt_every_time_and_holds_no_done_marker(tmp_path):
    def soup(staging: Path, weights: bytes) -> None:
        (staging / "model.safetensors").write_bytes(weights)

    with replaced_builder(SoupFolder, soup):
        materialize(SoupFolder, tmp_path / "soup", b"one")
        materialize(SoupFolder, tmp_path / "soup", b"two")
    assert entries(tmp_path / "soup") == ["model.safetensors"]
    assert (tmp_path / "soup" / "model.safetensors").read_bytes() == b"two"
