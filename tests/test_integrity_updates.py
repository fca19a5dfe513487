"""No update is lost (issue 19, cause 6): two `update SOUP --add` racing on one local soup both land; an update
of a Hub soup commits only on top of the revision it read, and reads the soup again when another commit
landed first; an update is reported only once it landed. Races are made certain: the first updater is held
after it has read the soup until the other one has read it too or waits for its lock; on the Hub, another
commit lands between the read and the push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import refusals
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError
from safetensors.torch import load_file

from ratatouille_hub import cli, community
from ratatouille_hub.card import grown_soup_card
from ratatouille_hub.merge_engine import read_safetensors_metadata
from ratatouille_hub.provenance import INGREDIENTS_KEY, SoupRecord, file_sha256
from ratatouille_hub.publish import HubError
from ratatouille_hub.testing import perturbed_backbone, save_tiny_checkpoint, tiny_processor, tiny_resnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALICE = ["--token", "tok-alice"]  # conftest.CONTRIBUTORS: alice writes only into alice/...
WAIT_S = 300  # a bound on each wait for the other process, so that a broken hook fails instead of hanging
# `ratatouille-hub update ...` (cli.main) in a process of its own, with two hooks: it signals (the file
# SIGNALS/NAME-EVENT) when it is about to wait for the soup's lock ("at-lock") and when it has read the soup
# ("read": record and weights, just before the new mean); with PAUSE it then waits for SIGNALS/go.
HOOKED_UPDATE = f"""
import sys, time
from pathlib import Path

import filelock

from ratatouille_hub import cli, updating

signals, name, pause = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "pause"
acquire, incremental_mean = filelock.FileLock.acquire, updating.incremental_mean


def hooked_acquire(self, *args, **kwargs):
    if Path(self.lock_file).name == ".soup.lock":
        (signals / f"{{name}}-at-lock").touch()
    return acquire(self, *args, **kwargs)


def hooked_mean(*args, **kwargs):
    (signals / f"{{name}}-read").touch()
    deadline = time.monotonic() + {WAIT_S}
    while pause and not (signals / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return incremental_mean(*args, **kwargs)


filelock.FileLock.acquire, updating.incremental_mean = hooked_acquire, hooked_mean
sys.exit(cli.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Four fine-tunes of one tiny ResNet with the same labels (backbone, head and BatchNorm statistics
    perturbed), single-file runs as an update reads them."""
    root = tmp_path_factory.mktemp("update-runs")
    base = tiny_resnet(0, names=["a", "b", "c"])
    folders = []
    for k in range(4):
        model = tiny_resnet(0, names=["a", "b", "c"])
        model.load_state_dict(perturbed_backbone(base.state_dict(), 700 + k, integer_value=100 + k, head=True))
        folders.append(save_tiny_checkpoint(root / f"run{k}", model, processor=tiny_processor(16)))
    return folders


def ingredients(weights: Path) -> list[str]:
    return [entry["sha256"] for entry in json.loads(read_safetensors_metadata(weights)[INGREDIENTS_KEY])]


def is_the_mean_of(weights: Path, folders: list[Path]) -> None:
    """The soup records exactly `folders`, in order, and is their uniform mean (integer tensors: the first's)."""
    assert ingredients(weights) == [file_sha256(f / "model.safetensors") for f in folders]
    soup, members = load_file(weights), [load_file(f / "model.safetensors") for f in folders]
    for name, tensor in soup.items():
        if tensor.is_floating_point():
            mean = torch.stack([m[name].double() for m in members]).mean(0).float()
            assert torch.allclose(tensor, mean, rtol=0, atol=1e-6), name
        else:
            assert torch.equal(tensor, members[0][name]), name


def soup_of(runs: list[Path], folder: Path) -> Path:
    assert cli.main(["merge", *map(str, runs), "--output", str(folder)]) == 0
    return folder


def hooked_update(signals: Path, name: str, pause: bool, soup: Path, run: Path) -> subprocess.Popen:
    """`update SOUP --add RUN` in its own process, with the hooks of HOOKED_UPDATE."""
    hooks = [str(signals), name, "pause" if pause else "run"]
    argv = [sys.executable, "-c", HOOKED_UPDATE, *hooks, "update", str(soup), "--add", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_signal(signals: Path, names: list[str], process: subprocess.Popen) -> None:
    """Until one of `names` appears; fails if `process` ends before signalling."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if any((signals / name).exists() for name in names):
            return
        if process.poll() is not None:
            pytest.fail(f"the updater ended (exit {process.returncode}) before {names}: {process.stdout.read()}")
        time.sleep(0.05)
    pytest.fail(f"no {names} after {WAIT_S} s")


def test_two_updates_of_one_local_soup_at_once_both_land(runs, tmp_path):
    soup = soup_of(runs[:2], tmp_path / "soup")
    signals = tmp_path / "signals"
    signals.mkdir()
    first = hooked_update(signals, "first", True, soup, runs[2])
    wait_for_signal(signals, ["first-read"], first)  # the first has read the soup (2 runs) and is paused
    second = hooked_update(signals, "second", False, soup, runs[3])
    # the second has read the same soup (before the fix), or waits for the soup's lock the first holds
    wait_for_signal(signals, ["second-read", "second-at-lock"], second)
    (signals / "go").touch()
    outputs = [process.communicate(timeout=WAIT_S)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    is_the_mean_of(soup / "model.safetensors", runs)  # the second started from the soup the first wrote
    assert f"[update] {soup}: 3 ingredients (+1 -0), written to {soup}" in outputs[0]
    assert f"[update] {soup}: 4 ingredients (+1 -0), written to {soup}" in outputs[1]


def hub_soup(runs: list[Path], repo_id: str, tmp_path: Path) -> Path:
    """A soup of `runs` pushed to `repo_id`; returns the local folder it was pushed from."""
    folder = soup_of(runs, tmp_path / "soup")
    record = SoupRecord.from_metadata(read_safetensors_metadata(folder / "model.safetensors"), str(folder))
    grown_soup_card(record).save(folder / "README.md")  # the card a published soup has (merge writes none)
    assert cli.main(["push", repo_id, str(folder), *ALICE]) == 0
    return folder


def hub_weights(repo_id: str, branch: str = "main") -> Path:
    return Path(
        hf_hub_download(repo_id, "model.safetensors", revision=HfApi().model_info(repo_id, revision=branch).sha)
    )


def test_a_hub_update_that_another_commit_overtook_reads_the_soup_again(runs, local_hub, tmp_path, monkeypatch, capsys):
    repo_id = "alice/update-overtaken-soup"
    hub_soup(runs[:2], repo_id, tmp_path)
    read = HfApi().model_info(repo_id).sha
    push = community.push_folder
    heads = []  # what each push left as the soup's head

    def overtaken_once(*args, **kwargs):
        """The first push is overtaken: another update (of run 3) lands after this one read the soup."""
        if not heads:
            heads.append(read)
            assert cli.main(["update", repo_id, "--add", str(runs[3]), *ALICE]) == 0
        result = push(*args, **kwargs)
        heads.append(result.oid)
        return result

    monkeypatch.setattr(community, "push_folder", overtaken_once)
    capsys.readouterr()
    start = len(local_hub.requests)
    assert cli.main(["update", repo_id, "--add", str(runs[2]), *ALICE]) == 0
    captured = capsys.readouterr()
    printed = [line for line in captured.out.splitlines() if line.startswith("[update]")]  # the results
    commits = [r.status for r in local_hub.requests[start:] if r.route == "_commit"]
    assert commits == [200, 412, 200]  # the other update's, this one's on top of `read`, and its retry
    assert heads[2] == HfApi().model_info(repo_id).sha
    assert printed == [
        f"[update] {repo_id}: 3 ingredients (+1 -0), pushed as commit {heads[1]} on main "
        f"({local_hub.url}/{repo_id}/commit/{heads[1]})",
        f"[update] {repo_id}: 4 ingredients (+1 -0), pushed as commit {heads[2]} on main "
        f"({local_hub.url}/{repo_id}/commit/{heads[2]})",
    ]
    assert [line for line in captured.err.splitlines() if line.startswith("[update]")] == [  # progress
        f"[update] {repo_id} moved on since revision {read} was read: updating its new head"
    ]
    is_the_mean_of(hub_weights(repo_id), [runs[0], runs[1], runs[3], runs[2]])


def test_a_hub_update_overtaken_every_time_gives_up_and_then_lands(runs, local_hub, tmp_path, monkeypatch, capsys):
    repo_id = "alice/update-busy-soup"
    folder = hub_soup(runs[:2], repo_id, tmp_path)
    weights = file_sha256(hub_weights(repo_id))
    push = community.push_folder
    notes = []

    def overtaken_always(*args, **kwargs):
        """Another commit lands before every push of this update."""
        notes.append(f"notes/{len(notes)}.txt")
        HfApi(token="tok-alice").upload_file(path_or_fileobj=b"busy", path_in_repo=notes[-1], repo_id=repo_id)
        return push(*args, **kwargs)

    monkeypatch.setattr(community, "push_folder", overtaken_always)
    argv = ["update", repo_id, "--add", str(runs[2]), *ALICE]
    what = "a Hub soup's update overtaken by other commits 3 times"
    line = refusals.fails_cleanly("update-hub-overtaken", what, argv, repo_id, folder, capsys, {}, watch=tmp_path)
    assert line == (
        f"error: update of {repo_id} failed: another update landed first 3 times in a row; run the command again"
    )
    assert len(notes) == 3 and file_sha256(hub_weights(repo_id)) == weights  # the soup itself is unchanged

    monkeypatch.setattr(community, "push_folder", push)  # nobody else commits now: the same command lands
    assert cli.main(argv) == 0
    is_the_mean_of(hub_weights(repo_id), runs[:3])


class Recorded:
    """capsys for refusals.fails_cleanly, keeping what the command printed to stdout as well."""

    def __init__(self, capsys):
        self.capsys, self.out = capsys, ""

    def readouterr(self):
        captured = self.capsys.readouterr()
        self.out = captured.out
        return captured


def test_a_refused_hub_push_reports_no_update(runs, local_hub, tmp_path, capsys):
    repo_id = "alice/update-forbidden-soup"
    folder = hub_soup(runs[:2], repo_id, tmp_path)
    head = HfApi().model_info(repo_id).sha
    argv = ["update", repo_id, "--add", str(runs[2]), "--token", "tok-bob"]  # bob may not write as alice
    recorded = Recorded(capsys)
    capsys.readouterr()
    what = "a Hub soup's update pushed with another user's token"
    line = refusals.fails_cleanly("update-hub-forbidden", what, argv, repo_id, folder, recorded, {}, watch=tmp_path)
    assert (
        line == f"error: push to {repo_id} failed: forbidden (403) — the token cannot write to alice: use a write token"
    )
    assert recorded.out == ""  # nothing that reads as an update, nor anything else
    assert HfApi().model_info(repo_id).sha == head

    assert cli.main([*argv[:-2], *ALICE]) == 0  # with the owner's token, the same update lands
    assert HfApi().model_info(repo_id).sha != head
    is_the_mean_of(hub_weights(repo_id), runs[:3])


def test_a_hub_update_on_a_branch_reads_that_branch_and_pushes_back_to_it(runs, local_hub, tmp_path, capsys):
    repo_id = "alice/update-branch-soup"
    folder = hub_soup(runs[:2], repo_id, tmp_path)
    api = HfApi(token="tok-alice")
    api.create_branch(repo_id, branch="v2")
    main = api.model_info(repo_id).sha
    assert cli.main(["update", repo_id, "--add", str(runs[2]), "--revision", "v2", *ALICE]) == 0
    head = api.model_info(repo_id, revision="v2").sha
    assert f"pushed as commit {head} on v2" in capsys.readouterr().out
    is_the_mean_of(hub_weights(repo_id, "v2"), runs[:3])
    assert cli.main(["update", repo_id, "--add", str(runs[3]), "--revision", "v2", *ALICE]) == 0  # reads v2
    is_the_mean_of(hub_weights(repo_id, "v2"), runs[:4])
    grown = api.model_info(repo_id, revision="v2").sha
    assert api.model_info(repo_id).sha == main  # main untouched by both
    is_the_mean_of(hub_weights(repo_id), runs[:2])

    argv = ["update", repo_id, "--add", str(runs[2]), "--revision", "v3", *ALICE]
    what = "a Hub soup's update on a branch it does not have"
    line = refusals.fails_cleanly("update-hub-no-branch", what, argv, repo_id, folder, capsys, {}, watch=tmp_path)
    assert line == f"error: {repo_id}: no revision 'v3' on the Hub"
    with pytest.raises(RevisionNotFoundError):  # no branch made by the refused update
        api.model_info(repo_id, revision="v3")
    assert (api.model_info(repo_id).sha, api.model_info(repo_id, revision="v2").sha) == (main, grown)

    with pytest.raises(HubError):  # a push on top of a commit it read never makes its branch (gone meanwhile)
        community.push_folder(folder, repo_id, revision="gone", parent_commit=main, token="tok-alice")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="gone")

    argv = ["update", repo_id, "--add", str(runs[2]), "--revision", "a" * 40, *ALICE]
    what = "a Hub soup's update given a commit where its branch goes"
    line = refusals.fails_cleanly("update-hub-revision-commit", what, argv, "--revision", folder, capsys, {})
    assert line == f"error: --revision '{'a' * 40}': a branch name is needed (the update is pushed back to it)"
    assert (api.model_info(repo_id).sha, api.model_info(repo_id, revision="v2").sha) == (main, grown)

    argv = ["update", str(folder), "--add", str(runs[2]), "--revision", "v2"]
    what = "an update of a soup folder given a branch"
    line = refusals.fails_cleanly("update-folder-revision", what, argv, str(folder), folder, capsys, {})
    assert line == f"error: --revision v2: names a branch of a Hub soup, and {folder} is a folder"
