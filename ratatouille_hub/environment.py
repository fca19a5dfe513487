"""What `--version` and `env` report: the versions, devices and Hub settings a bug report needs, laid out as
`hf env` lays out its own (one `- key: value` line each), and never the token itself."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from urllib.parse import urlsplit, urlunsplit

LIBRARIES = ("torch", "transformers", "datasets", "huggingface_hub", "safetensors", "accelerate")
# Variables that change what a run does or where it reads and writes (set ones are reported with their value)
VARIABLES = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_XET",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "MALLOC_MMAP_MAX_",  # the allocator settings ratatouille_hub.allocator applies where the user set none
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # where huggingface_hub's get_token looks first


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def package_version(name: str) -> str:
    """The installed distribution's version (read from its metadata, without importing it)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_lines() -> str:
    """`--version`: this package's version, then the libraries whose versions change its numbers."""
    libraries = ", ".join(f"{name} {package_version(name)}" for name in ("torch", "transformers", "huggingface_hub"))
    return f"ratatouille-hub {package_version('ratatouille-hub')}\n{libraries}, Python {platform.python_version()}"


def environment_report() -> dict[str, str]:
    """Everything `env` prints, by key; the token only as present or absent, and from where."""
    import torch
    from huggingface_hub import constants, get_token

    report = {
        "ratatouille-hub version": package_version("ratatouille-hub"),
        "Platform": platform.platform(),
        "Python version": platform.python_version(),
        **{f"{name} version": package_version(name) for name in LIBRARIES},
        "CPU cores": f"{usable_cpus()} usable of {os.cpu_count()}",
        "torch threads": str(torch.get_num_threads()),
        "CUDA": _cuda(torch),
        "MPS": "available" if torch.backends.mps.is_available() else "not available",
        "HF endpoint": _without_credentials(constants.ENDPOINT),
        "HF cache": constants.HF_HUB_CACHE,
        "HF_HUB_OFFLINE": str(constants.HF_HUB_OFFLINE),
        "Hub token": _token_source(get_token() is not None),
    }
    report.update({name: os.environ[name] for name in VARIABLES if name in os.environ})
    return report


def format_report(report: dict[str, str]) -> str:
    lines = "\n".join(f"- {key}: {value}" for key, value in report.items())
    return f"Copy-and-paste the text below in your GitHub issue.\n\n{lines}"


def _cuda(torch) -> str:
    if not torch.cuda.is_available():
        return "not available"
    names = ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count()))
    return f"available, {torch.cuda.device_count()} device(s): {names} (CUDA {torch.version.cuda})"


def _token_source(present: bool) -> str:
    if not present:
        return "absent"
    variable = next((name for name in TOKEN_VARIABLES if os.environ.get(name)), None)
    return f"present (from {variable})" if variable else "present (saved login)"


def _without_credentials(url: str) -> str:
    """`url` without a user:password@ part, which would otherwise land in a pasted bug report."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url
