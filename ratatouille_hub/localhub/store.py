"""On-disk state of the local Hub: repositories, their commits and branches, and file blobs.

`localhub.server` answers the Hugging Face clients from this store; tests and offline work seed it
directly. Each repository is one JSON file (`repos/{models|datasets}/{org}/{name}/repo.json`) holding
its branches and every commit's full file list; file contents live once, addressed by sha256, under
`blobs/`. Metadata the Hub derives (tags, card data) is derived here from README.md front matter at
each commit, the way the Hub does it, so lineage queries behave as they do on huggingface.co.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO_TYPES = {"model": "models", "dataset": "datasets"}
"""Repository type -> the plural the Hub uses in URLs (`/api/models`, `/datasets/...`)."""

LOCAL_USER = "local-user"
"""Namespace of repos created without an organization (the Hub would use the token's owner)."""

# What the Hub stores through LFS: big files, and the binary formats of its default .gitattributes.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.onnx",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.pkl",
    "*.pickle",
    "*.parquet",
    "*.arrow",
    "*.gz",
    "*.zip",
    "*.tar",
    "*.zst",
)
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)

_FRONT_MATTER = re.compile(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(?:\r\n|\n|$)")
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"[0-9a-f]{64}")


PR_REF_PREFIX = "refs/pr/"  # pull request N's commits are on refs/pr/N, as on the Hub


class HubError(Exception):
    """A request the Hub refuses: the HTTP status and the `X-Error-Code` the client maps to an exception."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.headers = headers or {}


class RepoNotFound(HubError):
    status, code = 404, "RepoNotFound"


class RevisionNotFound(HubError):
    status, code = 404, "RevisionNotFound"


class EntryNotFound(HubError):
    status, code = 404, "EntryNotFound"


class Conflict(HubError):
    status = 409


class PreconditionFailed(HubError):
    status = 412


def valid_name(name: str) -> bool:
    """A namespace or repo name the Hub accepts; the store joins them into paths, so none holds `..`."""
    return bool(_REPO_NAME.fullmatch(name)) and ".." not in name


def check_repo_id(repo_id: str) -> None:
    namespace, _, name = repo_id.partition("/")
    if not (valid_name(namespace) and valid_name(name)):
        raise HubError(f"Invalid repo id '{repo_id}': expected 'namespace/name'.")


def check_relative(value: str, what: str) -> None:
    """Refuse (400, as the Hub does) a file path or revision that is not plain '/'-separated names: a client
    joins file paths into folders on disk, so '..', '.', empty segments, '\\' and control characters never pass."""
    if (
        any(segment in ("", ".", "..") for segment in value.split("/"))
        or "\\" in value
        or any(ord(char) < 32 for char in value)
    ):
        raise HubError(f"Invalid {what} {value!r}: expected '/'-separated names without '', '.' or '..' segments.")


def now_iso() -> str:
    """The Hub's timestamp format (`2024-05-01T12:00:00.123Z`), which the client's parser expects."""
    now = dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a file: what the client compares against to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def wants_lfs(path: str, size: int) -> bool:
    """The Hub's preupload rule: LFS for big files and for binary formats in its default .gitattributes."""
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(name, pattern) for pattern in LFS_PATTERNS)


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. `git_oid` is the git blob id (of the LFS pointer for LFS files)."""

    size: int
    sha256: str
    git_oid: str
    lfs: bool

    @classmethod
    def regular(cls, data: bytes) -> FileEntry:
        return cls(len(data), hashlib.sha256(data).hexdigest(), git_blob_oid(data), lfs=False)

    @classmethod
    def large(cls, sha256: str, size: int) -> FileEntry:
        return cls(size, sha256, git_blob_oid(cls.pointer(sha256, size)), lfs=True)

    @staticmethod
    def pointer(sha256: str, size: int) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()

    @property
    def pointer_size(self) -> int:
        return len(self.pointer(self.sha256, self.size))

    @property
    def hub_oid(self) -> str:
        """The sha256 for LFS files, the git blob id otherwise: the ETag of `resolve`, and the preupload
        `oid` that the client compares with its own hash to skip unchanged files."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, FileEntry]

    @classmethod
    def from_json(cls, data: dict) -> Commit:
        files = {path: FileEntry(**entry) for path, entry in data.pop("files").items()}
        return cls(files=files, **data)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    downloads: int = 0
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def author(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        """Where the Hub serves this repo's pages: `org/name` or `datasets/org/name`."""
        return self.repo_id if self.repo_type == "model" else f"datasets/{self.repo_id}"

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit sha, as the Hub accepts them in URLs."""
        oid = self.refs.get(revision) or (revision if _COMMIT_SHA.match(revision) else None)
        if oid not in self.commits:
            raise RevisionNotFound(f"Revision '{revision}' not found in {self.repo_type} {self.repo_id}.")
        return self.commits[oid]

    def history(self, commit: Commit) -> Iterator[Commit]:
        """The commit and its ancestors, newest first."""
        current: Commit | None = commit
        while current is not None:
            yield current
            current = self.commits.get(current.parent) if current.parent else None


class HubStore:
    """All repositories under `root`, kept in memory and written through to disk on every change.

    One lock serialises changes, the way the Hub serialises commits to a branch; readers get
    consistent snapshots because commits are immutable and branch moves are single assignments.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._cards: dict[str, dict] = {}  # README sha256 -> front matter
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.glob("repos/*/*/*/repo.json")):
            data = json.loads(path.read_text())
            commits = {oid: Commit.from_json(commit) for oid, commit in data.pop("commits").items()}
            repo = Repo(commits=commits, **data)
            self._repos[(repo.repo_type, repo.repo_id)] = repo

    # Repositories

    def repos(self, repo_type: str) -> list[Repo]:
        with self._lock:
            return [repo for (kind, _), repo in self._repos.items() if kind == repo_type]

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise RepoNotFound(f"{repo_type.capitalize()} repository '{repo_id}' not found.") from None

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        """A new repo starts, as on the Hub, with one commit holding the default .gitattributes."""
        check_repo_id(repo_id)
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise Conflict(f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type, repo_id, private, created_at=now_iso())
            self._repos[(repo_type, repo_id)] = repo
            self.commit(repo, "main", {".gitattributes": self.put_bytes(GITATTRIBUTES.encode())}, (), "initial commit")
            return repo

    def create_branch(self, repo: Repo, branch: str, starting_point: str = "main") -> None:
        with self._lock:
            if branch in repo.refs:
                raise Conflict(f"Branch '{branch}' already exists in {repo.repo_id}.")
            repo.refs[branch] = repo.resolve(starting_point).oid
            self._save(repo)

    def commit(
        self,
        repo: Repo,
        branch: str,
        additions: dict[str, FileEntry],
        deletions: Iterable[str],
        title: str,
        description: str = "",
        parent_commit: str | None = None,
    ) -> Commit:
        """Move `branch` to a new commit. A deletion ending in '/' removes a folder."""
        for path in [*additions, *(path.removesuffix("/") for path in deletions)]:
            check_relative(path, "path in repo")
        with self._lock:
            head = repo.commits[repo.refs[branch]] if branch in repo.refs else None
            if head is None and repo.refs:
                raise RevisionNotFound(f"Branch '{branch}' not found in {repo.repo_id}: commits go to a branch.")
            if parent_commit is not None and (head is None or parent_commit != head.oid):
                raise PreconditionFailed(
                    f"A commit has happened since {parent_commit}: the head of '{branch}' is now {head and head.oid}."
                )
            files = dict(head.files) if head else {}
            for path in deletions:
                removed = [p for p in files if p == path or (path.endswith("/") and p.startswith(path))]
                if not removed:
                    raise EntryNotFound(f"Cannot delete '{path}': no such file in {repo.repo_id}@{branch}.")
                for p in removed:
                    del files[p]
            files.update(additions)
            for path, entry in additions.items():
                if path == "README.md":
                    self.card_data(entry)  # the Hub refuses a card whose metadata is not valid YAML
            date = now_iso()
            body = json.dumps([head and head.oid, title, description, date, {p: asdict(e) for p, e in files.items()}])
            oid = hashlib.sha1(body.encode()).hexdigest()
            commit = Commit(oid, head and head.oid, title, description, date, files)
            repo.commits[oid] = commit
            repo.refs[branch] = oid
            self._save(repo)
            return commit

    def open_pull_request(self, repo: Repo, base: str, *commit_args, **commit_kwargs) -> tuple[int, Commit]:
        """Open pull request N against the branch `base` with one commit (`commit`'s other arguments), on the
        ref `refs/pr/N` as the Hub names it; nothing is left behind when the commit is refused."""
        with self._lock:
            number = 1 + sum(ref.startswith(PR_REF_PREFIX) for ref in repo.refs)
            ref = f"{PR_REF_PREFIX}{number}"
            repo.refs[ref] = repo.resolve(base).oid
            try:
                return number, self.commit(repo, ref, *commit_args, **commit_kwargs)
            except BaseException:
                del repo.refs[ref]
                raise

    def count_download(self, repo: Repo) -> None:
        self.set_downloads(repo, repo.downloads + 1)

    def set_downloads(self, repo: Repo, downloads: int) -> None:
        with self._lock:
            repo.downloads = downloads
            self._save(repo)

    def _save(self, repo: Repo) -> None:
        path = self.root / "repos" / REPO_TYPES[repo.repo_type] / repo.repo_id / "repo.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(repo)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    # Blobs

    def blob_path(self, sha256: str) -> Path:
        """Where a blob lives; only a sha256 names one, so no oid a client sends can point outside the store."""
        if not _SHA256.fullmatch(sha256):
            raise HubError(f"Invalid object id {sha256!r}: expected a sha256 (64 hex digits).")
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes, lfs: bool = False) -> FileEntry:
        """Store content and describe it as a regular file, or as an LFS file when `lfs`."""
        entry = FileEntry.regular(data)
        if not self.has_blob(entry.sha256):
            self.put_stream([data], entry.sha256, entry.size)
        return FileEntry.large(entry.sha256, entry.size) if lfs else entry

    def put_stream(self, chunks: Iterable[bytes], sha256: str, size: int) -> None:
        """Stream an announced object into the blob store, refusing content that does not match it."""
        digest, received = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "blobs", prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    received += len(chunk)
                    out.write(chunk)
            if (digest.hexdigest(), received) != (sha256, size):
                raise HubError(f"Uploaded content (sha256 {digest.hexdigest()}, {received} bytes) is not {sha256}.")
            self.blob_path(sha256).parent.mkdir(exist_ok=True)
            os.replace(tmp, self.blob_path(sha256))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # Derived metadata

    def card_data(self, readme: FileEntry | None) -> dict:
        """README.md front matter (cached by content hash); HubError when it is not a YAML mapping."""
        if readme is None:
            return {}
        if readme.sha256 not in self._cards:
            text = self.blob_path(readme.sha256).read_text(encoding="utf-8", errors="replace")
            self._cards[readme.sha256] = parse_front_matter(text)
        return self._cards[readme.sha256]

    def seed_folder(self, repo_type: str, repo_id: str, folder: Path, message: str) -> Commit:
        """Commit every file of `folder` (except .git and .cache) in one commit on main."""
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self.create_repo(repo_type, repo_id)
            repo = self._repos[(repo_type, repo_id)]
            additions = {}
            for path in sorted(Path(folder).rglob("*")):
                relative = path.relative_to(folder).as_posix()
                if path.is_file() and not relative.startswith((".git/", ".cache/")):
                    data = path.read_bytes()
                    additions[relative] = self.put_bytes(data, lfs=wants_lfs(relative, len(data)))
            return self.commit(repo, "main", additions, (), message)


def parse_front_matter(text: str) -> dict:
    """The YAML block between leading `---` lines of a card; {} when there is none."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise HubError(f"Invalid metadata in README.md: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HubError("Invalid metadata in README.md: the YAML front matter must be a mapping.")
    return data


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def derive_tags(repo_type: str, card: dict) -> list[str]:
    """Tags as the Hub derives them from card metadata; `filter=` in list queries matches these.

    A model's `base_model` gives `base_model:X` and `base_model:{relation}:X`. The relation is
    `base_model_relation` when the card declares it; otherwise `merge` for several bases and
    `finetune` for one (the Hub also infers `adapter`/`quantized` from files, which this store
    does not: declare those explicitly).
    """
    tags = _as_list(card.get("tags"))
    if repo_type == "model":
        tags += _as_list(card.get("library_name")) + _as_list(card.get("pipeline_tag"))
        tags += [f"dataset:{name}" for name in _as_list(card.get("datasets"))]
        bases = _as_list(card.get("base_model"))
        relation = card.get("base_model_relation") or ("merge" if len(bases) > 1 else "finetune")
        tags += [f"base_model:{base}" for base in bases] + [f"base_model:{relation}:{base}" for base in bases]
    else:
        for key in ("task_categories", "language", "size_categories"):
            tags += [f"{key}:{value}" for value in _as_list(card.get(key))]
    tags += [f"license:{name}" for name in _as_list(card.get("license"))]
    return list(dict.fromkeys(tags))
