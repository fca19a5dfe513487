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
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
for _name in _USER_SETTINGS:
    os.environ.pop(_name, None)
# The session Hub keeps the real Hub's rules (a write needs a valid token; a user writes only into their own
# namespace): the clients write as its admin, unless a test names another token.
SESSION_ADMIN = "hf_session_admin"
os.environ["HF_TOKEN"] = SESSION_ADMIN

import pytest  # noqa: E402

from ratatouille_hub import testing  # noqa: E402
from ratatouille_hub.localhub.server import LocalHub  # noqa: E402

_namespaces = itertools.count()
CONTRIBUTORS = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol"}  # token -> user, own namespaces


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """The session's LocalHub, at HF_ENDPOINT: the unmodified HF clients talk to it."""
    with LocalHub(tmp_path_factory.mktemp("local-hub"), port=HUB_PORT, token=SESSION_ADMIN, users=CONTRIBUTORS) as hub:
        yield hub


@pytest.fixture(scope="session")
def new_hub_namespace(local_hub):
    """Call it for a namespace nothing else in the session uses (for module-scoped fixtures)."""
    return lambda: f"test-{next(_namespaces)}"


@pytest.fixture
def hub_namespace(new_hub_namespace) -> str:
    """A namespace of this test's own, so it can create `f"{hub_namespace}/name"` repos freely."""
    return new_hub_namespace()


# -- tiny checkpoints for the recipe, training and CLI tests ------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """A tiny ResNet base (10 pretraining classes, ~6k parameters) and two community-style copies of it
    with perturbed backbones (BatchNorm statistics included), other heads and their own integer buffers,
    each a transformers folder with a 16 px Pillow image processor.
    """
    import torch

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    processor = testing.tiny_processor(16)
    base = testing.tiny_resnet(0, names=[f"digit-{i}" for i in range(10)])
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(10)
    folders = {"base": testing.save_tiny_checkpoint(root / "base", base, processor=processor)}
    for k in (1, 2):
        model = testing.tiny_resnet(k, names=[f"aux{k}-class-{i}" for i in range(3 + k)])  # another head
        finetune = testing.finetune_of(base, model, 100 + k, integer_value=100 * k)
        folders[f"aux{k}"] = testing.save_tiny_checkpoint(root / f"aux{k}", finetune, processor=processor)
    return folders


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules of tiny tensors (`pytestmark = pytest.mark.usefixtures(...)`): as
    fast, and it does not stall when other processes share the cores (two threads made them 4x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_checkpoints):
    """The tiny checkpoints plus a small 16 px `shapes` target in the Hub layout (parquet + card)."""
    from types import SimpleNamespace

    from ratatouille_hub.toy import world as toyworld

    target = testing.write_hub_dataset(
        toyworld.target_dataset(per_class_per_domain=6, size=16),
        tmp_path_factory.mktemp("tiny-world") / "shapes",
        card="---\nlicense: apache-2.0\n---\n# shapes\n",
    )
    return SimpleNamespace(
        base=tiny_checkpoints["base"], aux=(tiny_checkpoints["aux1"], tiny_checkpoints["aux2"]), target=target
    )


def pytest_configure(config):
    if os.environ.get("RATATOUILLE_WRITE_ERRORS_MD") and config.getoption("numprocesses", None):
        raise pytest.UsageError("RATATOUILLE_WRITE_ERRORS_MD needs every refusal in one process: run pytest without -n")


def pytest_sessionfinish(session, exitstatus):
    """With RATATOUILLE_WRITE_ERRORS_MD set, docs/errors.md's table is rewritten from the refusals seen."""
    if os.environ.get("RATATOUILLE_WRITE_ERRORS_MD"):
        import refusals

        refusals.write_docs()
