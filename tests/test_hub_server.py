"""The local Hub, proven through the unmodified huggingface_hub, transformers and datasets clients.

Every client here reaches the session's LocalHub through HF_ENDPOINT (set in conftest.py), so these
tests show that the project's Hub code paths work against a Hub-compatible server, offline.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    HfFileSystem,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from PIL import Image
from transformers import AutoModelForImageClassification

from ratatouille_hub.localhub.server import LocalHub
from ratatouille_hub.localhub.store import LOCAL_USER
from ratatouille_hub.testing import tiny_resnet, write_hub_dataset

BASE = "ratatouille-test/resnet-base"


@dataclass
class Published:
    repo_id: str
    commit: str
    folder: Path


def unknown_routes(hub: LocalHub, repo_id: str) -> list:
    """Requests about `repo_id` that the local Hub had no route for: a client feature it lacks."""
    return [r for r in hub.requests if r.route is None and repo_id in r.path]


def write_card(folder: Path, **metadata) -> Path:
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(metadata)}---\n# A test model\n")
    return folder


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_resnet(0).eval()


@pytest.fixture(scope="module")
def published_model(new_hub_namespace, tiny_model, tmp_path_factory):
    """The tiny ResNet pushed with `upload_folder` (config.json regular, model.safetensors LFS)."""
    repo_id = f"{new_hub_namespace()}/tiny-resnet"
    folder = tmp_path_factory.mktemp("tiny-resnet")
    tiny_model.save_pretrained(folder)
    write_card(
        folder,
        base_model=BASE,
        library_name="transformers",
        pipeline_tag="image-classification",
        datasets=["ratatouille-test/pacs"],
        license="apache-2.0",
        tags=["ratatouille"],
    )
    HfApi().create_repo(repo_id)
    commit = HfApi().upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Add tiny ResNet")
    return Published(repo_id, commit.oid, folder)


def test_create_repo_answers_409_unless_exist_ok(hub_namespace):
    api = HfApi()
    url = api.create_repo(f"{hub_namespace}/model")
    assert url.repo_id == f"{hub_namespace}/model"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(f"{hub_namespace}/model")
    assert conflict.value.response.status_code == 409
    assert api.create_repo(f"{hub_namespace}/model", exist_ok=True) == url
    dataset_url = api.create_repo(f"{hub_namespace}/model", repo_type="dataset")
    assert dataset_url.repo_type == "dataset" and dataset_url.endswith(f"/datasets/{hub_namespace}/model")
    own = api.create_repo(f"{hub_namespace}-no-organization")  # the Hub would use the token owner's name
    assert own.repo_id == f"{LOCAL_USER}/{hub_namespace}-no-organization"


def test_upload_folder_sends_regular_and_lfs_files_in_one_commit(local_hub, published_model):
    api, repo_id = HfApi(), published_model.repo_id
    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id)}
    weights = (published_model.folder / "model.safetensors").read_bytes()
    assert tree["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert tree["model.safetensors"].size == len(weights)
    assert tree["config.json"].lfs is None
    paths = {info.path for info in api.get_paths_info(repo_id, ["config.json", "model.safetensors", "missing"])}
    assert paths == {"config.json", "model.safetensors"}

    repo = local_hub.store.get_repo("model", repo_id)
    head = repo.resolve("main")
    assert head.oid == published_model.commit and head.title == "Add tiny ResNet"
    assert [c.title for c in repo.history(head)] == ["Add tiny ResNet", "initial commit"]
    routes = [r.route for r in local_hub.requests if repo_id in r.path or r.route == "_lfs_put"]
    assert {"_preupload", "_lfs_batch", "_lfs_put", "_lfs_verify", "_commit"} <= set(routes)


def test_model_info_reports_sha_siblings_and_card(published_model):
    info = HfApi().model_info(published_model.repo_id, files_metadata=True)
    assert info.sha == published_model.commit
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    assert siblings["model.safetensors"].lfs is not None and siblings["config.json"].lfs is None
    assert info.card_data["base_model"] == BASE
    assert info.pipeline_tag == "image-classification" and info.library_name == "transformers"
    assert {"ratatouille", "dataset:ratatouille-test/pacs", "license:apache-2.0"} <= set(info.tags)


def test_a_card_with_invalid_metadata_is_refused(hub_namespace):
    api, repo_id = HfApi(), f"{hub_namespace}/bad-card"
    api.create_repo(repo_id)
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):  # from POST /api/validate-yaml
        api.upload_file(path_or_fileobj=b"---\nbase_model: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo_id)
    ModelCard(f"---\n{yaml.safe_dump({'base_model': BASE})}---\n# card\n").validate()


def test_snapshot_download_filters_files_and_pins_a_revision(hub_namespace):
    api, repo_id, weights = HfApi(), f"{hub_namespace}/versions", bytes(range(256))
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id=repo_id).oid
    api.upload_file(path_or_fileobj=weights, path_in_repo="nested/weights.bin", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id=repo_id)

    pinned = Path(snapshot_download(repo_id, revision=first, allow_patterns=["*.json"]))
    assert (pinned / "config.json").read_bytes() == b'{"v": 1}'
    assert not (pinned / "nested").exists()
    latest = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin"]))
    assert (latest / "config.json").read_bytes() == b'{"v": 2}'
    assert (latest / "nested/weights.bin").read_bytes() == weights

    with HfFileSystem().open(f"{repo_id}/nested/weights.bin", block_size=16) as remote:  # Range requests
        remote.seek(100)
        assert remote.read(5) == weights[100:105]


def test_missing_repo_revision_and_file_raise_the_client_errors(published_model):
    repo_id = published_model.repo_id
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "no-such-file.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody-here/nothing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("nobody-here/nothing")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(repo_id, revision="no-such-branch")


def test_list_models_finds_lineage_by_card_tags_and_paginates(local_hub, hub_namespace, tmp_path):
    ns, other = hub_namespace, f"{hub_namespace}-other"
    base = f"{ns}/base"

    def seed(repo_id, downloads=0, **card):
        folder = tmp_path / repo_id
        folder.mkdir(parents=True)
        local_hub.seed_model(repo_id, write_card(folder, library_name="transformers", **card), downloads)

    seed(base, downloads=100)
    for name, downloads in (("finetune-a", 5), ("finetune-b", 30), ("finetune-c", 10)):
        seed(f"{ns}/{name}", downloads, base_model=base)
    seed(f"{other}/finetune-d", 20, base_model=base)
    seed(f"{ns}/soup", base_model=[f"{ns}/finetune-a", f"{ns}/finetune-b"], base_model_relation="merge")
    seed(f"{ns}/soup-undeclared", base_model=[f"{ns}/finetune-a", f"{ns}/finetune-c"])

    api = HfApi()
    finetunes = [m.id for m in api.list_models(filter=f"base_model:finetune:{base}", sort="downloads")]
    assert finetunes == [f"{ns}/finetune-b", f"{other}/finetune-d", f"{ns}/finetune-c", f"{ns}/finetune-a"]
    mine = api.list_models(filter=f"base_model:finetune:{base}", author=ns)
    assert {m.id for m in mine} == {f"{ns}/finetune-a", f"{ns}/finetune-b", f"{ns}/finetune-c"}
    assert [m.id for m in api.list_models(author=ns, search="SOUP")] == [f"{ns}/soup", f"{ns}/soup-undeclared"]

    merges = api.list_models(filter=[f"base_model:merge:{ns}/finetune-a", "transformers"])
    assert {m.id for m in merges} == {f"{ns}/soup", f"{ns}/soup-undeclared"}
    soup = api.model_info(f"{ns}/soup")
    assert {f"base_model:{ns}/finetune-b", f"base_model:merge:{ns}/finetune-b"} <= set(soup.tags)
    assert not any(tag.startswith("base_model:finetune:") for tag in soup.tags)

    local_hub.page_size = 2
    try:
        assert len(list(api.list_models(author=ns))) == 6
        assert len(list(api.list_models(author=ns, limit=3))) == 3
    finally:
        local_hub.page_size = 1000
    pages = [r.path for r in local_hub.requests if r.path.startswith("/api/models?") and f"author={ns}&" in r.path]
    assert sum("cursor=" in path for path in pages) == 2 + 1  # 6 models in 3 pages, then 3 in 2 pages


def test_from_pretrained_gives_the_local_models_logits(local_hub, published_model, tiny_model):
    downloads = HfApi().model_info(published_model.repo_id).downloads
    loaded = AutoModelForImageClassification.from_pretrained(published_model.repo_id).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, tiny_model(pixel_values=pixels).logits)
    assert HfApi().model_info(published_model.repo_id).downloads == downloads + 1
    assert unknown_routes(local_hub, published_model.repo_id) == []


def test_branches_and_stale_parent_commits(hub_namespace):
    api, repo_id = HfApi(), f"{hub_namespace}/branched"
    api.create_repo(repo_id)
    start = api.upload_file(path_or_fileobj=b"1", path_in_repo="run.txt", repo_id=repo_id).oid
    api.create_branch(repo_id, branch="experiment")
    api.create_branch(repo_id, branch="experiment", exist_ok=True)
    api.upload_file(path_or_fileobj=b"2", path_in_repo="run.txt", repo_id=repo_id, revision="experiment")
    assert api.model_info(repo_id).sha == start
    assert api.model_info(repo_id, revision="experiment").sha != start
    assert Path(hf_hub_download(repo_id, "run.txt", revision="experiment")).read_bytes() == b"2"

    api.upload_file(path_or_fileobj=b"3", path_in_repo="run.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(repo_id, [CommitOperationAdd("run.txt", b"4")], commit_message="late", parent_commit=start)
    assert stale.value.response.status_code == 412


def test_dataset_push_to_hub_then_load_dataset_round_trips(local_hub, hub_namespace, tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "domain": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["dog", "horse", "house"]),
        }
    )
    rng = np.random.default_rng(0)
    rows = {
        "image": [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(6)],
        "domain": ["art", "art", "photo", "photo", "sketch", "sketch"],
        "label": [0, 1, 2, 0, 1, 2],
    }
    original = datasets.Dataset.from_dict(rows, features=features)
    original.push_to_hub(f"{hub_namespace}/tiny-pacs")

    loaded = datasets.load_dataset(f"{hub_namespace}/tiny-pacs", split="train")
    assert loaded.features == features
    assert loaded["domain"] == rows["domain"] and loaded["label"] == rows["label"]
    for got, want in zip(loaded["image"], rows["image"], strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert unknown_routes(local_hub, f"{hub_namespace}/tiny-pacs") == []

    local_hub.seed_dataset(f"{hub_namespace}/seeded-pacs", write_hub_dataset(original, tmp_path / "seeded", card=None))
    seeded = datasets.load_dataset(f"{hub_namespace}/seeded-pacs", split="train")
    assert seeded.features == features and seeded["domain"] == rows["domain"]
    listed = HfApi().list_datasets(author=hub_namespace)
    assert [d.id for d in listed] == [f"{hub_namespace}/seeded-pacs", f"{hub_namespace}/tiny-pacs"]


def test_client_retries_through_injected_429_and_500(local_hub, hub_namespace):
    api, repo_id = HfApi(), f"{hub_namespace}/flaky"
    api.create_repo(repo_id)

    local_hub.inject_failures(f"^/api/models/{repo_id}/preupload/", [429, 500])
    api.upload_file(path_or_fileobj=b'{"ok": true}', path_in_repo="config.json", repo_id=repo_id)
    assert [r.status for r in local_hub.requests if r.path.startswith(f"/api/models/{repo_id}/preupload/")] == [
        429,
        500,
        200,
    ]

    # Downloads retry 408 and 429 only: a 500 on the GET is not retried by huggingface_hub.
    local_hub.inject_failures(f"^/{repo_id}/resolve/", [429], method="GET")
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b'{"ok": true}'
    gets = [r.status for r in local_hub.requests if r.method == "GET" and r.path.startswith(f"/{repo_id}/resolve/")]
    assert gets == [429, 200]


def test_writes_and_private_reads_need_the_token_when_the_hub_has_one(tmp_path):
    with LocalHub(tmp_path / "store", token="hf_local_secret") as hub:
        anonymous = HfApi(endpoint=hub.url, token=False)
        owner = HfApi(endpoint=hub.url, token="hf_local_secret")
        with pytest.raises(HfHubHTTPError) as refused:
            anonymous.create_repo("team/secret-model", private=True)
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["X-Error-Code"] == "Unauthorized"
        assert owner.whoami()["name"] == LOCAL_USER
        with pytest.raises(HfHubHTTPError) as wrong:
            HfApi(endpoint=hub.url, token="hf_wrong").create_repo("team/secret-model")
        assert wrong.value.response.status_code == 401

        owner.create_repo("team/secret-model", private=True)
        owner.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="team/secret-model")
        with pytest.raises(HfHubHTTPError) as refused_upload:
            anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="team/secret-model")
        assert refused_upload.value.response.status_code == 401
        assert owner.model_info("team/secret-model").private
        with pytest.raises(RepositoryNotFoundError):
            anonymous.model_info("team/secret-model")
        assert list(anonymous.list_models(author="team")) == []


def test_the_store_survives_a_restart(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    with LocalHub(tmp_path / "store") as hub:
        sha = hub.seed_model("team/kept", tmp_path / "model", downloads=7)
    with LocalHub(tmp_path / "store") as hub:
        info = HfApi(endpoint=hub.url).model_info("team/kept")
        assert (info.sha, info.downloads) == (sha, 7)
        assert hf_hub_download("team/kept", "config.json", endpoint=hub.url, cache_dir=tmp_path / "cache")
