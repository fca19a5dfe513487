"""A local, Hub-compatible HTTP server: a stand-in for tests and offline work, not a production registry.

The unmodified huggingface_hub, transformers and datasets clients talk to it through `HF_ENDPOINT`,
which proves the project's Hub code end to end without internet. It answers the routes, headers and
error codes those clients rely on; any other route gets a 404 that is logged and recorded in
`LocalHub.requests`, so a test can tell a missing feature from a missing file.

Like a Hub without Xet storage it keeps large files by git-LFS and says so (`xetEnabled: false`):
ratatouille-hub's pushes then upload by git-LFS by themselves, and a client that asks for a Xet token
anyway (huggingface_hub does whenever hf_xet is installed) is answered with the setting it needs,
`HF_HUB_DISABLE_XET=1`.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

from ratatouille_hub.errors import InputError
from ratatouille_hub.localhub.store import (
    LOCAL_USER,
    REPO_TYPES,
    Commit,
    Conflict,
    EntryNotFound,
    FileEntry,
    HubError,
    HubStore,
    Repo,
    RepoNotFound,
    check_relative,
    check_repo_id,
    derive_tags,
    git_blob_oid,
    parse_front_matter,
    valid_name,
    wants_lfs,
)

logger = logging.getLogger(__name__)

NO_XET = (
    "This Hub does not store files with Xet (xetEnabled: false); large files go by git-LFS: "
    "set HF_HUB_DISABLE_XET=1 before the Hugging Face client starts"
)
_CHUNK = 1 << 20
_SORT_KEYS = {
    "downloads": lambda info: info["downloads"],
    "trendingScore": lambda info: info["downloads"],
    "likes": lambda info: info["likes"],
    "lastModified": lambda info: info["lastModified"],
    "createdAt": lambda info: info["createdAt"],
    "id": lambda info: info["id"].lower(),
}


class RequestRecord(NamedTuple):
    """One answered request; `route` is None for routes the local Hub does not implement."""

    method: str
    path: str
    status: int
    route: str | None


class Unauthorized(HubError):
    """A write without a valid token (the admin's or a user's) on a hub that has tokens."""

    status, code = 401, "Unauthorized"


class Forbidden(HubError):
    """A write into another user's namespace, with a valid token of its own."""

    status, code = 403, "Forbidden"


@dataclass
class _Fault:
    pattern: re.Pattern
    method: str | None
    statuses: deque[int]


class LocalHub:
    """The local Hub on 127.0.0.1: a store under `root` served from a daemon thread.

    `port=0` picks a free port. `token` is the admin's (the local user's), who reads and writes anything;
    `users` (token -> name) gives each user a token that writes only into that user's namespace (403
    elsewhere) and reads only that user's private repos. With either, the Hub's rules hold: every write
    needs a valid `Authorization: Bearer <token>` (401 otherwise), and a private repo is hidden from everyone
    else (401/404 RepoNotFound, and left out of listings). With neither, the hub is open to all, for local
    development. `page_size` caps list and tree pages (the client follows the `Link` header to the next
    page). Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        root: Path,
        port: int = 0,
        token: str | None = None,
        page_size: int = 1000,
        users: dict[str, str] | None = None,
    ):
        self.store = HubStore(root)
        self.token = token
        self.users = dict(users or {})  # token -> user name: each writes only into its own namespace
        self.page_size = page_size
        self._requests: deque[RequestRecord] = deque(maxlen=10_000)
        self._requests_lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._faults_lock = threading.Lock()
        self._announced_uploads: dict[str, int] = {}  # LFS oid -> size, from the batch endpoint
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _HubRequestHandler)
        self._server.hub = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalHub:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def seed_model(self, repo_id: str, folder: Path, downloads: int = 0) -> str:
        """Store a local model folder as one commit on main (creating the repo); returns the commit sha."""
        commit = self.store.seed_folder("model", repo_id, Path(folder), f"Seed from {Path(folder).name}")
        self.store.set_downloads(self.store.get_repo("model", repo_id), downloads)
        return commit.oid

    def seed_dataset(self, repo_id: str, folder: Path) -> str:
        """Store a local dataset folder (e.g. parquet files and a README.md) as one commit on main."""
        return self.store.seed_folder("dataset", repo_id, Path(folder), f"Seed from {Path(folder).name}").oid

    @property
    def requests(self) -> list[RequestRecord]:
        """The last 10,000 answered requests, oldest first (each is recorded before its answer is sent)."""
        with self._requests_lock:
            return list(self._requests)

    def _record(self, record: RequestRecord) -> None:
        with self._requests_lock:
            self._requests.append(record)

    def inject_failures(self, path_regex: str, statuses: list[int], method: str | None = None) -> None:
        """Make the next requests whose URL path matches `path_regex` (and `method`, if given) answer
        `statuses`, one per request, in order; later requests succeed. Tests use it to prove retries."""
        with self._faults_lock:
            self._faults.append(_Fault(re.compile(path_regex), method, deque(statuses)))

    def _take_fault(self, method: str, path: str) -> int | None:
        with self._faults_lock:
            for fault in self._faults:
                if fault.statuses and (fault.method in (None, method)) and fault.pattern.search(path):
                    status = fault.statuses.popleft()
                    self._faults = [f for f in self._faults if f.statuses]
                    return status
        return None

    @property
    def is_open(self) -> bool:
        """No token and no users: the local-development mode, where anyone reads and writes anything."""
        return self.token is None and not self.users

    def is_admin(self, authorization: str | None) -> bool:
        return self.token is not None and _bearer(authorization, self.token)

    def authenticated(self, authorization: str | None) -> bool:
        """Whether the request may write at all: on an open hub always, otherwise only with a valid token."""
        return self.is_open or self.is_admin(authorization) or self.caller(authorization) is not None

    def caller(self, authorization: str | None) -> str | None:
        """The user of `users` whose token the request carries (None for the admin's, an unknown one or none)."""
        return next((name for token, name in self.users.items() if _bearer(authorization, token)), None)

    def can_read(self, repo: Repo, authorization: str | None) -> bool:
        """A private repo is its owner's and the admin's alone, as on the Hub (anyone's on an open hub)."""
        if not repo.private or self.is_open or self.is_admin(authorization):
            return True
        return self.caller(authorization) == repo.author


def _bearer(authorization: str | None, token: str) -> bool:
    return authorization is not None and hmac.compare_digest(authorization, f"Bearer {token}")


def read_users_file(path: Path) -> dict[str, str]:
    """Per-user tokens from a file of `TOKEN USER` lines (blank lines and `# comments` skipped), so that no
    token shows on a command line, where `ps` shows it to everyone. A file others may read or change is
    refused, and so is one without users (the hub would be open); no error repeats a line: it holds a secret."""
    path = Path(path)
    if path.stat().st_mode & 0o077:
        raise InputError(f"{path}: other users may read or change it and it holds tokens: chmod 600 {path}")
    users, first_line = {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise InputError(f"{path}:{number}: expected 'TOKEN USER' (2 fields), found {len(fields)} fields")
        token, user = fields
        if token in users:
            raise InputError(f"{path}:{number}: a token given twice (first on line {first_line[token]})")
        if not valid_name(user):
            raise InputError(f"{path}:{number}: {user!r} is not a valid user name (letters, digits, '.', '_', '-')")
        users[token], first_line[token] = user, number
    if not users:
        raise InputError(f"{path}: no 'TOKEN USER' line, so the hub would be open to all")
    return users


def serve(root: Path, port: int, token: str | None = None, users: dict[str, str] | None = None) -> None:
    """Run the local Hub in the foreground until Ctrl-C."""
    with LocalHub(root, port=port, token=token, users=users) as hub:
        access = (
            "open: anyone may read and write anything"
            if hub.is_open
            else f"writes need a token ({len(hub.users)} user tokens{', and the admin token' if token else ''})"
        )
        print(
            f"Local Hub at {hub.url} (store: {Path(root).resolve()}; {access})\n"
            "This is a local stand-in for the Hugging Face Hub, for tests and offline work. It is not a\n"
            "production registry: loopback only, and its only accounts are the tokens it was given.\n"
            "Point the Hugging Face libraries at it before Python starts (HF_HUB_DISABLE_XET=1: it stores\n"
            "large files by git-LFS, not Xet; ratatouille-hub's own pushes need only HF_ENDPOINT):\n"
            f"  export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("Local Hub stopped.")


def _repo_type(kind: str | None) -> str:
    """URL spellings of a repo type (`models`, `datasets`, `datasets/`, none) -> `model` / `dataset`."""
    return "dataset" if kind and kind.startswith("datasets") else "model"


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_API_REPO = rf"^/api/(?P<kind>models|datasets)/{_REPO}"
_WEB_REPO = rf"^/(?:(?P<kind>datasets)/)?{_REPO}"  # `org/name` or `datasets/org/name`
_RESOLVE = re.compile(rf"{_WEB_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_ROUTES: list[tuple[str, re.Pattern, str, bool]] = [
    # method, path pattern, handler, is a write
    ("GET", re.compile(r"^/api/agent-harnesses$"), "_agent_harnesses", False),
    ("GET", re.compile(r"^/api/whoami-v2$"), "_whoami", False),
    ("GET", re.compile(r"^/api/(?P<kind>models|datasets)$"), "_list_repos", False),
    ("POST", re.compile(r"^/api/repos/create$"), "_create_repo", True),
    ("POST", re.compile(r"^/api/validate-yaml$"), "_validate_yaml", False),
    ("GET", re.compile(rf"{_API_REPO}(?:/revision/(?P<revision>[^/]+))?$"), "_repo_info", False),
    ("GET", re.compile(rf"{_API_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$"), "_tree", False),
    ("POST", re.compile(rf"{_API_REPO}/paths-info/(?P<revision>[^/]+)$"), "_paths_info", False),
    ("POST", re.compile(rf"{_API_REPO}/preupload/(?P<revision>[^/]+)$"), "_preupload", True),
    ("POST", re.compile(rf"{_API_REPO}/commit/(?P<revision>[^/]+)$"), "_commit", True),
    ("POST", re.compile(rf"{_API_REPO}/branch/(?P<branch>[^/]+)$"), "_create_branch", True),
    # Xet storage is not offered: the token routes answer so, naming the setting that makes clients use git-LFS.
    ("GET", re.compile(rf"{_API_REPO}/xet-(?:read|write)-token/(?P<revision>[^/]+)$"), "_no_xet", False),
    ("POST", re.compile(rf"{_WEB_REPO}\.git/info/lfs/objects/batch$"), "_lfs_batch", True),
    ("POST", re.compile(rf"{_WEB_REPO}\.git/info/lfs/objects/verify$"), "_lfs_verify", True),
    # Like a presigned storage URL: no auth, but only objects announced by the batch endpoint.
    ("PUT", re.compile(r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$"), "_lfs_put", False),
    ("GET", _RESOLVE, "_resolve", False),
    ("HEAD", _RESOLVE, "_resolve", False),
]


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to a `_handler(**url_parts)`; handlers answer or raise `HubError`."""

    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server_version = "ratatouille-local-hub"
    server: ThreadingHTTPServer

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):
        logger.debug("%s - " + format, self.address_string(), *args)

    def send_response(self, code, message=None):
        self._responded = True
        self.server.hub._record(RequestRecord(self.command, self.path, code, getattr(self, "_route_name", None)))
        super().send_response(code, message)

    # Dispatch

    def _dispatch(self) -> None:
        self.hub: LocalHub = self.server.hub
        url = urlsplit(self.path)
        self.url_path, self.query_string = url.path, url.query
        self.query = parse_qs(url.query, keep_blank_values=True)
        self._body = self._iter_body()
        self._responded = False
        try:
            fault = self.hub._take_fault(self.command, self.url_path)
            if fault is not None:
                self._route_name = "injected failure"
                raise HubError(f"Injected failure ({fault}) for {self.command} {self.url_path}", status=fault)
            self._route_name, handler, parts, is_write = self._route()
            if is_write:  # every write route, before its handler reads the body or touches the store
                self._require_token()
                self._require_namespace(parts.get("repo_id"))
            handler(**parts)
        except HubError as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("Client went away during %s %s", self.command, self.path)
            self.close_connection = True
        except Exception as exc:
            logger.exception("Local Hub failed on %s %s", self.command, self.path)
            self._send_error(HubError(f"Local Hub internal error: {exc!r}", status=500))
        finally:
            self._drain_body()
            self._route_name = None

    def _route(self):
        for method, pattern, name, is_write in _ROUTES:
            match = pattern.match(self.url_path) if method == self.command else None
            if match:
                parts = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                if "kind" in match.groupdict():
                    parts["repo_type"] = _repo_type(parts.pop("kind", None))
                if "repo_id" in parts:
                    check_repo_id(parts["repo_id"])
                for ref in ("revision", "branch"):
                    if ref in parts:
                        check_relative(parts[ref], "revision")
                return name, getattr(self, name), parts, is_write
        logger.warning("Local Hub has no route for %s %s", self.command, self.path)
        raise HubError(f"The local Hub does not implement {self.command} {self.url_path}", status=404)

    def _require_namespace(self, repo_id: str | None) -> None:
        user = self.hub.caller(self.headers.get("Authorization"))
        if user is not None and repo_id is not None and repo_id.split("/")[0] != user:
            raise Forbidden(f"You don't have the rights to write to {repo_id} (signed in as {user})")

    def _require_token(self) -> None:
        if self.hub.authenticated(self.headers.get("Authorization")):
            return
        if self.headers.get("Authorization"):
            raise Unauthorized("Invalid credentials in Authorization header")
        raise Unauthorized("This local Hub requires a token for writes (Authorization: Bearer <token>).")

    # Request bodies (always read to the end, or the next keep-alive request would be garbage)

    def _iter_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                while size:
                    chunk = self.rfile.read(min(size, _CHUNK))
                    if not chunk:
                        raise ConnectionResetError("request body cut short")
                    size -= len(chunk)
                    yield chunk
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _CHUNK))
                if not chunk:
                    raise ConnectionResetError("request body cut short")
                remaining -= len(chunk)
                yield chunk

    def _drain_body(self) -> None:
        try:
            for _ in self._body:
                pass
        except OSError:
            self.close_connection = True

    def _json_body(self) -> dict:
        raw = b"".join(self._body)
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            raise HubError(f"Request body is not JSON: {exc}") from None

    # Responses

    def _send(self, status: int, body: bytes, headers: dict[str, str], content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data, status: int = 200, headers: dict | None = None, content_type="application/json"):
        self._send(status, json.dumps(data, default=str).encode(), headers or {}, content_type)

    def _send_error(self, exc: HubError) -> None:
        if self._responded:  # failed mid-answer: all the client can be told is that the connection ends
            self.close_connection = True
            return
        self._drain_body()
        message = str(exc)
        headers = {"X-Error-Message": message.splitlines()[0].encode("latin-1", "replace").decode("latin-1")}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        self._send_json({"error": message}, exc.status, {**headers, **exc.headers})

    def _send_page(self, items: list, limit: int | None = None) -> None:
        """One page of `items` from `cursor`, with a `Link: <...>; rel="next"` header when more remain."""
        offset = self._int_param("cursor") or 0
        size = min(self.hub.page_size, limit) if limit else self.hub.page_size
        headers = {}
        if offset + size < len(items):
            pairs = [(k, v) for k, v in parse_qsl(self.query_string, keep_blank_values=True) if k != "cursor"]
            next_url = f"{self.hub.url}{self.url_path}?{urlencode([*pairs, ('cursor', offset + size)])}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(items[offset : offset + size], headers=headers)

    # Helpers

    def _param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def _int_param(self, name: str) -> int | None:
        value = self._param(name)
        try:
            return int(value) if value else None
        except ValueError:
            raise HubError(f"Query parameter {name} must be an integer, not {value!r}") from None

    def _flag(self, name: str) -> bool:
        return (self._param(name) or "").lower() in ("1", "true")

    def _readable_repo(self, repo_type: str, repo_id: str) -> Repo:
        """A repo this request may read. Anyone else is told a private repo does not exist, as on the Hub: 401
        without a valid token, and for another user the very 404 of a missing repo."""
        repo = self.hub.store.get_repo(repo_type, repo_id)
        authorization = self.headers.get("Authorization")
        if not self.hub.can_read(repo, authorization):
            status = 404 if self.hub.caller(authorization) else 401
            raise RepoNotFound(f"{repo_type.capitalize()} repository '{repo_id}' not found.", status=status)
        return repo

    def _repo_json(self, repo: Repo, commit: Commit, siblings: bool, blobs: bool = False, card: bool = True) -> dict:
        card_data = self.hub.store.card_data(commit.files.get("README.md"))
        info = {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "author": repo.author,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": repo.downloads,
            "likes": 0,
            "tags": derive_tags(repo.repo_type, card_data),
            "xetEnabled": False,  # large files go by git-LFS: what a Hub without Xet storage answers
        }
        if repo.repo_type == "model":
            info.update(
                modelId=repo.repo_id,
                library_name=card_data.get("library_name"),
                pipeline_tag=card_data.get("pipeline_tag"),
            )
        if card:
            info["cardData"] = card_data
        if siblings:
            info["siblings"] = [_sibling_json(path, entry, blobs) for path, entry in sorted(commit.files.items())]
        return info

    # Handlers

    def _agent_harnesses(self) -> None:
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _whoami(self) -> None:
        self._require_token()
        name = self.hub.caller(self.headers.get("Authorization")) or LOCAL_USER
        self._send_json({"type": "user", "name": name, "orgs": [], "auth": {"type": "access_token"}})

    def _list_repos(self, repo_type: str) -> None:
        search, author = (self._param("search") or "").lower(), (self._param("author") or "").lower()
        filters = self.query.get("filter", [])
        sort = self._param("sort")
        if sort is not None and sort not in _SORT_KEYS:
            raise HubError(f"Unsupported sort '{sort}' (one of {', '.join(_SORT_KEYS)})")
        full, with_card = self._flag("full"), self._flag("full") or self._flag("cardData")
        authorization = self.headers.get("Authorization")
        rows = []
        for repo in self.hub.store.repos(repo_type):
            if not self.hub.can_read(repo, authorization) or search not in repo.repo_id.lower():
                continue
            if author and repo.author.lower() != author:
                continue
            info = self._repo_json(repo, repo.resolve("main"), siblings=full, card=with_card)
            if all(tag in info["tags"] for tag in filters):
                rows.append(info)
        if sort:  # descending unless direction=1, as on the Hub
            rows.sort(key=_SORT_KEYS[sort], reverse=self._param("direction") != "1")
        else:  # the Hub's default is trending; a stable order suits tests better
            rows.sort(key=_SORT_KEYS["id"])
        self._send_page(rows, self._int_param("limit"))

    def _create_repo(self) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(f"The local Hub stores models and datasets, not {repo_type}s.")
        user = self.hub.caller(self.headers.get("Authorization"))
        repo_id = f"{payload.get('organization') or user or LOCAL_USER}/{payload.get('name')}"
        self._require_namespace(repo_id)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.hub.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        try:
            self.hub.store.create_repo(repo_type, repo_id, private)
        except Conflict as exc:
            self._send_json({"error": str(exc), "url": url}, status=409)
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        """The client checks every README.md it commits here first; it reads `errors[].message` on a 400."""
        try:
            parse_front_matter(self._json_body().get("content", ""))
        except HubError as exc:
            self._send_json({"error": str(exc), "errors": [{"message": str(exc)}], "warnings": []}, status=400)
            return
        self._send_json({"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str = "main") -> None:
        repo = self._readable_repo(repo_type, repo_id)
        info = self._repo_json(repo, repo.resolve(revision), siblings=True, blobs=self._flag("blobs"))
        expand = self.query.get("expand")
        if expand:  # the Hub then answers only the requested fields
            info = {key: value for key, value in info.items() if key in ("_id", "id", *expand)}
        self._send_json(info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str = "") -> None:
        commit = self._readable_repo(repo_type, repo_id).resolve(revision)
        path = path.strip("/")
        if path and not _is_folder(commit.files, path):
            raise EntryNotFound(f"No folder '{path}' in {repo_id}@{revision}.", headers={"X-Repo-Commit": commit.oid})
        self._send_page(_tree_listing(commit.files, path, recursive=self._flag("recursive")))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        commit = self._readable_repo(repo_type, repo_id).resolve(revision)
        form = parse_qs(b"".join(self._body).decode(), keep_blank_values=True)
        entries = []
        for path in (p.strip("/") for p in form.get("paths", [])):
            if path in commit.files:
                entries.append(_file_json(path, commit.files[path]))
            elif _is_folder(commit.files, path):
                entries.append(_folder_json(commit.files, path))
        self._send_json(entries)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        headers = {"X-Repo-Commit": commit.oid}
        entry = commit.files.get(path)
        if entry is None:
            raise EntryNotFound(f"Entry '{path}' not found in {repo_id}@{revision}.", headers=headers)
        start, end = self._byte_range(entry.size, headers)
        headers.update({"ETag": f'"{entry.hub_oid}"', "Accept-Ranges": "bytes", "Content-Length": str(end - start)})
        self.send_response(206 if "Content-Range" in headers else 200)
        self.send_header("Content-Type", "application/octet-stream")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self._counts_as_download(repo, commit, path):
            self.hub.store.count_download(repo)
        with open(self.hub.store.blob_path(entry.sha256), "rb") as blob:
            blob.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = blob.read(min(remaining, _CHUNK))
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def _byte_range(self, size: int, headers: dict) -> tuple[int, int]:
        """The `[start, end)` a `Range: bytes=a-b` header asks for (sets Content-Range); the whole file without one."""
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not match or match.groups() == ("", ""):
            return 0, size
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last) + 1, size) if last else size
        else:
            start, end = max(size - int(last), 0), size
        if start >= size or start >= end:
            unsatisfiable = {"Content-Range": f"bytes */{size}"}
            raise HubError(f"Range {self.headers['Range']} not satisfiable: {size} bytes", 416, unsatisfiable)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return start, end

    def _counts_as_download(self, repo: Repo, commit: Commit, path: str) -> bool:
        """One download per model load, like the Hub: a GET of config.json, or of the weights in a config-less repo."""
        if repo.repo_type != "model" or "Range" in self.headers:
            return False
        return path == "config.json" or (path == "model.safetensors" and "config.json" not in commit.files)

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        commit = self.hub.store.get_repo(repo_type, repo_id).resolve(revision)
        files = []
        for file in self._json_body().get("files", []):
            existing = commit.files.get(file["path"])
            files.append(
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if wants_lfs(file["path"], int(file["size"])) else "regular",
                    "shouldIgnore": False,
                    "oid": existing.hub_oid if existing else None,  # lets the client skip unchanged files
                }
            )
        self._send_json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        repo = self.hub.store.get_repo(repo_type, repo_id)
        request = self._json_body()
        if request.get("operation") != "upload":
            raise HubError("The local Hub's LFS endpoint only takes uploads; download through /resolve.")
        objects = []
        for obj in request.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer = {"oid": oid, "size": size}
            if not self.hub.store.has_blob(oid, size):  # no "actions": the client skips the upload
                self.hub._announced_uploads[oid] = size
                verify = f"{self.hub.url}/{repo.url_path}.git/info/lfs/objects/verify"
                answer["authenticated"] = True
                upload = f"{self.hub.url}/lfs-objects/{oid}"
                answer["actions"] = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        size = self.hub._announced_uploads.get(oid)
        if size is None:
            raise HubError(f"No upload of {oid} was announced through the LFS batch endpoint.", status=403)
        self.hub.store.put_stream(self._body, oid, size)
        self.hub._announced_uploads.pop(oid, None)
        self._send_json({}, headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        self.hub.store.get_repo(repo_type, repo_id)
        obj = self._json_body()
        if not self.hub.store.has_blob(obj.get("oid", ""), obj.get("size")):
            raise HubError(f"LFS object {obj.get('oid')} ({obj.get('size')} bytes) was not uploaded.", status=404)
        self._send_json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Apply an NDJSON commit: a header line, then file / lfsFile / deletedFile / deletedFolder lines; with
        `create_pr`, to a new pull request against `revision`."""
        store = self.hub.store
        repo = store.get_repo(repo_type, repo_id)
        items = [json.loads(line) for line in b"".join(self._body).splitlines() if line.strip()]
        headers = [item.get("value", {}) for item in items if item.get("key") == "header"]
        if not headers:
            raise HubError("The commit payload has no header line.")
        operations = [(item.get("key"), item.get("value", {})) for item in items if item.get("key") != "header"]
        for key, value in operations:  # the whole payload is checked before any of its content is stored
            if key not in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                raise HubError(f"Unknown commit operation '{key}'.")
            check_relative(value["path"].rstrip("/") if key == "deletedFolder" else value["path"], "path in repo")
        additions, deletions = {}, []
        for key, value in operations:
            if key == "file":
                content = value["content"]
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                additions[value["path"]] = store.put_bytes(data)
            elif key == "lfsFile":
                oid, size = value["oid"], value.get("size")
                if not store.has_blob(oid, size):
                    raise HubError(f"LFS object {oid} for '{value['path']}' was never uploaded.")
                size = size if size is not None else store.blob_path(oid).stat().st_size
                additions[value["path"]] = FileEntry.large(oid, int(size))
            elif key == "deletedFile":
                deletions.append(value["path"])
            else:
                deletions.append(value["path"].rstrip("/") + "/")
        header = headers[-1]
        commit_args = (additions, deletions, header.get("summary") or "", header.get("description") or "")
        pull_request = None
        if self._flag("create_pr"):
            number, commit = store.open_pull_request(repo, revision, *commit_args, header.get("parentCommit"))
            pull_request = f"{self.hub.url}/{repo.url_path}/discussions/{number}"
        else:
            commit = store.commit(repo, revision, *commit_args, parent_commit=header.get("parentCommit"))
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo.url_path}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pull_request,
            }
        )

    def _no_xet(self, repo_type: str, repo_id: str, revision: str) -> None:
        """A client that uploads through Xet without asking (huggingface_hub does whenever hf_xet is installed)
        asks for a Xet token here; the answer says what a Hub without Xet says, and the setting that fixes it."""
        self._readable_repo(repo_type, repo_id)
        raise HubError(NO_XET, status=400)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self.hub.store.get_repo(repo_type, repo_id)
        self.hub.store.create_branch(repo, branch, self._json_body().get("startingPoint") or "main")
        self._send_json({})


def _sibling_json(path: str, entry: FileEntry, blobs: bool) -> dict:
    """A `siblings` item; sizes and ids only with `?blobs=true` (`files_metadata=True`), as on the Hub."""
    if not blobs:
        return {"rfilename": path}
    sibling = {"rfilename": path, "size": entry.size, "blobId": entry.git_oid}
    if entry.lfs:
        sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
    return sibling


def _file_json(path: str, entry: FileEntry) -> dict:
    item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return item


def _folder_json(files: dict[str, FileEntry], folder: str) -> dict:
    content = sorted((p, e.git_oid) for p, e in files.items() if p.startswith(folder + "/"))
    oid = git_blob_oid(json.dumps(content).encode())
    return {"type": "directory", "oid": oid, "size": 0, "path": folder}


def _is_folder(files: dict[str, FileEntry], folder: str) -> bool:
    return any(path.startswith(folder + "/") for path in files)


def _tree_listing(files: dict[str, FileEntry], folder: str, recursive: bool) -> list[dict]:
    """Entries under `folder` ("" = root): its direct children, or all descendants when `recursive`."""
    prefix = f"{folder}/" if folder else ""
    listing, seen_folders = [], set()
    for path, entry in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            sub = prefix + "/".join(parts[:depth])
            if sub not in seen_folders:
                seen_folders.add(sub)
                listing.append(_folder_json(files, sub))
        if recursive or len(parts) == 1:
            listing.append(_file_json(path, entry))
    return listing


def hub_environment(hub_url: str, home: Path) -> dict[str, str]:
    """Environment that points the unmodified HF clients at the local Hub (read once at import time)."""
    return {
        "HF_ENDPOINT": hub_url,
        "HF_HUB_DISABLE_XET": "1",  # the local Hub speaks git-LFS, not Xet
        "HF_HOME": str(home),  # its own cache and no saved login: nothing of the user's leaks in
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
    }
