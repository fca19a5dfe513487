"""Typed, frozen options drive the Python API, every command's flags and the saved `recipe.yaml`.

Options are dataclasses; each field's metadata says its help, its `--help` group and how it is checked,
so a new option is added in one place and validated once, by `Options.__post_init__`. Field groups are
shared: the target options (`--target`, `--seed`, `--holdout-fraction`, the columns) mean the same in
`recycle`, `merge --method greedy` and `diagnose`; the training options the same in `recycle` and
`intertrain`. A recipe saved next to a soup replays with `--config recipe.yaml`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import RatatouilleError
from .merge_methods import MERGE_METHODS, recycle_methods
from .strategies import STRATEGIES
from .tracking import REPORT_TO, valid_project_name

GROUPS = {  # --help sections, in this order
    "model": "model",
    "target": "target (the task, its domains and the train/validation split)",
    "runs": "runs",
    "training": "training (each run)",
    "merging": "merging",
    "output": "output",
    "hub": "Hub",
}
PRECISIONS = ("auto", "no", "bf16")
BN_POLICIES = ("average", "reestimate")


class ConfigError(RatatouilleError, ValueError):
    """A recipe that cannot run: unknown keys, impossible values. Each problem keeps the option it is about,
    so the command line can name it by its flag (`--runs`) where Python and recipe.yaml name the field."""

    def __init__(self, *problems: Problem | str):
        self.problems = tuple(Problem.of(problem) for problem in problems)
        super().__init__(self.worded())

    def worded(self, name_of: Callable[[str], str] = str) -> str:
        """Every problem, each option called `name_of(field name)`."""
        return "; ".join(problem.worded(name_of) for problem in self.problems)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the options: about the field `option`, worded under any name the reader knows it
    by (a field's check takes the name to use), or a rule across options (`option` None), worded once."""

    option: str | None
    wording: Callable[[str], str]

    @classmethod
    def of(cls, problem: Problem | str) -> Problem:
        return problem if isinstance(problem, Problem) else cls(None, lambda _: problem)

    def worded(self, name_of: Callable[[str], str] = str) -> str:
        return self.wording(name_of(self.option) if self.option is not None else "")


class Options:
    """Persistence and validation shared by the frozen option dataclasses: plain dicts, YAML, typed
    coercion, and one check per field from its metadata (plus `_problems` for rules across fields)."""

    def __post_init__(self) -> None:
        problems = [problem for f in dataclasses.fields(self) for problem in _field_problems(self, f)]
        problems += self._problems()
        if problems:
            raise ConfigError(*problems)

    def _problems(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Options:
        return cls(**cls.coerced(data))

    @classmethod
    def coerced(cls, data: dict) -> dict:
        """`data` with each value turned into its field's type; unknown keys refused."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown recipe keys: {', '.join(map(str, unknown))}")
        hints = typing.get_type_hints(cls)
        return {k: _coerce(hints[k], v, k) for k, v in data.items()}

    def save_yaml(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def read_yaml(cls, path: str | Path) -> dict:
        """The option values saved at `path`, each of its field's type, not yet checked together (flags may
        still override some). Anything that is not a readable YAML mapping of known options is refused naming
        the file (safe_load: a `!!python/...` tag is an error, never an object)."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); a recipe is a YAML file") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(error)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of option names to values")
        try:
            return cls.coerced(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def load_yaml(cls, path: str | Path) -> Options:
        values = cls.read_yaml(path)
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where, on one line (its message spans several, quoting the offending text)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


# -- field checks: each returns a problem or None; a tuple field is checked item by item -----------


def int_range(minimum: int, most: int = 2**31 - 1) -> Callable:
    """An integer from `minimum` to `most`: the default ceiling is what the step counters, progress bars and
    torch's int32 indices hold, so a typo of many digits is refused before anything runs."""

    def check(name, v):
        if v < minimum:
            return f"{name} must be at least {minimum} (got {v})"
        return None if v <= most else f"{name} must be at most {most} (got {v})"

    return check


MAX_RUNS = 10_000  # a plan lists every run; the paper's recipes use 20 (a typo of many digits would fill memory)
MAX_IMAGE_SIZE = 4096  # pixels a side; a decoded target holds every image at this size


def utf8_path(name, v):
    """Where we write must be a name every file format we write can hold (safetensors paths are UTF-8)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name} must be a UTF-8 path (got {v!r})"
    return None


def png_file(name, v):
    """A figure is a PNG written into a folder that exists: checked before the work that draws it."""
    if not v.lower().endswith(".png"):
        return f"{name} must name a .png file (got {v!r})"
    if not Path(v).parent.is_dir():
        return f"{name}: folder {str(Path(v).parent)!r} does not exist"
    return utf8_path(name, v)


def unit_interval(name, v):
    return None if 0.0 <= v <= 1.0 else f"{name} must be between 0 and 1 (got {v})"


def positive(name, v):
    if not math.isfinite(v):
        return f"{name} must be a finite number (got {v})"
    return None if v > 0 else f"{name} must be > 0 (got {v})"


def non_negative(name, v):
    if not math.isfinite(v):
        return f"{name} must be a finite number (got {v})"
    return None if v >= 0 else f"{name} must be >= 0 (got {v})"


MAX_SEED = 2**32 - 1  # what every generator the recipe seeds (torch, numpy, random) accepts


def seed_range(name, v):
    return None if 0 <= v <= MAX_SEED else f"{name} must be an integer from 0 to {MAX_SEED} (got {v})"


def open_fraction(name, v):
    return None if 0.0 < v < 1.0 else f"{name} must be in (0, 1) (got {v})"


def dropout_rate(name, v):
    return None if 0 <= v < 1 else f"{name} must be in [0, 1) (got {v})"


def hub_model_id(name, v):
    from .fetch import is_hub_id

    return None if is_hub_id(v) else f"{name} must be a Hub model id, namespace/name (got {v!r})"


LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the Hub's license identifiers: apache-2.0, cc-by-4.0, other


def license_id(name, v):
    if LICENSE_ID.fullmatch(v):
        return None
    return f"{name} must be a Hub license identifier such as apache-2.0, mit or other (got {v!r})"


def _field_problems(options, f: dataclasses.Field) -> list[Problem]:
    value, meta = getattr(options, f.name), f.metadata
    if meta.get("required") and value in ("", None, ()):
        return [Problem(f.name, lambda name: f"{name} is required")]
    choices = meta.get("choices")
    if choices is not None:
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            return [Problem(f.name, lambda name: f"{name} must be one of {', '.join(allowed)} (got {value!r})")]
    check = meta.get("check")
    if check is None or value is None:
        return []
    if isinstance(value, tuple):
        if not value and not meta.get("may_be_empty"):
            return [Problem(f.name, lambda name: f"{name} must not be empty")]
        bad = next((v for v in value if check(f.name, v)), None)
        return [] if bad is None else [Problem(f.name, lambda name: f"{check(name, bad)} in {list(value)}")]
    return [Problem(f.name, lambda name: check(name, value))] if check(f.name, value) else []


def _opt(default, help: str, *, group: str, **extra):
    return field(default=default, metadata={"help": help, "group": group, **extra})


def _license_option(of: str):
    return _opt(
        None,
        f"license the card declares (a Hub license id, e.g. apache-2.0); default: {of}'s license when its card "
        "declares one, else none",
        group="hub",
        check=license_id,
    )


# -- shared field groups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions(Options):
    """How images and labels are read, at which resolution, and the trial seed."""

    label_column: str = _opt("label", "dataset column holding the class label", group="target")
    image_column: str = _opt("image", "dataset column holding the image", group="target")
    image_size: int | None = _opt(
        None,
        "training resolution (default: the base's image processor size)",
        group="training",
        check=int_range(8, MAX_IMAGE_SIZE),
    )
    seed: int = _opt(
        0,
        "trial seed: data split, and each run's initialisation, batches and augmentation",
        group="target",
        check=seed_range,
    )


@dataclass(frozen=True)
class TargetOptions(DataOptions):
    """The target task and its DomainBed split: the same in every command that reads a target."""

    target: str = _opt(
        "", "target dataset: a Hub id, a local datasets folder, a parquet file or a DomainBed folder", group="target"
    )
    test_domain: str | None = _opt(None, "held-out domain (default: the first domain in sorted order)", group="target")
    domain_column: str = _opt("domain", "dataset column holding the domain name", group="target")
    holdout_fraction: float = _opt(
        0.2, "share of each training domain kept for validation", group="target", check=open_fraction
    )
    cache_budget_gb: float | None = _opt(
        None,
        "gigabytes the decoded target may take: in the output's cache, or in memory where there is none "
        "(default: the free disk, half the available memory); a target over it is not kept decoded but "
        "decoded batch by batch from its files by DataLoader workers, with the same pixels (0: always)",
        group="target",
        check=non_negative,
    )


@dataclass(frozen=True)
class TrainingOptions(DataOptions):
    """How each fine-tune trains: shared by recycle's target runs and intertrain's auxiliary runs."""

    base: str = _opt("", "base model: a Hub id or a local transformers model folder", group="model", required=True)
    runs: int = _opt(20, "target fine-tunes to average", group="runs", check=int_range(1, MAX_RUNS))
    steps: int = _opt(5001, "optimisation steps per fine-tune", group="training", check=int_range(1))
    batch_size: int = _opt(32, "images per training domain per step", group="training", check=int_range(1))
    lr: float = _opt(5e-5, "learning rate of run 0 (Adam, constant)", group="training", check=positive)
    lr_choices: tuple[float, ...] = _opt(
        (1e-5, 3e-5, 5e-5), "learning rates drawn by runs 1..N-1", group="training", check=positive
    )
    weight_decay: float = _opt(0.0, "weight decay of run 0", group="training", check=non_negative)
    weight_decay_choices: tuple[float, ...] = _opt(
        (1e-4, 1e-6), "weight decays drawn by runs 1..N-1", group="training", check=non_negative
    )
    dropout: float = _opt(0.0, "feature dropout before the head, run 0", group="training", check=dropout_rate)
    dropout_choices: tuple[float, ...] = _opt(
        (0.0, 0.1, 0.5), "feature dropouts drawn by runs 1..N-1", group="training", check=dropout_rate
    )
    augment: bool = _opt(True, "DomainBed augmentation on training images", group="training")
    micro_batch: int = _opt(
        0,
        "images per pass through the model: a step's gradient accumulates over its passes, and evaluation "
        "goes in passes of at most as many, so peak memory is one pass's (0: whole steps, evaluation by 64)",
        group="training",
        check=int_range(0),
    )
    precision: str = _opt(
        "auto",
        "bf16 autocast of training steps: auto = on CUDA with bf16 support, fp32 elsewhere",
        group="training",
        choices=PRECISIONS,
    )
    output: str = _opt("ratatouille-output", "folder for runs and the soup", group="output", check=utf8_path)
    base_model: str | None = _opt(
        None,
        "Hub id the card names as the base (lineage base_model:<id>, which is how the Hub and recycle find "
        "fine-tunes of it) when --base is a local copy of it (default: --base itself when it is a Hub id)",
        group="hub",
        check=hub_model_id,
    )
    license: str | None = _license_option("--base")


ALL_DOMAINS = "all"  # recycle's --test-domain for leave-one-domain-out over every domain


@dataclass(frozen=True)
class RecipeConfig(TargetOptions, TrainingOptions):
    """Everything that defines a Model Ratatouille run (docs/method.md gives the reference values)."""

    target: str = _opt(
        "",
        "target dataset: a Hub id, a local datasets folder, a parquet file or a DomainBed folder",
        group="target",
        required=True,
    )
    test_domain: str | None = _opt(
        None,
        f"held-out domain (default: the first domain in sorted order); {ALL_DOMAINS!r}: every domain in turn, "
        "one soup each, and the DomainBed table of their held-out accuracies",
        group="target",
    )
    aux: tuple[str, ...] = _opt(
        (),
        "auxiliary fine-tunes to recycle (Hub ids, id@sha, or folders); default: discovered on the Hub",
        group="runs",
    )
    aux_limit: int = _opt(
        16, "with no --aux: how many discovered fine-tunes of the base to consider", group="runs", check=int_range(1)
    )
    discovered: tuple[str, ...] = _opt(
        (),
        "the fine-tunes discovery chose (id@sha), frozen by the plan: a replay of the saved recipe recycles "
        "exactly these; written into recipe.yaml, not a flag",
        group="runs",
        cli=False,
    )
    rediscover: bool = _opt(
        False,
        "with --config: discover the base's fine-tunes on the Hub again instead of recycling the ones the recipe "
        "pinned (finished runs are reused)",
        group="runs",
    )
    strategy: str = _opt(
        "ratatouille",
        "how runs start and what the result is; "
        + "; ".join(f"{name}: {entry.help}" for name, entry in STRATEGIES.items()),
        group="runs",
        choices=STRATEGIES.names,
    )
    method: str = _opt(
        "uniform",
        "how averaging strategies average the runs (the others report every method); "
        + "; ".join(f"{name}: {MERGE_METHODS[name].help}" for name in recycle_methods()),
        group="merging",
        choices=recycle_methods,
    )
    alpha: float = _opt(
        0.5,
        "interpolate's ratio between the base (0) and the uniform soup (1); WiSE-FT's default",
        group="merging",
        check=unit_interval,
    )
    eval_every: int = _opt(
        100,
        "evaluate on training-domain validation every N steps (and at the last)",
        group="training",
        check=int_range(1),
    )
    lp_steps: int = _opt(
        5001, "steps of the shared linear probe on the frozen base", group="training", check=int_range(1)
    )
    lp_lr: float = _opt(5e-5, "learning rate of the linear probe", group="training", check=positive)
    warmup_steps: int = _opt(
        200, "head-only steps before full fine-tuning of a recycled init", group="training", check=non_negative
    )
    bn_policy: str = _opt(
        "average",
        "BatchNorm running statistics of the soup: average = mean of the runs' (frozen) statistics; "
        "reestimate = recomputed on target training images after averaging",
        group="merging",
        choices=BN_POLICIES,
    )


@dataclass(frozen=True)
class IntertrainConfig(TrainingOptions):
    """Auxiliary fine-tunes of a base on one dataset (docs/method.md step 2): what `recycle` later recycles.

    Hyperparameters are drawn per run exactly as for target runs (run 0 takes the defaults, run r draws by
    r, whatever the seed), and a value given (`--lr`, `--weight-decay`, `--dropout`) holds for every run;
    the last-step weights are kept, as the reference code does (no validation split).
    """

    dataset: str = _opt(
        "", "auxiliary dataset: a Hub id, a local datasets folder or a parquet file", group="target", required=True
    )
    runs: int = _opt(
        1, "fine-tunes to make, each with its own seed and hyperparameters", group="runs", check=int_range(1, MAX_RUNS)
    )
    lr: float | None = _opt(
        None,
        "learning rate of every run (Adam, constant); default: run 0 takes 5e-05 and runs 1..N-1 draw from "
        "--lr-choices, as recycle's runs do",
        group="training",
        check=positive,
    )
    weight_decay: float | None = _opt(
        None, "weight decay of every run; default: run 0 takes 0, the others draw", group="training", check=non_negative
    )
    dropout: float | None = _opt(
        None,
        "feature dropout before the head, every run; default: run 0 takes 0, the others draw",
        group="training",
        check=dropout_rate,
    )
    batch_size: int = _opt(32, "images per step", group="training", check=int_range(1))
    seed: int = _opt(0, "seed of run 0; run r uses seed + r", group="target", check=seed_range)
    output: str = _opt(
        "intertrain-output", "folder for the fine-tunes (one subfolder per run)", group="output", check=utf8_path
    )


# -- the other commands ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeOptions(TargetOptions):
    """`merge`: merge checkpoints (folders or Hub ids) by a registered method; `greedy` ranks them on the target
    split the target options define. Saved as OUTPUT/merge.yaml with every Hub reference pinned at its commit."""

    models: tuple[str, ...] = _opt(
        (),
        "the checkpoints: transformers folders or Hub ids (id@rev pins a revision)",
        group="model",
        positional=True,
        required=True,
    )
    output: str = _opt("", "folder for the merged model", group="output", required=True, check=utf8_path)
    method: str = _opt(
        "uniform",
        "; ".join(f"{name}: {entry.help}" for name, entry in MERGE_METHODS.items()),
        group="merging",
        choices=MERGE_METHODS.names,
    )
    weights: tuple[float, ...] = _opt(
        (), "one weight per model, with --method weighted", group="merging", check=non_negative, may_be_empty=True
    )
    bn_policy: str = _opt(
        "average",
        "with --method greedy: BatchNorm statistics of the candidate averages",
        group="merging",
        choices=BN_POLICIES,
    )
    base: str | None = _opt(
        None,
        "with a method anchored at the base ("
        + ", ".join(name for name, entry in MERGE_METHODS.items() if "base" in entry.needs)
        + "): the model the inputs were fine-tuned from (folder or Hub id); "
        "its tensors of other shapes (a head for other labels) are not anchored",
        group="merging",
    )
    alpha: float = _opt(
        0.5,
        "with --method interpolate: from the base (0) to the uniform mean (1)",
        group="merging",
        check=unit_interval,
    )
    license: str | None = _license_option("--base")
    parameters: tuple[str, ...] = _opt(
        (),
        "the method's typed parameters as NAME=VALUE (default: each one's default); "
        + "; ".join(
            f"{name}: " + ", ".join(f"{p.name}={p.default}" for p in entry.parameters if p.name != "alpha")
            for name, entry in MERGE_METHODS.items()
            if any(p.name != "alpha" for p in entry.parameters)
        ),
        group="merging",
        may_be_empty=True,
    )

    @property
    def method_parameters(self) -> dict[str, str]:
        """`parameters` as {name: value}; the method binds each to its type and checks its range."""
        return dict(item.partition("=")[::2] for item in self.parameters)

    def _problems(self) -> list[str]:
        needs = MERGE_METHODS[self.method].needs if self.method in MERGE_METHODS else frozenset()
        problems = []
        known = {p.name for p in MERGE_METHODS[self.method].parameters} - {"alpha"} if needs else set()
        for item in self.parameters:
            name, equals, _ = item.partition("=")
            if not equals or name not in known:
                problems.append(
                    f"--parameters {item}: --method {self.method} takes "
                    + (", ".join(f"{n}=VALUE" for n in sorted(known)) or "no parameters")
                )
        if ("weights" in needs) != bool(self.weights):
            problems.append(
                f"--method {self.method} needs --weights, one per model"
                if "weights" in needs
                else "--weights goes with --method weighted"
            )
        if ("base" in needs) != bool(self.base):
            problems.append(
                f"--method {self.method} needs --base, the model the inputs were fine-tuned from"
                if "base" in needs
                else "--base goes with a method that needs it: "
                + ", ".join(name for name, entry in MERGE_METHODS.items() if "base" in entry.needs)
            )
        if ("validation" in needs) != bool(self.target):
            problems.append(f"--method {self.method} needs --target (and --target goes only with greedy)")
        return problems


@dataclass(frozen=True)
class DiagnoseOptions(TargetOptions):
    """`diagnose`: docs/method.md's three criteria on the target's training-domain validation."""

    models: tuple[str, ...] = _opt((), "model folders or Hub ids", group="model", positional=True, required=True)
    target: str = _opt(
        "", "target dataset (folder, parquet, DomainBed folder or Hub id)", group="target", required=True
    )
    plot: str | None = _opt(
        None,
        "write the figure here (PNG): each pair's weight path and barrier, each model's accuracy, diversity "
        "against barrier",
        group="output",
        check=png_file,
    )


@dataclass(frozen=True)
class DiscoverOptions(Options):
    base: str = _opt("", "base model Hub id", group="model", required=True)
    target: str | None = _opt(
        None, "target dataset (Hub id or alias such as PACS): fine-tunes trained on it are refused", group="target"
    )
    limit: int = _opt(20, "how many fine-tunes to examine", group="model", check=int_range(1))


@dataclass(frozen=True)
class RunOptions(Options):
    """One run of a saved plan: what a scheduler's array task executes."""

    output: str = _opt(
        "",
        "output folder holding the plan (from `ratatouille-hub plan`)",
        group="output",
        positional=True,
        required=True,
    )
    index: int | None = _opt(
        None,
        "which run of the plan to train, from 0 (e.g. $SLURM_ARRAY_TASK_ID)",
        group="runs",
        required=True,
        check=int_range(0),
    )


@dataclass(frozen=True)
class AssembleOptions(Options):
    """The soup of a saved plan, from its finished runs; or of a recipe's runs contributed to the Hub."""

    output: str = _opt(
        "",
        "output folder holding the plan and its runs (with --from-hub: the folder for the soup)",
        group="output",
        positional=True,
        required=True,
    )
    from_hub: str | None = _opt(
        None,
        "a contributed run (Hub id): average every run of its recipe on the Hub, found by its base's tag and "
        "checked by fingerprint; no target data needed",
        group="hub",
        check=hub_model_id,
    )


@dataclass(frozen=True)
class ResultsOptions(Options):
    """The results of a finished output folder (or of a soup folder), read back from its results.json."""

    output: str = _opt(
        "",
        "a finished recycle or assemble output folder, or a soup folder (one holding results.json)",
        group="output",
        positional=True,
        required=True,
    )


@dataclass(frozen=True)
class ContributeOptions(Options):
    """Finished runs of a saved plan, pushed as Hub models that carry their recipe fingerprint."""

    output: str = _opt(
        "", "output folder holding the plan and its runs", group="output", positional=True, required=True
    )
    to: str = _opt(
        "", "repo prefix ORG/PREFIX: run i goes to ORG/PREFIX-run<i>", group="hub", required=True, check=hub_model_id
    )
    index: tuple[int, ...] = _opt(
        (), "the runs to push (default: every run)", group="runs", check=int_range(0), may_be_empty=True
    )


@dataclass(frozen=True)
class UpdateOptions(TargetOptions):
    """An exact update of a uniform soup: runs added or removed without merging everything again; with
    --target, the updated soup is scored on the training domains' validation (the split of the target options)."""

    soup: str = _opt(
        "",
        "soup folder, or Hub id (then only it and the runs named are downloaded)",
        group="model",
        positional=True,
        required=True,
    )
    add: tuple[str, ...] = _opt(
        (), "runs to add: model folders or Hub ids (id@revision pins one)", group="model", may_be_empty=True
    )
    remove: tuple[str, ...] = _opt((), "ingredients to remove, named the same way", group="model", may_be_empty=True)
    output: str | None = _opt(
        None,
        "write the updated soup here (default: in place, atomically; a Hub soup is pushed back in one commit)",
        group="output",
    )
    revision: str | None = _opt(
        None, "a Hub soup's branch: read at its head and pushed back to it (default main)", group="hub"
    )

    def _problems(self) -> list[str]:
        problems = [] if self.add or self.remove else ["nothing to do: give --add RUN... and/or --remove RUN..."]
        if self.revision is not None and (not self.revision.strip() or re.fullmatch("[0-9a-f]{40}", self.revision)):
            problems.append(f"--revision {self.revision!r}: a branch name is needed (the update is pushed back to it)")
        return problems


@dataclass(frozen=True)
class PublishOptions(Options):
    """Where a result is pushed; never saved in recipe.yaml (the token is not an option at all)."""

    push_to_hub: str | None = _opt(None, "push the result to this Hub repo (namespace/name) in one commit", group="hub")
    private: bool = _opt(False, "create the repo private", group="hub")
    revision: str | None = _opt(
        None, "with --push-to-hub: push to this branch (created if missing; default main)", group="hub"
    )
    commit_message: str | None = _opt(None, "the push's commit message (default: one naming the tool)", group="hub")

    def _problems(self) -> list[str]:
        if self.revision and not self.push_to_hub:  # read as a pin of what is read, it would be silently ignored
            return [
                "--revision is the branch --push-to-hub writes to, and goes with it; pin a model or dataset that is "
                "read as ID@REVISION (e.g. --base org/base@v1.0)"
            ]
        return []


@dataclass(frozen=True)
class TrackingOptions(Options):
    """Where the commands that train (recycle, run, assemble, intertrain, sweep) report their runs; like where a
    result is pushed, never saved in a recipe: no run depends on it."""

    report_to: str = _opt(
        "none",
        "experiment tracker (accelerate's log_with) for every run's loss and validation accuracy per evaluation "
        "(and each step's loss), the linear probe's and the soup's scores: tensorboard writes <output>/tensorboard/ "
        "(pip install 'ratatouille-hub[tracking]'); trackio, wandb and mlflow log to their own stores and need "
        "their package",
        group="output",
        choices=REPORT_TO,
    )
    project_name: str | None = _opt(
        None,
        "the tracker's project, which groups the runs (default: the output folder's name)",
        group="output",
        check=valid_project_name,
    )


@dataclass(frozen=True)
class PushOptions(Options):
    """`push REPO_ID [FOLDER]`, in `hf upload`'s order."""

    repo_id: str = _opt("", "namespace/name of the Hub repo", group="hub", positional=True, required=True)
    folder: str | None = _opt(
        None,
        "the model folder to push (default: the current folder when it is one, or the soup of the output "
        "folder you are in)",
        group="hub",
        positional=True,
    )
    commit_message: str | None = _opt(None, "the commit's message (default: one naming the tool)", group="hub")
    create_pr: bool = _opt(
        False, "open a pull request with the commit instead of committing to the branch", group="hub"
    )
    private: bool = _opt(False, "create the repo private", group="hub")
    revision: str | None = _opt(
        None,
        "branch to push to (created if missing; default main), or a pull request's ref refs/pr/N; with "
        "--create-pr, the branch the pull request is opened against",
        group="hub",
    )

    def _problems(self) -> list[str]:
        """`push FOLDER REPO_ID`, the order before hf's, would otherwise read as a repo id that is a folder."""
        from .fetch import is_hub_id

        if self.folder is not None and Path(self.repo_id).is_dir() and is_hub_id(self.folder):
            return [
                f"push takes the repo id first, as hf upload does: ratatouille-hub push {self.folder} {self.repo_id}"
            ]
        return []


def strategy_name(name, v):
    return None if v in STRATEGIES else f"{name} must name strategies among {', '.join(STRATEGIES.names())} (got {v!r})"


MAX_TRIALS = 1000  # a sweep lists every trial's runs; DomainBed's sweeps use 3


@dataclass(frozen=True)
class SweepConfig(RecipeConfig):
    """A sweep (DomainBed's unit of evidence): the recipe for every trial seed x strategy x held-out domain,
    each cell an ordinary plan; summarised as mean +- standard error over the trials."""

    test_domain: str | None = _opt(
        ALL_DOMAINS,
        f"held-out domain; {ALL_DOMAINS!r}: every domain in turn, one column each (DomainBed's protocol)",
        group="target",
    )
    seed: int = _opt(0, "seed of trial 0; trial t uses seed + t", group="target", check=seed_range)
    strategy: tuple[str, ...] = _opt(
        STRATEGIES.names(),
        "the strategies compared, one group of rows each, sharing every run they have in common: "
        + ", ".join(STRATEGIES.names()),
        group="runs",
        check=strategy_name,
    )
    trials: int = _opt(
        3,
        "trials (DomainBed's --n_trials): each draws its own split and seeds (a run's hyperparameters depend on its index alone, as DomainBed's on its hparams seed)",
        group="runs",
        check=int_range(1, MAX_TRIALS),
    )
    output: str = _opt(
        "ratatouille-sweep", "folder for every trial's runs and the table", group="output", check=utf8_path
    )

    def _problems(self) -> list[str]:
        problems = [
            f"strategy names {name} twice" for name in dict.fromkeys(self.strategy) if self.strategy.count(name) > 1
        ]
        if self.seed + self.trials - 1 > MAX_SEED:
            problems.append(f"seed + trials - 1 must be at most {MAX_SEED} (got {self.seed + self.trials - 1})")
        return problems


@dataclass(frozen=True)
class RunHParams:
    """Hyperparameters of one target fine-tune."""

    lr: float
    weight_decay: float
    dropout: float


HPARAMS = ("lr", "weight_decay", "dropout")  # each drawn from its `<name>_choices` grid


def draw_hparams(config: RecipeConfig | IntertrainConfig, index: int) -> RunHParams:
    """Run `index`'s hyperparameters, the same way in recycle and intertrain: run 0 takes the given values
    (the method's defaults), the others draw each hparam from its grid with an RNG seeded by (index, name);
    an intertrain value given explicitly holds for every run. Never the trial seed: a run's hparams depend
    on its place in the plan alone.

    Seeding per name means adding a new hparam never reshuffles the existing ones (DomainBed).
    """

    def value(name: str) -> float:
        given = getattr(config, name)
        if given is not None and (index == 0 or isinstance(config, IntertrainConfig)):
            return given
        if index == 0:
            return next(f.default for f in dataclasses.fields(TrainingOptions) if f.name == name)
        digest = hashlib.sha256(f"{index}:{name}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little")).choice(list(getattr(config, f"{name}_choices")))

    return RunHParams(*(value(name) for name in HPARAMS))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _coerce(hint, value, name: str):
    """Turn a YAML/CLI value into the field's declared type, with a clear error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(Problem(name, lambda called: f"{called} must not be empty"))
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
        type_name = getattr(hint, "__name__", hint)
        raise ConfigError(Problem(name, lambda called: f"{called} must be {type_name} (got {value!r})")) from None
