"""Test-session setup.

Hub fixtures: the Hugging Face libraries read HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE and
HF_HUB_DISABLE_XET once, at import time, so they are set here, before any test module imports them:
every client in the session talks to one LocalHub on a port chosen now, with a throwaway cache.
"""

import atexit
import itertools
import os
import shutil
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HUB_PORT = _free_port()
_HF_HOME = tempfile.mkdtemp(prefix="ratatouille-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{HUB_PORT}",
    HF_HOME=_HF_HOME,
    HF_HUB_DISABLE_XET="1",  # "lfs" uploads then use the git-LFS protocol the local Hub speaks
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
)
_USER_SETTINGS = (  # the user's token, caches and offline switches must not leak into the tests
    "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
)  # fmt: skip
for _name in _USER_SETTINGS:
    os.environ.pop(_name, None)

import pytest  # noqa: E402

from ratatouille_hub.hub_server import LocalHub  # noqa: E402

_namespaces = itertools.count()


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """The session's LocalHub, at HF_ENDPOINT: the unmodified HF clients talk to it."""
    with LocalHub(tmp_path_factory.mktemp("local-hub"), port=HUB_PORT) as hub:
        yield hub


@pytest.fixture(scope="session")
def new_hub_namespace(local_hub):
    """Call it for a namespace nothing else in the session uses (for module-scoped fixtures)."""
    return lambda: f"test-{next(_namespaces)}"


@pytest.fixture
def hub_namespace(new_hub_namespace) -> str:
    """A namespace of this test's own, so it can create `f"{hub_namespace}/name"` repos freely."""
    return new_hub_namespace()
