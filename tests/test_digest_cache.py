"""A local input's sha256 is remembered by its stat (hashing.remembered_sha256), and never outlives a change."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from ratatouille_hub import hashing

OLD = time.time_ns() - 3600 * 10**9  # an hour ago: outside the racy window


@pytest.fixture()
def weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01" * 4096)
    os.utime(path, ns=(OLD, OLD))
    return path


def refuse_to_hash(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(hashing, "file_sha256", fail)


def test_a_digest_is_remembered_and_not_computed_again(weights, monkeypatch):
    expected = hashlib.sha256(b"\x01" * 4096).hexdigest()
    assert hashing.remembered_sha256(weights) == expected
    refuse_to_hash(monkeypatch)
    assert hashing.remembered_sha256(weights) == expected


def test_an_edit_of_the_same_size_with_its_times_set_back_is_hashed_again(weights):
    hashing.remembered_sha256(weights)
    weights.write_bytes(b"\x02" * 4096)
    os.utime(weights, ns=(OLD, OLD))  # the change time still moves: nobody can set it back
    assert hashing.remembered_sha256(weights) == hashlib.sha256(b"\x02" * 4096).hexdigest()


def test_a_file_changed_within_the_racy_window_is_not_remembered(weights, monkeypatch):
    os.utime(weights, None)  # modified just now
    hashing.remembered_sha256(weights)
    refuse_to_hash(monkeypatch)
    with pytest.raises(AssertionError, match="hashed again"):
        hashing.remembered_sha256(weights)


def test_a_damaged_entry_is_ignored_and_a_copy_elsewhere_is_its_own_file(weights, tmp_path):
    hashing.remembered_sha256(weights)
    (entry,) = (tmp_path / "hf-home" / "ratatouille-hub" / "sha256").iterdir()
    entry.write_text("not a digest\n")
    assert hashing.remembered_sha256(weights) == hashlib.sha256(b"\x01" * 4096).hexdigest()
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(b"\x03" * 4096)
    os.utime(copy, ns=(OLD, OLD))
    assert hashing.remembered_sha256(copy) == hashlib.sha256(b"\x03" * 4096).hexdigest()
