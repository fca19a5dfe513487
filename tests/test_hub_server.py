"""The local Hub, proven through the unmodified huggingface_hub, transformers and datasets clients.

Every client here reaches the session's LocalHub through HF_ENDPOINT (set in conftest.py), so these
tests show that the project's Hub code paths work against a Hub-compatible server, offline.
"""

import base64
import hashlib
import http.client
import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import refusals
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

from ratatouille_hub import cli
from ratatouille_hub.localhub import server
from ratatouille_hub.localhub.server import _ROUTES, LocalHub, read_users_file
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


# -- authorization and paths, as on the Hub -----------------------------------------------------------------

ADMIN = "hf_admin_secret"
USERS = {"tok-alice": "alice", "tok-bob": "bob"}


@dataclass
class RawAnswer:
    status: int
    body: bytes


def raw(hub: LocalHub, method: str, path: str, body: bytes = b"", token: str | None = None) -> RawAnswer:
    """A request sent byte for byte (no client validation, no URL normalisation): what a hostile client sends."""
    connection = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return RawAnswer(response.status, response.read())
    finally:
        connection.close()


def ndjson(*operations: dict) -> bytes:
    """A commit payload: the header line, then one line per operation."""
    lines = [{"key": "header", "value": {"summary": "raw commit"}}, *operations]
    return b"\n".join(json.dumps(line).encode() for line in lines)


def add_file(path: str, content: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"}}


@pytest.fixture(scope="module")
def users_hub(tmp_path_factory):
    """A hub with per-user tokens and no admin token; alice owns alice/model (config.json on main)."""
    with LocalHub(tmp_path_factory.mktemp("users-hub"), users=USERS) as hub:
        alice = HfApi(endpoint=hub.url, token="tok-alice")
        alice.create_repo("alice/model")
        alice.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/model")
        yield hub


@pytest.fixture(scope="module")
def open_hub(tmp_path_factory):
    """A hub without tokens (the local-development mode) holding team/model."""
    with LocalHub(tmp_path_factory.mktemp("open-hub")) as hub:
        HfApi(endpoint=hub.url, token=False).create_repo("team/model")
        yield hub


def head(hub: LocalHub, repo_id: str, branch: str = "main") -> str:
    return hub.store.get_repo("model", repo_id).resolve(branch).oid


def model_ids(hub: LocalHub) -> set[str]:
    return {repo.repo_id for repo in hub.store.repos("model")}


def test_a_private_repo_is_read_only_by_its_owner_and_the_admin(tmp_path):
    with LocalHub(tmp_path / "store", token=ADMIN, users=USERS) as hub:
        alice, admin = HfApi(endpoint=hub.url, token="tok-alice"), HfApi(endpoint=hub.url, token=ADMIN)
        bob, anonymous = HfApi(endpoint=hub.url, token="tok-bob"), HfApi(endpoint=hub.url, token=False)
        unknown = HfApi(endpoint=hub.url, token="tok-nobody")
        alice.create_repo("alice/secret", private=True)
        alice.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/secret")
        alice.create_repo("alice/secret-data", repo_type="dataset", private=True)
        alice.create_repo("alice/public")

        assert alice.model_info("alice/secret").private and admin.model_info("alice/secret").private
        for reader, status in ((bob, 404), (anonymous, 401), (unknown, 401)):
            with pytest.raises(RepositoryNotFoundError) as hidden:
                reader.model_info("alice/secret")
            assert hidden.value.response.status_code == status
            with pytest.raises(RepositoryNotFoundError):
                reader.hf_hub_download("alice/secret", "config.json", cache_dir=tmp_path / "cache")
            with pytest.raises(RepositoryNotFoundError):
                list(reader.list_repo_tree("alice/secret"))
            with pytest.raises(RepositoryNotFoundError):
                reader.get_paths_info("alice/secret", ["config.json"])
        with pytest.raises(RepositoryNotFoundError) as missing:
            bob.model_info("alice/no-such-repo")
        with pytest.raises(RepositoryNotFoundError) as hidden:
            bob.model_info("alice/secret")
        assert (hidden.value.response.status_code, hidden.value.response.json()) == (
            missing.value.response.status_code,
            {"error": missing.value.response.json()["error"].replace("no-such-repo", "secret")},
        )  # another user cannot tell a private repo from a missing one

        def listed(api: HfApi) -> set[str]:
            return {m.id for m in api.list_models(search="alice/")} | {d.id for d in api.list_datasets(author="alice")}

        assert listed(alice) == listed(admin) == {"alice/secret", "alice/secret-data", "alice/public"}
        assert listed(bob) == listed(anonymous) == listed(unknown) == {"alice/public"}


def test_with_users_every_write_needs_a_valid_token(users_hub):
    before = head(users_hub, "alice/model")
    for token in (False, "tok-nobody"):
        api = HfApi(endpoint=users_hub.url, token=token)
        with pytest.raises(HfHubHTTPError) as refused:
            api.create_repo("alice/made-without-a-token")
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["X-Error-Code"] == "Unauthorized"
        with pytest.raises(HfHubHTTPError) as refused_upload:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model")
        assert refused_upload.value.response.status_code == 401
    assert (
        raw(users_hub, "GET", "/api/whoami-v2").status
        == raw(users_hub, "GET", "/api/whoami-v2", token="x").status
        == 401
    )
    bob = HfApi(endpoint=users_hub.url, token="tok-bob")
    with pytest.raises(HfHubHTTPError) as forbidden:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model")
    assert forbidden.value.response.status_code == 403
    assert head(users_hub, "alice/model") == before
    assert "alice/made-without-a-token" not in model_ids(users_hub)
    assert bob.create_repo("bob/own").repo_id == "bob/own"  # a user's token writes into the user's namespace


WRITES = [  # one request per write route of the local Hub, each against alice's repo
    ("POST", "/api/repos/create", json.dumps({"name": "new", "organization": "alice"}).encode()),
    ("POST", "/api/models/alice/model/preupload/main", json.dumps({"files": []}).encode()),
    ("POST", "/api/models/alice/model/commit/main", ndjson(add_file("x.txt", b"x"))),
    ("POST", "/api/models/alice/model/branch/dev", b"{}"),
    ("POST", "/alice/model.git/info/lfs/objects/batch", json.dumps({"operation": "upload", "objects": []}).encode()),
    ("POST", "/alice/model.git/info/lfs/objects/verify", json.dumps({"oid": "0" * 64, "size": 1}).encode()),
]


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("tok-nobody", 401), ("tok-bob", 403)])
def test_every_write_route_refuses_all_but_the_namespace_owner(users_hub, token, status):
    before = head(users_hub, "alice/model")
    answers = [raw(users_hub, method, path, body, token).status for method, path, body in WRITES]
    assert answers == [status] * len(WRITES)
    write_routes = {name for _, _, name, is_write in _ROUTES if is_write}
    assert {r.route for r in users_hub.requests[-len(WRITES) :]} == write_routes  # WRITES covers them all
    assert head(users_hub, "alice/model") == before
    assert set(users_hub.store.get_repo("model", "alice/model").refs) == {"main"}
    assert "alice/new" not in model_ids(users_hub)


UNSAFE_PATHS = ["../escape.txt", "a/../../escape.txt", "/abs.txt", "a\\b.txt", "a//b.txt", "./a.txt", "a/./b.txt"]
UNSAFE_PATHS += ["a/..", "..", "", "a\x00b.txt", "folder/"]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_a_commit_with_an_unsafe_path_is_refused_before_anything_is_stored(open_hub, path):
    before, content = head(open_hub, "team/model"), f"sent as {path!r}".encode()
    answer = raw(open_hub, "POST", "/api/models/team/model/commit/main", ndjson(add_file(path, content)))
    assert answer.status == 400, answer.body
    assert head(open_hub, "team/model") == before
    assert not open_hub.store.has_blob(hashlib.sha256(content).hexdigest())


@pytest.mark.parametrize(
    ("key", "path"), [("deletedFile", "../repo.json"), ("deletedFolder", "../"), ("lfsFile", "../weights.bin")]
)
def test_deletions_and_lfs_files_with_unsafe_paths_are_refused(open_hub, key, path):
    before, blob = head(open_hub, "team/model"), open_hub.store.put_bytes(b"uploaded weights")
    value = (
        {"path": path, "algo": "sha256", "oid": blob.sha256, "size": blob.size} if key == "lfsFile" else {"path": path}
    )
    assert (
        raw(open_hub, "POST", "/api/models/team/model/commit/main", ndjson({"key": key, "value": value})).status == 400
    )
    assert head(open_hub, "team/model") == before


def test_an_lfs_oid_that_is_not_a_sha256_never_reaches_the_filesystem(tmp_path):
    """`blobs/{oid[:2]}/{oid}` with oid `../outside/secret.txt` would be `outside/secret.txt` beside the store."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("not the hub's")
    with LocalHub(tmp_path / "store") as hub:
        HfApi(endpoint=hub.url, token=False).create_repo("team/model")
        before, oid = head(hub, "team/model"), "../outside/secret.txt"
        steal = ndjson({"key": "lfsFile", "value": {"path": "stolen.txt", "algo": "sha256", "oid": oid}})
        assert raw(hub, "POST", "/api/models/team/model/commit/main", steal).status == 400
        assert head(hub, "team/model") == before
        for route, body in (
            ("batch", {"operation": "upload", "objects": [{"oid": oid, "size": 1}]}),
            ("verify", {"oid": oid, "size": 13}),
        ):
            assert (
                raw(hub, "POST", f"/team/model.git/info/lfs/objects/{route}", json.dumps(body).encode()).status == 400
            )
        assert oid not in hub._announced_uploads


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/models/team/..%2F..%2Fescape"),
        ("GET", "/api/models/..%2Fteam/model/tree/main"),
        ("GET", "/team/model/resolve/..%2F..%2Fmain/config.json"),
        ("GET", "/api/models/team/model/tree/%2E%2E"),
        ("POST", "/api/models/team/model/branch/..%2Fescape"),
        ("POST", "/api/models/team/model/commit/main%2F..%2F..%2Fescape"),
        ("POST", "/api/models/team/..%2Fmodel/preupload/main"),
    ],
)
def test_dot_dot_in_a_repo_id_or_revision_is_refused(open_hub, method, path):
    assert raw(open_hub, method, path, b"{}").status == 400
    assert set(open_hub.store.get_repo("model", "team/model").refs) == {"main"}


def test_local_hub_users_file_gives_each_user_a_token(tmp_path, monkeypatch):
    users_file = tmp_path / "users"
    users_file.write_text("# token user\ntok-alice alice\n\n  tok-bob   bob  \n")
    users_file.chmod(0o600)
    assert read_users_file(users_file) == USERS

    served = {}
    monkeypatch.setattr(server, "serve", lambda root, port, token=None, users=None: served.update(users=users))
    assert cli.main(["local-hub", "--root", str(tmp_path / "hub"), "--users-file", str(users_file)]) == 0
    assert served["users"] == USERS


USERS_FILE_CASES = {  # case: (what, file text, line, problem)
    "local-hub-users-file-token-only": ("a users-file line without a user", "tok-alice alice\ntok-secret-only\n", 2, "expected 'TOKEN USER'"),
    "local-hub-users-file-three-fields": ("a users-file line of three fields", "tok-alice alice\ntok-bob bob carol\n", 2, "expected 'TOKEN USER'"),
    "local-hub-users-file-token-twice": ("a users file giving one token twice", "tok-alice alice\ntok-alice bob\n", 2, "a token given twice"),
    "local-hub-users-file-bad-user": ("a users file naming user `../alice`", "tok-alice ../alice\n", 1, "not a valid user name"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(USERS_FILE_CASES))
def test_a_malformed_users_file_is_refused_naming_its_line(case, tmp_path, capsys):
    what, text, line, problem = USERS_FILE_CASES[case]
    users_file = tmp_path / "users"
    users_file.write_text(text)
    users_file.chmod(0o600)
    with pytest.raises(ValueError, match=f"^{re.escape(str(users_file))}:{line}: .*{re.escape(problem)}") as refused:
        read_users_file(users_file)
    assert "tok-" not in str(refused.value).replace(str(users_file), "")  # never the secret
    argv = ["local-hub", "--root", str(tmp_path / "hub"), "--users-file", str(users_file)]
    printed = refusals.fails_cleanly(case, what, argv, str(users_file), tmp_path / "hub", capsys, {"<tmp>": tmp_path})
    assert printed == f"error: {refused.value}"


def test_a_users_file_others_can_read_or_without_users_is_refused(tmp_path):
    users_file = tmp_path / "users"
    users_file.write_text("tok-alice alice\n")
    users_file.chmod(0o644)
    with pytest.raises(ValueError, match=f"^{re.escape(str(users_file))}: .*chmod 600"):
        read_users_file(users_file)
    users_file.write_text("# nobody yet\n")
    users_file.chmod(0o600)
    with pytest.raises(ValueError, match=f"^{re.escape(str(users_file))}: no 'TOKEN USER' line"):
        read_users_file(users_file)


def test_the_hub_says_it_has_no_xet_and_a_xet_token_request_is_told_the_fix(open_hub):
    """As a Hub without Xet storage: `xetEnabled: false` (what ratatouille-hub's pushes ask), and a client that
    asks for a Xet token anyway (huggingface_hub does whenever hf_xet is installed) is told the setting."""
    info = raw(open_hub, "GET", "/api/models/team/model?expand=xetEnabled")
    assert (info.status, json.loads(info.body)) == (200, {"_id": "team/model", "id": "team/model", "xetEnabled": False})
    for kind in ("read", "write"):
        answer = raw(open_hub, "GET", f"/api/models/team/model/xet-{kind}-token/main")
        assert answer.status == 400 and "set HF_HUB_DISABLE_XET=1" in json.loads(answer.body)["error"]
    assert raw(open_hub, "GET", "/api/models/team/nothing/xet-write-token/main").status == 404


def test_a_commit_with_create_pr_opens_a_pull_request_and_a_refused_one_leaves_none(open_hub):
    api = HfApi(endpoint=open_hub.url, token=False)
    main = head(open_hub, "team/model")
    opened = api.create_commit(
        "team/model", [CommitOperationAdd("notes.txt", b"first")], commit_message="Review me", create_pr=True
    )
    assert (opened.pr_url, opened.pr_revision) == (f"{open_hub.url}/team/model/discussions/1", "refs/pr/1")
    assert head(open_hub, "team/model") == main and head(open_hub, "team/model", "refs/pr/1") == opened.oid
    assert api.model_info("team/model", revision="refs/pr/1").sha == opened.oid
    with pytest.raises(HfHubHTTPError):  # on top of a commit that is not the branch's head: refused whole
        api.create_commit(
            "team/model",
            [CommitOperationAdd("b.txt", b"b")],
            commit_message="x",
            create_pr=True,
            parent_commit="0" * 40,
        )
    assert set(open_hub.store.get_repo("model", "team/model").refs) == {"main", "refs/pr/1"}
