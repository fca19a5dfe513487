"""Pushing a soup folder through the local Hub with the unmodified clients: one commit, idempotent,
findable from its ingredients, and one clear line (never the token) when the Hub says no."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForImageClassification, ResNetForImageClassification

from ratatouille_hub import cli, publish, testing
from ratatouille_hub.card import build_card
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.publish import HubError, push_folder, soup_files
from ratatouille_hub.testing import two_run_soup_results

BASE, GOOD = "ratatouille-test/resnet-base", "ratatouille-test/resnet-good"
COMMIT_TITLE = "Upload Model Ratatouille soup (ratatouille-hub)"


def tiny_resnet(seed: int) -> ResNetForImageClassification:
    """The soup's model, in eval mode so its logits compare with what the Hub serves."""
    return testing.tiny_resnet(seed).eval()


def write_soup(folder: Path, model, **save_options) -> Path:
    """A soup folder as the recipe writes it: weights, configs, recipe.yaml, results.json, the rendered card."""
    model.save_pretrained(folder, **save_options)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ConvNextImageProcessor"}))
    config = RecipeConfig(base=BASE, target="flwrlabs/pacs", aux=(GOOD,), runs=2, steps=1, lp_steps=1)
    config.save_yaml(folder / "recipe.yaml")
    results = two_run_soup_results(config, BASE, GOOD)
    results.save(folder / "results.json")
    build_card(results).save(folder / "README.md")
    (folder / "notes.txt").write_text("not part of the published model")
    return folder


@pytest.fixture(scope="module")
def soup(tmp_path_factory) -> Path:
    return write_soup(tmp_path_factory.mktemp("soup"), tiny_resnet(200))


@pytest.fixture
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(publish, "RETRY_WAITS_S", (0.0, 0.0, 0.0))


def commit_titles(local_hub, repo_id: str, branch: str = "main") -> list[str]:
    repo = local_hub.store.get_repo("model", repo_id)
    return [commit.title for commit in repo.history(repo.resolve(branch))]


def test_push_round_trips_in_one_commit_and_is_findable_from_its_ingredients(local_hub, hub_namespace, soup):
    repo_id = f"{hub_namespace}/pacs-soup"
    pushed = push_folder(soup, repo_id)
    assert pushed.changed and pushed.revision == "main" and pushed.url.endswith(f"/{repo_id}/commit/{pushed.oid}")
    assert commit_titles(local_hub, repo_id) == [COMMIT_TITLE, "initial commit"]
    files = {s.rfilename for s in HfApi().model_info(repo_id).siblings}
    assert files == {
        ".gitattributes",
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "recipe.yaml",
        "results.json",
    }

    card = Path(hf_hub_download(repo_id, "README.md")).read_text()
    assert f'model="{repo_id}"' in card and "path/to/soup" not in card
    assert "path/to/soup" in (soup / "README.md").read_text()  # the local card is left as it was
    assert ModelCard(card).text.lstrip().startswith(f"# {repo_id}\n") and ModelCard(card).data.model_name == repo_id

    loaded = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, tiny_resnet(200)(pixel_values=pixels).logits)
    assert repo_id in {m.id for m in HfApi().list_models(filter=f"base_model:merge:{GOOD}")}

    again = push_folder(soup, repo_id)
    assert (again.changed, again.oid) == (False, pushed.oid)
    assert commit_titles(local_hub, repo_id) == [COMMIT_TITLE, "initial commit"]


def test_push_to_a_new_branch_leaves_main_alone(local_hub, hub_namespace, soup):
    repo_id = f"{hub_namespace}/soup"
    pushed = push_folder(soup, repo_id, revision="pacs-sketch", commit_message="Soup for sketch")
    assert commit_titles(local_hub, repo_id, "pacs-sketch") == ["Soup for sketch", "initial commit"]
    assert commit_titles(local_hub, repo_id) == ["initial commit"]
    assert HfApi().model_info(repo_id, revision="pacs-sketch").sha == pushed.oid


def test_a_sharded_soup_pushes_index_and_shards(hub_namespace, tmp_path):
    folder = write_soup(tmp_path, tiny_resnet(201), max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert soup_files(folder) == [
        "model.safetensors.index.json",
        *shards,
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "recipe.yaml",
        "results.json",
    ]
    repo_id = f"{hub_namespace}/sharded-soup"
    push_folder(folder, repo_id)
    loaded = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, tiny_resnet(201)(pixel_values=pixels).logits)


def test_a_hub_that_needs_a_token_gets_one_line_without_the_token(local_hub, hub_namespace, soup, monkeypatch):
    monkeypatch.setattr(local_hub, "token", "hf_local_secret")
    monkeypatch.delenv("HF_TOKEN")
    repo_id = f"{hub_namespace}/private-soup"
    with pytest.raises(HubError) as anonymous:
        push_folder(soup, repo_id)
    assert str(anonymous.value) == f"push to {repo_id} failed: not authorised (401) — set HF_TOKEN or pass --token"
    with pytest.raises(HubError) as wrong:
        push_folder(soup, repo_id, token="hf_wrong_secret")
    assert str(wrong.value) == (
        f"push to {repo_id} failed: not authorised (401): the token was refused — check HF_TOKEN or --token"
    )
    assert push_folder(soup, repo_id, token="hf_local_secret", private=True).changed
    assert HfApi(token="hf_local_secret").model_info(repo_id).private
    assert not Path(constants.HF_TOKEN_PATH).exists()  # the token was used, never saved


@pytest.mark.parametrize(
    ("route", "status"), [("preupload", 429), ("preupload", 500), ("commit", 429), ("commit", 500)]
)
def test_transient_hub_errors_are_retried_without_a_duplicate_commit(
    local_hub, hub_namespace, soup, no_retry_wait, route, status
):
    repo_id = f"{hub_namespace}/flaky-soup"
    local_hub.inject_failures(f"^/api/models/{repo_id}/{route}/", [status], method="POST")
    assert push_folder(soup, repo_id).changed
    answers = [r.status for r in local_hub.requests if r.path.startswith(f"/api/models/{repo_id}/{route}/")]
    assert answers == [status, 200]
    assert commit_titles(local_hub, repo_id) == [COMMIT_TITLE, "initial commit"]


def test_a_hub_that_keeps_failing_gives_up_with_one_line(local_hub, hub_namespace, soup, no_retry_wait):
    repo_id = f"{hub_namespace}/down-soup"
    local_hub.inject_failures(f"^/api/models/{repo_id}/commit/", [503] * 4)
    with pytest.raises(HubError) as gave_up:
        push_folder(soup, repo_id)
    assert str(gave_up.value) == f"push to {repo_id} failed: the Hub kept answering 503 after 4 tries — try again later"


def test_a_forbidden_namespace_is_not_retried(local_hub, hub_namespace, soup):
    repo_id = f"{hub_namespace}/soup"
    local_hub.inject_failures("^/api/repos/create$", [403])
    with pytest.raises(HubError) as forbidden:
        push_folder(soup, repo_id)
    assert str(forbidden.value) == (
        f"push to {repo_id} failed: forbidden (403) — the token cannot write to {hub_namespace}: use a write token"
    )


def test_an_invalid_card_stops_the_push_before_the_repo_exists(local_hub, hub_namespace, tmp_path):
    folder = write_soup(tmp_path, tiny_resnet(200))
    (folder / "README.md").write_text("---\nbase_model: [unclosed\n---\n# soup\n")
    repo_id = f"{hub_namespace}/bad-card-soup"
    with pytest.raises(HubError, match=f"^push to {repo_id} failed: the model card's metadata is invalid: "):
        push_folder(folder, repo_id)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(repo_id)


def test_an_incomplete_folder_or_bad_repo_id_fails_before_any_request(local_hub, hub_namespace, tmp_path):
    folder = write_soup(tmp_path, tiny_resnet(200))
    (folder / "config.json").unlink()
    before = len(local_hub.requests)
    with pytest.raises(HubError, match=f"^soup folder {folder} has no config.json$"):
        push_folder(folder, f"{hub_namespace}/soup")
    with pytest.raises(HubError, match="must be namespace/name"):
        push_folder(folder, "soup")
    assert len(local_hub.requests) == before


def test_a_push_that_fails_midway_finishes_on_rerun_with_one_commit(local_hub, hub_namespace, tmp_path, no_retry_wait):
    """Weights uploaded, then the commit fails for good: the rerun commits once; the local soup is untouched."""
    soup = write_soup(tmp_path / "soup", tiny_resnet(201))
    before = {p.name: p.read_bytes() for p in soup.iterdir()}
    repo_id = f"{hub_namespace}/midway-soup"
    local_hub.inject_failures(f"^/api/models/{repo_id}/commit/", [503] * 4)
    with pytest.raises(HubError):
        push_folder(soup, repo_id)
    assert commit_titles(local_hub, repo_id) == ["initial commit"]  # the failed push left no partial commit

    finished = push_folder(soup, repo_id)
    assert finished.changed
    assert commit_titles(local_hub, repo_id) == [COMMIT_TITLE, "initial commit"]
    assert push_folder(soup, repo_id).changed is False  # and a third run has nothing left to do
    assert {p.name: p.read_bytes() for p in soup.iterdir()} == before


def test_create_pr_opens_a_pull_request_and_leaves_the_branch_alone(local_hub, hub_namespace, soup, tmp_path):
    repo_id = f"{hub_namespace}/reviewed-soup"
    pushed = push_folder(soup, repo_id, create_pr=True, commit_message="Soup for review")
    assert pushed.changed and pushed.pr_url == f"{local_hub.url}/{repo_id}/discussions/1"
    assert commit_titles(local_hub, repo_id) == ["initial commit"]
    assert commit_titles(local_hub, repo_id, "refs/pr/1") == ["Soup for review", "initial commit"]
    assert HfApi().model_info(repo_id, revision="refs/pr/1").sha == pushed.oid
    assert push_folder(soup, repo_id, create_pr=True).pr_url == f"{local_hub.url}/{repo_id}/discussions/2"
    revised = write_soup(tmp_path / "revised", tiny_resnet(202))
    again = push_folder(revised, repo_id, revision="refs/pr/1", commit_message="Review answered")  # as hf upload
    assert (again.changed, again.pr_url) == (True, None)
    assert commit_titles(local_hub, repo_id, "refs/pr/1") == ["Review answered", "Soup for review", "initial commit"]


def test_push_takes_hf_uploads_order_and_refuses_the_old_one(local_hub, hub_namespace, soup, tmp_path, capsys):
    repo_id = f"{hub_namespace}/cli-soup"
    assert cli.main(["push", str(soup), repo_id]) == 2
    assert capsys.readouterr().err == (
        f"error: push takes the repo id first, as hf upload does: ratatouille-hub push {repo_id} {soup}\n"
    )
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(repo_id)
    assert cli.main(["push", repo_id, str(soup), "--create-pr", "--commit-message", "A soup to review"]) == 0
    pr_url = f"{local_hub.url}/{repo_id}/discussions/1"
    assert capsys.readouterr().out == f"pushed {soup} to {repo_id} as pull request {pr_url}\n"
    assert commit_titles(local_hub, repo_id, "refs/pr/1") == ["A soup to review", "initial commit"]


def test_push_without_a_folder_takes_the_obvious_one_or_asks(
    local_hub, hub_namespace, soup, tmp_path, monkeypatch, capsys
):
    repo_id = f"{hub_namespace}/here-soup"
    shutil.copytree(soup, tmp_path / "out" / "soup")
    monkeypatch.chdir(tmp_path / "out")  # an output folder: its soup
    assert cli.main(["push", repo_id]) == 0
    assert capsys.readouterr().out.startswith(f"pushed soup to {local_hub.url}/{repo_id}/commit/")
    monkeypatch.chdir(tmp_path / "out" / "soup")  # a model folder itself: the same files, nothing to commit
    assert cli.main(["push", repo_id]) == 0
    assert capsys.readouterr().out.startswith(f"no changes: {repo_id}@")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["push", repo_id]) == 2
    assert capsys.readouterr().err == (
        "error: push needs the folder to push: ratatouille-hub push REPO_ID FOLDER (of ., soup, "
        "ratatouille-output/soup, none is a model folder)\n"
    )


# What the unmodified clients do with Xet on (HF_HUB_DISABLE_XET unset): push with ratatouille-hub, then download.
XET_ON = """
import sys
from pathlib import Path
import hf_xet  # installed with huggingface_hub: its uploads go through Xet unless HF_HUB_DISABLE_XET is set
from huggingface_hub import constants, hf_hub_download
from ratatouille_hub import cli

repo_id, soup = sys.argv[1], sys.argv[2]
assert not constants.HF_HUB_DISABLE_XET
assert cli.main(["push", repo_id, soup]) == 0
downloaded = Path(hf_hub_download(repo_id, "model.safetensors"))
assert downloaded.read_bytes() == (Path(soup) / "model.safetensors").read_bytes()
"""


def test_a_push_and_a_download_work_with_xet_left_on(local_hub, hub_namespace, soup, tmp_path):
    """huggingface_hub uploads through Xet whenever hf_xet is installed; the local Hub, like a Hub without Xet,
    answers `xetEnabled: false`, and the push goes by git-LFS without HF_HUB_DISABLE_XET."""
    import os
    import subprocess
    import sys

    repo_id = f"{hub_namespace}/xet-soup"
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    environment["HF_HOME"] = str(tmp_path / "hf-home")  # a fresh cache: the download is a real one
    done = subprocess.run(
        [sys.executable, "-c", XET_ON, repo_id, str(soup)], env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    paths = [r.path for r in local_hub.requests if repo_id in r.path]
    assert any(p.endswith(".git/info/lfs/objects/batch") for p in paths)  # the weights went by git-LFS
    assert not any(re.search(r"/xet-(read|write)-token/", p) for p in paths)  # never asked for Xet

    # A Hub that does not say it lacks Xet, and then refuses it: the one line that fixes it.
    xet_assumed = f"from ratatouille_hub import publish; publish._takes_xet = lambda api, repo_id: True\n{XET_ON}"
    refused = subprocess.run(
        [sys.executable, "-c", xet_assumed, f"{hub_namespace}/xet-refused", str(soup)],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and re.search(
        rf"^error: push to {hub_namespace}/xet-refused failed: the Hub at {local_hub.url} gave no Xet upload token "
        r"\(.*xet-write-token.*\); set HF_HUB_DISABLE_XET=1 to upload by git-LFS$",
        refused.stderr,
        flags=re.M,
    ), refused.stderr
