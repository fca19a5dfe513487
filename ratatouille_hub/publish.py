"""Publish: push a soup folder to the Hub as one commit, so the model, its card and its recipe
arrive together and the card's `base_model` lineage makes the soup findable from its ingredients.

Exactly the files that make the published model are sent (weights, configs, card, recipe, results),
never run folders or caches. The card is validated by the Hub before anything is created or
uploaded. Pushing the same folder twice makes no second commit: huggingface_hub skips files whose
content the remote already has, and skips a commit left empty. Transient Hub answers (429, 5xx,
network errors) are retried; that is safe for the same reason. Every failure becomes one HubError
line that names the cause and never contains the token.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .card import card_for_repo
from .errors import RatatouilleError
from .fetch import TRANSIENT_STATUSES
from .merge_engine import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, MergeError, index_shards
from .provenance import RUN_FILE

SOUP_FILES = (
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "recipe.yaml",
    "merge.yaml",  # a merged model's replayable config
    "results.json",
    "diagnostics.png",
    "accuracies.png",
    RUN_FILE,  # a contributed run's provenance
)
REQUIRED_FILES = ("config.json", "README.md")  # a soup without its card would lose its lineage
RETRY_STATUSES = frozenset(TRANSIENT_STATUSES)  # what fetching retries, pushing retries too
RETRY_WAITS_S = (2.0, 4.0, 8.0)


class HubError(RatatouilleError, ValueError):
    """A push that failed, in one line: what was being done, the Hub's status, and what to do."""


class HeadMovedError(HubError):
    """A push made on top of `parent_commit` found the branch moved on (412): another commit landed first."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the branch pushed to (or the pull request was opened against)
    oid: str  # the branch head after the push (the pull request's head with one)
    url: str  # the commit's page
    changed: bool  # False when the remote already had these exact files: no commit was made
    pr_url: str | None = None  # the pull request opened with the commit (--create-pr)


def default_push_folder() -> Path:
    """The folder `push REPO_ID` pushes without FOLDER, when one is obvious: the current folder when it is a model
    folder, or the soup of the output folder one is in (`soup`, or recycle's default output's); else FOLDER is
    asked for, since guessing between several would push the wrong model."""
    from .config import RecipeConfig

    candidates = [Path("."), Path("soup"), Path(RecipeConfig.output) / "soup"]
    found = [folder for folder in candidates if all((folder / name).is_file() for name in REQUIRED_FILES)]
    if len(found) != 1:
        where = " and ".join(map(str, found)) + " are all model folders" if found else "none is a model folder"
        raise HubError(
            f"push needs the folder to push: ratatouille-hub push REPO_ID FOLDER (of {', '.join(map(str, candidates))}, "
            f"{where})"
        )
    return found[0]


def soup_files(folder: Path) -> list[str]:
    """The files of `folder` that make the published model: weights (one file, or index + shards) first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: no such soup folder")
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = index_shards(index)  # the check merge makes: a path in the index is never uploaded
        except MergeError as error:
            raise HubError(str(error)) from None
        weights = [WEIGHTS_INDEX_NAME, *shards]
    else:
        weights = [WEIGHTS_NAME]
    missing = [name for name in (*weights, *REQUIRED_FILES) if not (folder / name).is_file()]
    if missing:
        raise HubError(f"soup folder {folder} has no {', '.join(missing)}")
    return [*weights, *(name for name in SOUP_FILES if (folder / name).is_file())]


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    parent_commit: str | None = None,
    create_pr: bool = False,
) -> PushResult:
    """Create `repo_id` if needed (an existing repo keeps its visibility) and the branch `revision`
    (default main), then commit the soup's files in one commit, or with `create_pr` open a pull request against
    the branch with it; with `parent_commit`, only on top of that commit (HeadMovedError when the branch has
    moved on), so a push made from what was read loses no commit.

    The pushed copy of the card names the repo (card.card_for_repo); the folder's own is left as it is. The
    token comes from `token`, else HF_TOKEN or the saved login (`token=False`: anonymous).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise HubError(f"push to {repo_id} failed: the repo id must be namespace/name (e.g. me/pacs-soup)")
    folder = Path(folder)
    branch = revision or "main"
    names = soup_files(folder)
    api = HfApi(token=token)
    secret = token if isinstance(token, str) else None if token is False else get_token()
    with _one_line_errors(repo_id, secret):
        card = _card_for_repo(folder / "README.md", repo_id)
        _with_retries(lambda: _validate_card(card))
        head = _with_retries(lambda: _prepare(api, repo_id, branch, private, create=parent_commit is None))
        streamed = _with_retries(lambda: not _takes_xet(api, repo_id))

        def commit():
            """What upload_folder would build, except the card comes from memory; fresh operations per try."""
            with contextlib.ExitStack() as files:

                def content(name: str):
                    if name == "README.md":
                        return card.encode()
                    return files.enter_context(open(folder / name, "rb")) if streamed else folder / name

                return api.create_commit(
                    repo_id,
                    [CommitOperationAdd(name, content(name)) for name in names],
                    commit_message=commit_message or "Upload Model Ratatouille soup (ratatouille-hub)",
                    revision=branch,
                    parent_commit=parent_commit,
                    create_pr=create_pr,
                )

        pushed = _with_retries(commit)
    return PushResult(repo_id, branch, pushed.oid, pushed.commit_url, pushed.oid != head, pushed.pr_url)


def push_and_say(folder: Path, repo_id: str, options, token, echo=None, *, create_pr: bool = False) -> PushResult:
    """Push `folder` in one commit as `options` (PublishOptions or PushOptions: private, branch, commit message)
    ask, and say what landed: the commit's address or the pull request's, or that the repo already had these
    files."""
    from .safe_text import say

    result = push_folder(
        folder,
        repo_id,
        private=options.private,
        revision=options.revision,
        token=token,
        commit_message=options.commit_message,
        create_pr=create_pr,
    )
    if not result.changed:
        line = f"no changes: {repo_id}@{result.oid[:8]} already has these files"
    elif result.pr_url:
        line = f"pushed {folder} to {repo_id} as pull request {result.pr_url}"
    else:
        line = f"pushed {folder} to {result.url}"
    (echo or say)(line)
    return result


def _card_for_repo(path: Path, repo_id: str) -> str:
    """The card's text as pushed to `repo_id`; a card whose metadata does not parse is refused here."""
    try:
        return card_for_repo(path.read_text(encoding="utf-8"), repo_id)
    except (ValueError, yaml.YAMLError) as error:
        raise HubError(f"the model card's metadata is invalid: {_card_problem(error)}") from None


def _takes_xet(api, repo_id: str) -> bool:
    """Whether the client's Xet upload can be used for `repo_id`. huggingface_hub uploads through Xet whenever
    hf_xet is installed, without asking the Hub; a Hub without Xet storage (an on-premise Hub, the local Hub)
    answers `xetEnabled: false` when asked, and there the files go as open files, which the client sends by the
    git-LFS protocol instead (its own fallback for streams). One request, made only when Xet would be used."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if constants.HF_HUB_DISABLE_XET or importlib.util.find_spec("hf_xet") is None:  # the client's own test
        return False
    response = get_session().get(
        f"{api.endpoint}/api/models/{repo_id}",
        params={"expand": "xetEnabled"},
        headers=build_hf_headers(token=api.token),
    )
    hf_raise_for_status(response)
    return response.json().get("xetEnabled") is not False


def _prepare(api, repo_id: str, branch: str, private: bool, create: bool = True) -> str:
    """Make sure the repo and branch exist (a pull request's ref, refs/pr/N, is pushed to as it is, as hf upload
    does); returns the branch head before the push. Not `create`: a push on top of a commit it read, whose
    branch must still be there (re-created from main, it would take the update onto main's files)."""
    if create:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main" and not branch.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    return api.model_info(repo_id, revision=branch).sha


def _validate_card(card: str) -> None:
    """The Hub's own metadata check (POST /api/validate-yaml), before the repo is even created."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(card).validate()
    except (ValueError, yaml.YAMLError) as error:  # a 400 from the Hub, or YAML that does not parse
        raise HubError(f"the model card's metadata is invalid: {_card_problem(error)}") from None


def _card_problem(error: Exception) -> str:
    """The Hub answers `{"error": ...}`; a local YAML error is its own message."""
    text = str(error)
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        text = json.loads(text)["error"]
    return " ".join(text.split())


def _with_retries(call):
    """`call()`, tried again after each transient failure; safe because a repeated push is a no-op."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    for wait in (*RETRY_WAITS_S, None):
        try:
            return call()
        except (HfHubHTTPError, httpx.TransportError) as error:
            transient = not isinstance(error, HfHubHTTPError) or _status(error) in RETRY_STATUSES
            if wait is None or not transient:
                raise
            time.sleep(wait)


def _status(error) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


@contextlib.contextmanager
def _one_line_errors(repo_id: str, secret: str | None):
    """Turn the client's errors into one HubError line, with the token scrubbed from anything quoted."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    action = f"push to {repo_id}"

    def scrub(text: str) -> str:
        return " ".join((text.replace(secret, "***") if secret else text).split())

    try:
        yield
    except HfHubHTTPError as error:
        status = _status(error)
        detail = scrub(error.server_message or str(error))
        if status == 401:
            problem = (
                "not authorised (401): the token was refused — check HF_TOKEN or --token"
                if secret
                else "not authorised (401) — set HF_TOKEN or pass --token"
            )
        elif status == 412:
            raise HeadMovedError(f"{action} failed: another commit landed first (412): {detail}") from None
        elif status == 403:
            problem = f"forbidden (403) — the token cannot write to {repo_id.split('/')[0]}: use a write token"
        elif status in RETRY_STATUSES:
            problem = f"the Hub kept answering {status} after {len(RETRY_WAITS_S) + 1} tries — try again later"
        else:
            problem = f"{'not found (404)' if status == 404 else status}: {detail}"
        raise HubError(f"{action} failed: {problem}") from None
    except httpx.TransportError as error:
        raise HubError(
            f"{action} failed: cannot reach {constants.ENDPOINT} ({scrub(str(error)) or type(error).__name__})"
        ) from None
    except ValueError as error:  # the client's own checks, e.g. metadata refused at commit time
        raise HubError(f"{action} failed: {scrub(str(error))}") from None
    except ConnectionError as error:  # hf_xet's, when a Hub that did not say it lacks Xet refuses it
        if "xet-write-token" not in str(error):
            raise
        raise HubError(
            f"{action} failed: the Hub at {constants.ENDPOINT} gave no Xet upload token ({scrub(str(error))}); "
            "set HF_HUB_DISABLE_XET=1 to upload by git-LFS"
        ) from None
