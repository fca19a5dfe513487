"""Fetch: turn a model reference (Hub id or local folder) into a pinned, local ingredient, and a
dataset name (or a DomainBed alias) into the Hub dataset and its columns.

Only the weights transformers loads (model.safetensors, else the shards its index names), configs and
processor files are downloaded, at the exact revision sha seen when the ingredient was resolved, so a recipe
replays on the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import RatatouilleError
from .hashing import is_hex_digest, remembered_sha256

log = logging.getLogger(__name__)

# Downloaded first; an index's shards follow by name (`weight_files`): no other *.safetensors is fetched.
WEIGHT_PATTERNS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "preprocessor_config.json",
    "README.md",
)


SINGLE_WEIGHTS_FILE = "model.safetensors"  # huggingface_hub's SAFETENSORS_SINGLE_FILE, without importing it
# Hashing beside other Python work: each chunk takes the GIL back once (up to the 5 ms switch interval while
# another thread computes), so chunks are large enough for that wait to be small against the hash itself.
HASH_CHUNK_BESIDE_WORK = 16 << 20

# Answers worth asking again: those huggingface_hub's own `http_backoff` retries (timeouts, rate limits, 5xx).
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
TRIES = 4  # the first and three more, after 1, 2 and 4 s (http_backoff: 1, 2, 4, 8, 8)
FIRST_WAIT_S = 1.0


class FetchError(RatatouilleError, ValueError):
    """A model reference that cannot be resolved to usable files."""


@dataclass(frozen=True)
class Ingredient:
    """A checkpoint as the recipe uses it: where it came from, which exact bytes, where they are."""

    source: str  # Hub id or the folder the user named
    revision: str  # Hub commit sha, or `sha256:<digest>` of a local weights file
    path: Path

    @property
    def reference(self) -> str:
        return f"{self.source}@{self.revision}"

    @property
    def is_local(self) -> bool:
        return self.revision.startswith("sha256:")

    def with_digest(self, file_digests: Sequence[str]) -> Ingredient:
        """A local ingredient named by its weight files' sha256 as a merge computed them (`weights_digest`'s
        name when there is one file; a sharded folder is hashed again, its name being over all shards)."""
        digest = file_digests[0][:16] if len(file_digests) == 1 else weights_digest(self.path)
        return replace(self, revision=f"sha256:{digest}")


def is_hub_id(reference: str) -> bool:
    """`name` or `namespace/name` by the Hub's own rule, and not an existing local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(reference).exists() or reference != reference.strip():
        return False
    try:
        validate_repo_id(reference)
    except HFValidationError:
        return False
    return True


@contextmanager
def reaching_the_hub(repo: str):
    """A Hub that cannot be reached, as one line naming the repo, the endpoint and what to do (the
    clients' own message is the socket's, e.g. `[Errno -2] Name or service not known`)."""
    try:
        yield
    except Exception as raised:
        error = raised.__cause__ if type(raised).__name__ == "LocalEntryNotFoundError" else raised
        if not any(cls.__name__ == "TransportError" for cls in type(error).__mro__):  # httpx's network errors
            raise  # (snapshot_download wraps them in LocalEntryNotFoundError when the cache has no copy either)
        from huggingface_hub import constants

        raise FetchError(
            f"{repo}: cannot reach the Hub at {constants.ENDPOINT} ({str(error).strip() or type(error).__name__}); "
            "check the network or point HF_ENDPOINT at a Hub you can reach, set HF_HUB_OFFLINE=1 to use what "
            "the local cache holds, or pass a local folder"
        ) from None


def split_revision(reference: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (org/name, rev); a local path (even one with an @ in it) and a plain id -> (it, None)."""
    name, at, revision = reference.partition("@")
    if at and revision and is_hub_id(name) and not Path(reference).exists():
        return name, revision
    return reference, None


def resolve_model(
    source: str, revision: str | None = None, token: str | bool | None = None, *, hash_local: bool = True
) -> Ingredient:
    """A local transformers folder as it is, or a Hub repo downloaded at a pinned commit (`org/name@rev` pins
    one, as `revision` does; with HF_HUB_OFFLINE set: the commit the local cache holds), every LFS file checked
    against its sha256. `hash_local=False` leaves a folder's digest to a caller that reads its weights anyway
    (`merge` hashes them as it streams them): its revision is then `sha256:` alone until `with_digest`."""
    if revision is None:
        source, revision = split_revision(source)
    folder = Path(source)
    if folder.is_dir() and not hash_local:
        return Ingredient(source, "sha256:", folder)
    if folder.is_dir():
        digest = weights_digest(folder)
        log.debug(f"[fetch] {source}: a local folder, weights sha256 {digest}")
        return Ingredient(source, f"sha256:{digest}", folder)
    if folder.exists():
        raise FetchError(f"{source}: not a model folder")
    if not is_hub_id(source):
        raise FetchError(f"{source}: no such model folder (and not a Hub model id)")
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    if constants.HF_HUB_OFFLINE:
        try:
            sha, path = _download(source, revision, token)
        except LocalEntryNotFoundError:
            raise FetchError(
                f"{source}: not in the local Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                "fetch it once online, or pass a local folder"
            ) from None
    else:
        with reaching_the_hub(source), answered_by_the_hub(source, revision):
            sha, path = with_retries(lambda: _download(source, revision, token))
    verify_download(source, sha, path)
    log.debug(f"[fetch] {source}@{sha}: {path}, every weight file matching the sha256 the Hub lists")
    return Ingredient(source, sha, path)


def _download(source: str, revision: str | None, token) -> tuple[str, Path]:
    """(commit sha, snapshot folder) of the files a model loads from: the configs and model.safetensors or the
    index, then the shards the index names, each by its exact name. The snapshot folder is named by the commit
    it holds: that is the pin. Downloading by the name asked (not by a sha looked up first) also records the
    branch in the cache (refs/main), so the same reference resolves there offline."""
    from huggingface_hub import hf_hub_download, snapshot_download

    path = Path(snapshot_download(source, revision=revision, allow_patterns=list(WEIGHT_PATTERNS), token=token))
    sha = path.name  # snapshots/<commit sha>
    try:
        files = weight_files(path)
    except RatatouilleError as error:  # its line names the folder inside the HF cache
        raise FetchError(str(error).replace(str(path), f"{source}@{sha}")) from None
    for file in files:  # plain .safetensors names in the snapshot (merge_engine.index_shards): safe to ask for
        if not file.is_file():
            hf_hub_download(source, file.name, revision=sha, token=token)
    return sha, path


def verify_download(source: str, sha: str, snapshot: Path) -> None:
    """Every LFS file of a cached snapshot must hash to the sha256 the Hub listed for it. huggingface_hub
    names an LFS blob by that sha256 (blobs/<sha256>) but checks only its size, so bytes altered on the way
    (or in the cache since) would be loaded, and reused by every later run, online or offline. A file that
    fails is removed from the cache (link and blob), so the next run downloads it afresh. A cache without
    symlinks (some Windows setups) keeps no blob names, and is not checked."""
    for file in sorted(snapshot.rglob("*")):
        blob = file.resolve()
        if not file.is_symlink() or not is_hex_digest(blob.name, 64):
            continue
        with open(blob, "rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() == blob.name:
                continue
        file.unlink()
        blob.unlink(missing_ok=True)
        raise FetchError(
            f"{source}@{sha}: {file.relative_to(snapshot).as_posix()} does not match the sha256 the Hub lists for "
            "it (corrupted or altered on the way or in the cache); removed from the cache: run again to download "
            "it afresh"
        )


def with_retries(call):
    """`call()`, asked again after 1, 2 and 4 s while the Hub fails transiently (5xx, 429, timeouts, dropped
    connections): huggingface_hub retries listings and downloads' metadata, not `model_info` or header reads,
    and one lost answer must not silently change which fine-tunes a soup holds."""
    wait = FIRST_WAIT_S
    for attempt in range(1, TRIES + 1):
        try:
            return call()
        except Exception as error:
            if attempt == TRIES or not is_transient(error):
                raise
            first_line = (str(error).strip().splitlines() or [""])[0]
            log.debug(f"[hub] {type(error).__name__}: {first_line}; asking again in {wait:g} s")
        time.sleep(wait)
        wait *= 2


def is_transient(error: BaseException) -> bool:
    """A failure that asking again may cure: an HTTP status the Hub's clients retry, or a connection that
    timed out or dropped (not one refused: nothing listens there)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return error.response.status_code in TRANSIENT_STATUSES
    names = {cls.__name__ for cls in type(error).__mro__}  # httpx's (or httpx2's) exceptions, by name
    return bool(names & {"TimeoutException", "NetworkError", "RemoteProtocolError"}) and "ConnectError" not in names


# What a reference names when it is not a Hub repo, by repo type.
LOCAL_KINDS = {"model": "model folder", "dataset": "dataset folder or file"}


@contextmanager
def answered_by_the_hub(repo: str, revision: str | None = None, repo_type: str = "model"):
    """The Hub's refusals as one line naming the repo and what to do (the clients' own first line is
    e.g. `403 Client Error.`, which names neither)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except GatedRepoError:
        raise FetchError(gated(repo, repo_type)) from None
    except RepositoryNotFoundError:
        raise FetchError(
            f"{repo}: no such {LOCAL_KINDS[repo_type]}, and no Hub {repo_type} of that name is visible "
            "(a private one needs --token)"
        ) from None
    except RevisionNotFoundError:
        raise FetchError(f"{repo}: no revision {revision!r} on the Hub") from None
    except HfHubHTTPError as error:
        raise FetchError(f"{repo}: {hub_reason(error)}") from None


def gated(repo: str, repo_type: str = "model") -> str:
    """What to do about a gated repo, in one line."""
    from huggingface_hub import constants

    page = f"{constants.ENDPOINT}/{constants.REPO_TYPES_URL_PREFIXES.get(repo_type, '')}{repo}"
    return (
        f"{repo} is gated: the Hub shares its files only with accounts that accepted its conditions; accept them "
        f"at {page}, then pass --token with a token of that account"
    )


def hub_reason(error: BaseException) -> str:
    """A Hub error in one line: huggingface_hub puts the status on the first line and the why on the next."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def dataset_revision(target: str, token, revision: str | None = None) -> str | None:
    """The commit sha of a Hub dataset at `revision` (default: its main branch), so the data are read at one
    pinned revision (None: local, or offline without a pin, where `datasets` reads its own cache)."""
    if not is_hub_id(target):
        return None
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return revision
    with reaching_the_hub(target), answered_by_the_hub(target, revision, repo_type="dataset"):
        return with_retries(lambda: HfApi(token=token).dataset_info(target, revision=revision).sha)


def weight_files(folder: Path) -> list[Path]:
    """The files a model folder's weights are, as transformers picks them (merge's rule: model.safetensors,
    else the shards its index names). Any other *.safetensors beside them is ignored everywhere (never
    downloaded, hashed, vetted or merged): transformers never loads it, so what is measured is what is trained."""
    from .merge_engine import WEIGHTS_INDEX_NAME, _weight_files

    if not (folder / WEIGHTS_INDEX_NAME).is_file() and not any(folder.glob("*.safetensors")):
        raise FetchError(f"{folder}: no safetensors weights (pickle checkpoints are not loaded)")
    return [folder / name for name in _weight_files(folder)]


def weight_file_digests(folder: Path, *, downloaded: bool = False) -> tuple[str, ...]:
    """sha256 (hex) of each of the folder's weight files (`weight_files`), as soup records name them. A single
    file is found without importing the merge engine (and torch), so hashing can start while torch loads. A
    `downloaded` snapshot's files link to cache blobs named by their sha256, which `verify_download` checked
    against the Hub's listing: those names are taken, not hashed again (a local folder's are never trusted; their
    digests are remembered by stat, `remembered_sha256`)."""
    single = folder / SINGLE_WEIGHTS_FILE
    files = [single] if single.is_file() else weight_files(folder)
    return tuple(
        file.resolve().name
        if downloaded and file.is_symlink() and is_hex_digest(file.resolve().name, 64)
        else remembered_sha256(file, chunk=HASH_CHUNK_BESIDE_WORK)
        for file in files
    )


def weights_digest(folder: Path) -> str:
    """sha256 of the folder's weights (`weight_files`): names local checkpoints by content."""
    digest = hashlib.sha256()
    for file in weight_files(folder):
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# DomainBed datasets by alias -> (Hub dataset, domain column, label column); docs/method.md lists them.
KNOWN_DATASETS = {
    "pacs": ("flwrlabs/pacs", "domain", "label"),
    "officehome": ("flwrlabs/office-home", "domain", "label"),
}
# Benchmarks docs/method.md leaves to "look up": no Hub copy with a domain column has been checked.
UNMAPPED_DATASETS = {"vlcs": "VLCS", "terraincognita": "TerraIncognita", "domainnet": "DomainNet"}


def resolve_dataset(
    name_or_alias: str, domain_column: str = "domain", label_column: str = "label"
) -> tuple[str, str, str]:
    """(dataset, domain column, label column): an alias maps to its known Hub copy; a local path or
    any other Hub id passes through with the columns given."""
    if "/" in name_or_alias or Path(name_or_alias).exists():  # a Hub id or a path, never an alias
        return name_or_alias, domain_column, label_column
    key = re.sub(r"[^a-z0-9]", "", name_or_alias.lower())
    if key in KNOWN_DATASETS:
        return KNOWN_DATASETS[key]
    if key in UNMAPPED_DATASETS:
        raise FetchError(
            f"{UNMAPPED_DATASETS[key]}: no Hub copy with a domain column is known to ratatouille-hub (none was "
            "checked, and this tool does not search for one); pass --target org/name of a Hub dataset with "
            "image, domain and label columns (--domain-column/--label-column if they are named otherwise), "
            "or a local folder"
        )
    return name_or_alias, domain_column, label_column
