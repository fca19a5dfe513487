"""One typed, frozen config drives the Python API, the CLI flags and the saved `recipe.yaml`.

The CLI builds its flags from the dataclass fields (name, type, default and `help` metadata), so a
new option is added in one place. A recipe saved next to a soup replays with `--config recipe.yaml`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STRATEGIES = ("ratatouille", "soup", "erm", "fusing")
AVERAGING_STRATEGIES = ("ratatouille", "soup")


class ConfigError(ValueError):
    """A recipe that cannot run: unknown keys, impossible values."""


class Options:
    """Persistence shared by the frozen option dataclasses: plain dicts, YAML, typed coercion."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Options:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown recipe keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(hints[k], v, k) for k, v in data.items()})

    def save_yaml(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> Options:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of option names to values")
        return cls.from_dict(data)

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class RecipeConfig(Options):
    """Everything that defines a Model Ratatouille run (see METHOD.md for the reference values)."""

    base: str = _opt("", "base model: a Hub id or a local transformers model folder", required=True)
    target: str = _opt("", "target dataset: a Hub id, a local datasets folder or a parquet file", required=True)
    test_domain: str | None = _opt(None, "held-out domain (default: the first domain in sorted order)")
    aux: tuple[str, ...] = _opt(
        (), "auxiliary fine-tunes to recycle (Hub ids, id@sha, or folders); default: discovered on the Hub"
    )
    aux_limit: int = _opt(16, "with no --aux: how many discovered fine-tunes of the base to consider")
    domain_column: str = _opt("domain", "dataset column holding the domain name")
    label_column: str = _opt("label", "dataset column holding the class label")
    image_column: str = _opt("image", "dataset column holding the image")
    strategy: str = _opt(
        "ratatouille",
        "how runs start and what the result is. ratatouille: run 0 from the base, runs 1..len(aux) from "
        "one recycled fine-tune each, the rest from the base, averaged (METHOD.md: 4 + 16); soup: every run "
        "from the base, averaged; erm: every run from the base, the best run by validation kept; fusing: each "
        "run from a random convex combination of the base and one recycled fine-tune per auxiliary dataset, "
        "the best run kept",
        choices=STRATEGIES,
    )
    method: str = _opt(
        "uniform",
        "how ratatouille and soup average the runs (erm and fusing report both)",
        choices=("uniform", "greedy"),
    )
    runs: int = _opt(20, "target fine-tunes to average")
    steps: int = _opt(5001, "optimisation steps per fine-tune")
    eval_every: int = _opt(100, "evaluate on training-domain validation every N steps (and at the last)")
    lp_steps: int = _opt(5001, "steps of the shared linear probe on the frozen base")
    lp_lr: float = _opt(5e-5, "learning rate of the linear probe")
    warmup_steps: int = _opt(200, "head-only steps before full fine-tuning of a recycled init")
    batch_size: int = _opt(32, "images per training domain per step")
    lr: float = _opt(5e-5, "learning rate of run 0 (Adam, constant)")
    lr_choices: tuple[float, ...] = _opt((1e-5, 3e-5, 5e-5), "learning rates drawn by runs 1..N-1")
    weight_decay: float = _opt(0.0, "weight decay of run 0")
    weight_decay_choices: tuple[float, ...] = _opt((1e-4, 1e-6), "weight decays drawn by runs 1..N-1")
    dropout: float = _opt(0.0, "feature dropout before the head, run 0")
    dropout_choices: tuple[float, ...] = _opt((0.0, 0.1, 0.5), "feature dropouts drawn by runs 1..N-1")
    holdout_fraction: float = _opt(0.2, "share of each training domain kept for validation")
    image_size: int | None = _opt(None, "training resolution (default: the base's image processor size)")
    augment: bool = _opt(True, "DomainBed augmentation on training images")
    bn_policy: str = _opt(
        "average",
        "BatchNorm running statistics of the soup: average = mean of the runs' (frozen) statistics; "
        "reestimate = recomputed on target training images after averaging",
        choices=("average", "reestimate"),
    )
    precision: str = _opt(
        "auto", "bf16 autocast: auto = where it speeds training (CUDA)", choices=("auto", "no", "bf16")
    )
    seed: int = _opt(0, "trial seed: data split, and each run's initialisation, batches and augmentation")
    output: str = _opt("ratatouille-output", "folder for runs and the soup")

    def __post_init__(self) -> None:
        problems = []
        if not self.base:
            problems.append("base is required")
        if not self.target:
            problems.append("target is required")
        for name in ("runs", "steps", "eval_every", "lp_steps", "batch_size", "aux_limit"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("lr", "lp_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("lr_choices",):
            if any(not v > 0 for v in getattr(self, name)):
                problems.append(f"{name} must all be > 0 (got {list(getattr(self, name))})")
        if self.weight_decay < 0 or any(v < 0 for v in self.weight_decay_choices):
            problems.append("weight decays must be >= 0")
        if not all(0 <= v < 1 for v in (self.dropout, *self.dropout_choices)):
            problems.append("dropouts must be in [0, 1)")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not 0.0 < self.holdout_fraction < 1.0:
            problems.append(f"holdout_fraction must be in (0, 1) (got {self.holdout_fraction})")
        if self.image_size is not None and self.image_size < 8:
            problems.append(f"image_size must be at least 8 (got {self.image_size})")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name} must be one of {', '.join(choices)} (got {getattr(self, f.name)!r})")
        for name in ("lr_choices", "weight_decay_choices", "dropout_choices"):
            if not getattr(self, name):
                problems.append(f"{name} must not be empty")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class IntertrainConfig(Options):
    """Auxiliary fine-tunes of a base on one dataset (METHOD.md step 2): what `recycle` later recycles.

    Hyperparameters are drawn per run exactly as for target runs (run 0 takes the defaults); the
    last-step weights are kept, as the reference code does (no validation split).
    """

    base: str = _opt("", "base model: a Hub id or a local transformers model folder", required=True)
    dataset: str = _opt("", "auxiliary dataset: a Hub id, a local datasets folder or a parquet file", required=True)
    label_column: str = _opt("label", "dataset column holding the class label")
    image_column: str = _opt("image", "dataset column holding the image")
    runs: int = _opt(1, "fine-tunes to make, each with its own seed and hyperparameters")
    steps: int = _opt(5001, "optimisation steps per fine-tune")
    batch_size: int = _opt(32, "images per step")
    lr: float = _opt(5e-5, "learning rate of run 0 (Adam, constant)")
    lr_choices: tuple[float, ...] = _opt((1e-5, 3e-5, 5e-5), "learning rates drawn by runs 1..N-1")
    weight_decay: float = _opt(0.0, "weight decay of run 0")
    weight_decay_choices: tuple[float, ...] = _opt((1e-4, 1e-6), "weight decays drawn by runs 1..N-1")
    dropout: float = _opt(0.0, "feature dropout before the head, run 0")
    dropout_choices: tuple[float, ...] = _opt((0.0, 0.1, 0.5), "feature dropouts drawn by runs 1..N-1")
    image_size: int | None = _opt(None, "training resolution (default: the base's image processor size)")
    augment: bool = _opt(True, "DomainBed augmentation on training images")
    precision: str = _opt(
        "auto", "bf16 autocast: auto = where it speeds training (CUDA)", choices=("auto", "no", "bf16")
    )
    seed: int = _opt(0, "seed of run 0; run r uses seed + r")
    output: str = _opt("intertrain-output", "folder for the fine-tunes (one subfolder per run)")

    def __post_init__(self) -> None:
        problems = []
        for name in ("base", "dataset"):
            if not getattr(self, name):
                problems.append(f"{name} is required")
        for name in ("runs", "steps", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0 or any(not v > 0 for v in self.lr_choices):
            problems.append("learning rates must be > 0")
        if self.weight_decay < 0 or any(v < 0 for v in self.weight_decay_choices):
            problems.append("weight decays must be >= 0")
        if not all(0 <= v < 1 for v in (self.dropout, *self.dropout_choices)):
            problems.append("dropouts must be in [0, 1)")
        if self.image_size is not None and self.image_size < 8:
            problems.append(f"image_size must be at least 8 (got {self.image_size})")
        if self.precision not in ("auto", "no", "bf16"):
            problems.append(f"precision must be one of auto, no, bf16 (got {self.precision!r})")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class RunHParams:
    """Hyperparameters of one target fine-tune."""

    lr: float
    weight_decay: float
    dropout: float


def draw_hparams(config: RecipeConfig | IntertrainConfig, run_seed: int) -> RunHParams:
    """Run 0 takes the defaults; others draw each hparam from an RNG seeded by (seed, name).

    Seeding per name means adding a new hparam never reshuffles the existing ones (DomainBed).
    """
    if run_seed == 0:
        return RunHParams(config.lr, config.weight_decay, config.dropout)

    def draw(name: str, choices: tuple[float, ...]) -> float:
        digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little")).choice(list(choices))

    return RunHParams(
        lr=draw("lr", config.lr_choices),
        weight_decay=draw("weight_decay", config.weight_decay_choices),
        dropout=draw("dropout", config.dropout_choices),
    )


def stable_hash(payload: dict, length: int = 12) -> str:
    """Short content hash of a JSON-able mapping: names run folders after their arguments."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _coerce(hint, value, name: str):
    """Turn a YAML/CLI value into the field's declared type, with a clear error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} must not be empty")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(args[0], item, name) for item in items)
    if args and type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        return _coerce(inner, value, name)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1"):
                    return True
                if value.lower() in ("false", "no", "0"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {getattr(hint, '__name__', hint)} (got {value!r})") from None
