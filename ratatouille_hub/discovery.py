"""Discover: which checkpoints can join a soup of the base, decided from safetensors headers alone.

A candidate must carry the base's backbone tensors with identical names, shapes and dtypes; only
the classification head may differ (auxiliary heads are dropped anyway). Checking headers first
means nothing incompatible is downloaded or trained.

On the Hub, fine-tunes of a base are found through the lineage tag `base_model:finetune:<base>` and
vetted at one pinned commit each, cheapest checks first: lineage, leakage of the target dataset,
weight formats, config.json (a few kB), then the safetensors headers (ranged reads of a few kB).
Weights are never downloaded here, no pickle is ever loaded and no code from the Hub is ever run.

Which tensors form the head is read from the base's architecture, not guessed from names: the base
model is built from its config.json with empty weights (meta device: no memory, no remote code) and
`models.head_parameter_names` names the final linear layer's weight and bias, as the recipe does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import RatatouilleError
from .fetch import TRIES, FetchError, gated, hub_reason, is_transient, reaching_the_hub, weight_files, with_retries
from .safe_text import terminal_safe

TensorSignature = tuple[str, tuple[int, ...]]  # (dtype, shape)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NOT_FINETUNE_RELATIONS = {
    "merge": "a merge of other models, not a fine-tune",
    "adapter": "an adapter, not full weights",
    "quantized": "quantized weights, not averageable",
}
ACCEPTED = "backbone matches the base"


class DiscoverError(RatatouilleError, ValueError):
    """The base itself cannot be vetted: missing, not safetensors, or an unknown architecture."""


@dataclass(frozen=True)
class Candidate:
    """One fine-tune of the base as discovery judged it, at the commit it was judged on."""

    repo_id: str
    revision: str  # commit sha: fetch exactly this, so what was vetted is what is trained
    downloads: int
    accepted: bool
    reason: str
    readable: bool = True  # False: the Hub did not answer about it (its verdict is unknown, not a refusal)

    @property
    def verdict(self) -> str:
        return "accepted" if self.accepted else "refused" if self.readable else "unreadable"


def local_signature(folder: Path) -> dict[str, TensorSignature]:
    """Tensor names -> (dtype, shape) of a local model folder's weights (`weight_files`), from the headers only."""
    from .merge_engine import read_safetensors_header

    signature: dict[str, TensorSignature] = {}
    for file in weight_files(Path(folder)):
        for name, info in read_safetensors_header(file).items():
            signature[name] = (info.dtype, tuple(info.shape))
    return signature


def backbone_mismatch(
    base: Mapping[str, TensorSignature], candidate: Mapping[str, TensorSignature], head_names: set[str]
) -> str | None:
    """Why `candidate` cannot be averaged with `base` (None when it can); head tensors may differ."""
    missing = sorted(set(base) - set(candidate) - head_names)
    if missing:
        return f"missing backbone tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(set(candidate) - set(base) - head_names)
    if extra:
        return f"unexpected tensor {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
    for name in sorted(set(base) - head_names):
        (base_dtype, base_shape), (dtype, shape) = base[name], candidate[name]
        if base_shape != shape:
            return f"tensor {name} has shape {list(shape)}, base has {list(base_shape)}"
        if base_dtype != dtype:
            return f"tensor {name} has dtype {dtype}, base has {base_dtype}"
    return None


def hub_signature(api, repo_id: str, revision: str) -> dict[str, TensorSignature]:
    """Tensor names -> (dtype, shape) of a Hub repo at `revision`, from ranged reads of its headers."""
    metadata = api.get_safetensors_metadata(repo_id, revision=revision)
    return {
        name: (info.dtype, tuple(info.shape))
        for file in metadata.files_metadata.values()
        for name, info in file.tensors.items()
    }


def _meta_classifier(config_file: Path):
    """The classifier transformers builds from `config_file`, weightless (no code run, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(str(Path(config_file).parent), trust_remote_code=False)
    with init_empty_weights():  # parameters on the meta device; buffers stay real, as some inits need
        return AutoModelForImageClassification.from_config(config, trust_remote_code=False)


def head_names_of(config_file: Path, stored: Iterable[str] = ()) -> set[str]:
    """The head's tensor names for the architecture in `config_file`, from a weightless meta model, as the
    checkpoint whose tensor names are `stored` holds them: a timm checkpoint as the Hub stores it names its
    head `classifier.weight`, where transformers' model holds `timm_model.classifier.weight`."""
    from .models import head_parameter_names

    model = _meta_classifier(config_file)
    stored, prefix = set(stored), f"{model.base_model_prefix}."
    return {
        name.removeprefix(prefix) if name not in stored and name.removeprefix(prefix) in stored else name
        for name in head_parameter_names(model)
    }


class ClassifierNames(NamedTuple):
    """How a checkpoint's stored tensor names read in the classifier transformers builds from its config."""

    names: dict[str, str]  # stored name -> the classifier's
    dropped: frozenset[str]  # stored tensors the classifier lacks (a pooler), under its prefix: never compared

    @property
    def headless(self) -> bool:
        return bool(self.dropped) or any(stored != name for stored, name in self.names.items())

    def renamed(self, by_stored_name: Mapping[str, object]) -> dict:
        """`by_stored_name` (a signature) keyed by the classifier's names, what it lacks left out."""
        return {self.names[name]: value for name, value in by_stored_name.items() if name in self.names}


def classifier_names(config_file: Path, stored: Iterable[str]) -> ClassifierNames:
    """A classifier's (or timm's) stored names are its own. A headless base's (its config's architectures name
    the classifier's body, a ViTModel, a Dinov2Model: the Hub's usual bases) take the classifier's prefix
    (`vit.`) where the classifier saves them so, and what it lacks is dropped: that is how from_pretrained
    loads such a base, and how its fine-tunes name its tensors (transformers' own revert_weight_conversion
    says how the classifier names them on disk)."""
    from transformers.core_model_loading import revert_weight_conversion

    stored = list(stored)
    model = _meta_classifier(config_file)
    prefix = model.base_model_prefix
    body = getattr(model, prefix, None) if prefix else None
    if body is None or type(body).__name__ not in (model.config.architectures or ()):
        return ClassifierNames({name: name for name in stored}, frozenset())
    saved = set(revert_weight_conversion(model, model.state_dict()))
    names, dropped = {}, set()
    for name in stored:
        if name in saved:
            names[name] = name
        elif f"{prefix}.{name}" in saved:
            names[name] = f"{prefix}.{name}"
        else:
            dropped.add(f"{prefix}.{name}")
    return ClassifierNames(names, frozenset(dropped))


@dataclass(frozen=True)
class _Base:
    """What every candidate is compared with: the base at one commit."""

    model_type: str | None
    signature: dict[str, TensorSignature]
    head_names: set[str]


def discover_finetunes(
    base: str, *, target: str | None = None, limit: int = 20, token: str | bool | None = None
) -> list[Candidate]:
    """The `limit` most-downloaded fine-tunes of the Hub model `base`, each accepted or refused with a reason.

    `target` (a Hub id, an alias or a local path of the target dataset) refuses fine-tunes whose card
    lists it: their featurizer has seen the held-out domain (leakage). Pickle-only repos are always
    refused: the recipe loads safetensors only, and unpickling a stranger's file can run code.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise FetchError(f"{base}: discovery lists fine-tunes on the Hub, and HF_HUB_OFFLINE is set; pass --aux")
    api = HfApi(token=token)
    with reaching_the_hub(base):
        vetted = _vet_base(api, base)
        listed = list(api.list_models(filter=f"base_model:finetune:{base}", sort="downloads", limit=limit))
        return [_vet(api, vetted, model, target) for model in listed]


def format_candidates(candidates: list[Candidate]) -> str:
    """A plain-text table of the verdicts, most downloaded first, for the terminal. Every cell is written
    terminal-safe: reasons quote configs and file names from strangers' repos."""
    header = ("id", "revision", "downloads", "verdict", "reason")
    rows = [
        tuple(terminal_safe(cell) for cell in (c.repo_id, c.revision[:8], str(c.downloads), c.verdict, c.reason))
        for c in candidates
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(w) if i == 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def _vet_base(api, base: str) -> _Base:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        NotASafetensorsRepoError,
        RepositoryNotFoundError,
    )

    from .models import ArchitectureError

    def read() -> tuple[str, Path, dict[str, TensorSignature]]:
        sha = api.model_info(base).sha
        config_file = Path(hf_hub_download(base, "config.json", revision=sha, token=api.token))
        return sha, config_file, hub_signature(api, base, sha)

    try:
        sha, config_file, signature = with_retries(read)
    except GatedRepoError:
        raise DiscoverError(f"base {gated(base)}") from None
    except RepositoryNotFoundError:
        raise DiscoverError(f"base {base}: not found on the Hub (404), or private without a token") from None
    except HfHubHTTPError as error:
        raise DiscoverError(f"base {base}: {hub_reason(error)}") from None
    except NotASafetensorsRepoError:
        raise DiscoverError(f"base {base} has no safetensors weights (model.safetensors or an index)") from None
    except ValueError as error:  # e.g. an id the clients refuse
        raise DiscoverError(f"base {base}: {_first_line(error)}") from None
    try:
        head_names = head_names_of(config_file, signature)
    except (ArchitectureError, ValueError) as error:  # transformers: unknown model_type; models: no linear head
        cached = str(config_file.parent)  # transformers names the folder in the HF cache, not the repo
        raise DiscoverError(f"base {base}: {_first_line(error).replace(cached, f'{base}@{sha}')}") from None
    model_type = json.loads(config_file.read_text()).get("model_type")
    read = classifier_names(config_file, signature)  # a headless base: as its fine-tunes name it
    return _Base(model_type, read.renamed(signature), head_names | read.dropped)


def _vet(api, base: _Base, listed, target: str | None) -> Candidate:
    """One candidate's verdict, asked again while the Hub fails transiently; a repo that still cannot be read
    (gated, private, failing) is marked unreadable, not fatal, and not silently dropped."""
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError, SafetensorsParsingError

    def judge() -> tuple[str, str | None]:
        info = api.model_info(listed.id, files_metadata=True)
        try:
            return info.sha, _refusal(api, base, info, [*(listed.tags or []), *(info.tags or [])], target)
        except NotASafetensorsRepoError:
            return info.sha, "safetensors files but no model.safetensors or model.safetensors.index.json"
        except SafetensorsParsingError as error:
            return info.sha, f"corrupt safetensors header: {_first_line(error)}"

    downloads = listed.downloads or 0
    try:
        sha, reason = with_retries(judge)
    except Exception as error:
        if not (isinstance(error, HfHubHTTPError) or is_transient(error)):
            raise
        return Candidate(listed.id, listed.sha or "", downloads, False, _unreadable(listed.id, error), readable=False)
    return Candidate(listed.id, sha, downloads, reason is None, reason or ACCEPTED)


def _unreadable(repo_id: str, error: BaseException) -> str:
    """Why the Hub gave no verdict on a candidate, and whether asking again may help."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        return f"gated: accept its conditions at {constants.ENDPOINT}/{repo_id}, then pass --token"
    if isinstance(error, RepositoryNotFoundError):
        return "no longer visible (private or deleted since it was listed)"
    if isinstance(error, HfHubHTTPError):
        cause = f"{error.response.status_code} {error.response.reason_phrase}".strip()
    else:
        cause = f"{type(error).__name__}: {_first_line(error)}"
    return f"{cause}, still after {TRIES} tries" if is_transient(error) else cause


def unsafe_file_name(name: str) -> str | None:
    """Why a file name listed by a repo could write outside the download folder or act on a terminal (None:
    it cannot). The clients refuse some of these only once downloading, which would stop the whole recipe."""
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "absolute"
    if "\\" in name:
        return "backslash"
    if ".." in name.split("/"):
        return "'..' in it"
    if not name.isprintable():
        return "control character"
    return None


def _refusal(api, base: _Base, info, tags: list[str], target: str | None) -> str | None:
    """Why this fine-tune cannot be recycled (None when it can), cheapest evidence first."""
    from huggingface_hub import hf_hub_download

    from .card import RUN_TAG

    if RUN_TAG in tags:  # contributed by `ratatouille-hub contribute`: trained on some recipe's target domains
        return "a ratatouille run, not a community fine-tune"
    for relation, reason in NOT_FINETUNE_RELATIONS.items():
        if any(tag.startswith(f"base_model:{relation}:") for tag in tags):
            return reason
    remote_code = "needs remote code (auto_map in config.json), which is never run"
    if "custom_code" in tags:
        return remote_code
    if target:
        leaked = _lists_dataset(info, tags, target)
        if leaked:
            return f"trained on the target dataset (card lists {leaked}): leakage"
    files = {sibling.rfilename for sibling in info.siblings or []}
    unsafe = next((name for name in sorted(files) if unsafe_file_name(name)), None)
    if unsafe is not None:
        return f"unsafe file name {unsafe!r} ({unsafe_file_name(unsafe)}): nothing is downloaded from it"
    if "adapter_config.json" in files:
        return NOT_FINETUNE_RELATIONS["adapter"]
    if not any(name.endswith(".safetensors") for name in files):
        pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
        if pickles:
            return f"pickle weights only ({', '.join(pickles)}): never unpickled; needs safetensors"
        return "no model weights"
    if "config.json" not in files:
        return "no config.json"
    config_file = hf_hub_download(info.id, "config.json", revision=info.sha, token=api.token)
    try:
        config = json.loads(Path(config_file).read_text())
    except (ValueError, RecursionError):
        return "config.json is not valid JSON"
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    if "auto_map" in config:
        return remote_code
    if config.get("model_type") != base.model_type:
        return f"architecture {config.get('model_type')}, base is {base.model_type}"
    return backbone_mismatch(base.signature, hub_signature(api, info.id, info.sha), base.head_names)


def _lists_dataset(info, tags: list[str], target: str) -> str | None:
    """The dataset the card lists that is the target (by name: any copy of it leaks), or None."""
    card = info.card_data.to_dict() if info.card_data is not None else {}
    listed = card.get("datasets") or []
    listed = listed if isinstance(listed, list) else [listed]
    listed += [tag.removeprefix("dataset:") for tag in tags if tag.startswith("dataset:")]
    wanted = _dataset_key(target)
    return next((str(name) for name in listed if _dataset_key(str(name)) == wanted), None)


def _dataset_key(name: str) -> str:
    """`flwrlabs/office-home`, `someone/Office_Home`, the alias `OfficeHome` and a local folder
    `./officehome` all name one dataset, at any revision (`id@sha`): a fine-tune on any copy of the target leaks."""
    return re.sub(r"[^a-z0-9]", "", name.rstrip("/").rsplit("/", 1)[-1].split("@")[0].lower())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
