"""The results record: the one schema of `results.json`, read by the card, the CLI table, the demo, the
benchmarks and the tests. Built by assembly, written and read back through `to_dict` / `from_dict`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .io import atomic_write_json
from .safe_text import path_component, terminal_safe

AVERAGE_PREFIX = "soup_"  # results.json key of each merge method's average: soup_uniform, soup_greedy, ...


@dataclass(frozen=True, kw_only=True)
class Scores:
    val_accuracy: float  # pooled training-domain validation
    val_accuracy_per_domain: dict[str, float]
    test_accuracy: float  # the held-out domain


@dataclass(frozen=True, kw_only=True)
class RunResult(Scores):
    index: int
    init: str  # the init checkpoint as source@revision
    hparams: dict[str, float]
    best_step: int
    folder: str  # relative to the output folder
    recycled: bool = False  # starts from another checkpoint than the base (results.json before it: unknown)


@dataclass(frozen=True, kw_only=True)
class Average(Scores):
    members: list[int]  # run indices
    parameters: dict[str, object] = dataclasses.field(default_factory=dict)  # the merge method's (--alpha, ...)

    def label(self, method: str) -> str:
        """The method as tables and cards name it, with its parameters."""
        return method + "".join(f", {key} {value}" for key, value in self.parameters.items())


@dataclass(frozen=True, kw_only=True)
class Outcome(Average):
    method: str  # the merge method of the result folder's model, or "best-run"


@dataclass(frozen=True, kw_only=True)
class BestRun(Scores):
    index: int


@dataclass(frozen=True)
class SummaryRow:
    name: str
    val_accuracy: float
    test_accuracy: float


@dataclass(frozen=True)
class IngredientRecord:
    source: str
    revision: str
    is_hub: bool


@dataclass(frozen=True)
class PairRecord:
    """Diagnostics of two runs on training-domain validation: diversity and the weight path between them."""

    runs: list[int]
    ratio_error: float
    barrier: float
    path_accuracies: list[float]


@dataclass(frozen=True, kw_only=True)
class Results:
    recipe: dict
    target: str  # id@sha for a Hub dataset, else the path
    test_domain: str
    train_domains: list[str]
    id2label: dict[str, str]
    ingredients: list[IngredientRecord]
    runs: list[RunResult]
    soup: Outcome  # the model in the result folder
    best_run: BestRun
    # docs/method.md's Inter-training: the best run by validation among those from a recycled init (None: no run is)
    best_recycled_run: BestRun | None
    averages: dict[str, Average]  # by merge method
    greedy_order: list[int]  # runs best first by their own validation accuracy
    ensemble: Scores
    summary: list[SummaryRow]
    bn_policy: str
    diagnostics: list[PairRecord]

    @property
    def best_single(self) -> RunResult:
        return self.runs[self.best_run.index]

    @property
    def best_recycled_single(self) -> RunResult | None:
        return None if self.best_recycled_run is None else self.runs[self.best_recycled_run.index]

    @property
    def is_average(self) -> bool:
        return self.soup.method != "best-run"

    def format(self) -> str:
        """The summary table: each row's training-domain validation and held-out accuracy."""
        held_out = terminal_safe(self.test_domain)
        return "\n".join(
            f"{terminal_safe(row.name):<48} val {100 * row.val_accuracy:5.1f}%   {held_out} {100 * row.test_accuracy:5.1f}%"
            for row in self.summary
        )

    def to_dict(self) -> dict:
        plain = dataclasses.asdict(self)
        averages = plain.pop("averages")
        ordered = {}
        for name, value in plain.items():  # soup_<method> keys after best_run, as results.json always had them
            ordered[name] = value
            if name == "best_run":
                ordered.update({f"{AVERAGE_PREFIX}{method}": average for method, average in averages.items()})
        return ordered

    @classmethod
    def from_dict(cls, data: dict) -> Results:
        averages = {
            key.removeprefix(AVERAGE_PREFIX): Average(**value)
            for key, value in data.items()
            if key.startswith(AVERAGE_PREFIX)
        }
        plain = {key: value for key, value in data.items() if not key.startswith(AVERAGE_PREFIX)}
        return cls(
            **{
                **plain,
                "ingredients": [IngredientRecord(**i) for i in plain["ingredients"]],
                "runs": [RunResult(**run) for run in plain["runs"]],
                "soup": Outcome(**plain["soup"]),
                "best_run": BestRun(**plain["best_run"]),
                "best_recycled_run": BestRun(**plain["best_recycled_run"]) if plain.get("best_recycled_run") else None,
                "averages": averages,
                "ensemble": Scores(**plain["ensemble"]),
                "summary": [SummaryRow(**row) for row in plain["summary"]],
                "diagnostics": [PairRecord(**pair) for pair in plain["diagnostics"]],
            }
        )

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Results:
        return cls.from_dict(json.loads(Path(path).read_text()))


RESULTS_FILE = "results.json"


def load_results(folder: Path) -> Results | LeaveOneDomainOut:
    """The results a finished output folder holds (its soup's; with every domain held out, each soup's), or a
    soup folder's own. A file that is not such a record is refused naming it: a soup from the Hub carries a
    stranger's results.json, and its soups are found by their domains' safe folder names, never by a path it
    gives."""
    folder = Path(folder)
    path = next((p for p in (folder / RESULTS_FILE, folder / "soup" / RESULTS_FILE) if p.is_file()), None)
    if path is None:
        raise InputError(f"{folder}: no {RESULTS_FILE} (a finished recycle or assemble output, or its soup folder)")
    data = _read_json(path)
    if not isinstance(data, dict) or "test_domains" not in data:
        return _parsed(path, _printable_results, data)
    domains = _parsed(path, lambda table: [str(domain) for domain in table["test_domains"]], data)
    soups = {domain: folder / soup_subfolder(domain) / RESULTS_FILE for domain in domains}
    table = LeaveOneDomainOut(
        {domain: _parsed(file, _printable_results, _read_json(file)) for domain, file in soups.items()}
    )
    _parsed(path, LeaveOneDomainOut.format, table)  # its rows, from every soup's record, print too
    return table


def _printable_results(data) -> Results:
    """The record of `data`, once its table prints: a field of another type fails here, as bad input, and not
    later as a bug."""
    results = Results.from_dict(data)
    results.format()
    return results


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested past the parser's depth
        raise InputError(f"{path}: not JSON ({str(error).splitlines()[0]})") from None


def _parsed(path: Path, parse, data):
    """`parse(data)`, or one line naming `path` when `data` is not the record it should be."""
    try:
        return parse(data)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # a missing key, a field of another type
        problem = f"{type(error).__name__}: {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise InputError(f"{path}: not the results of a finished recipe ({problem})") from None


def soup_subfolder(domain: str) -> str:
    """Where `--test-domain all` puts the soup that holds `domain` out: the name comes from the dataset, so it
    is made a safe folder name (an absolute path or `../x` as a domain stays inside the output folder)."""
    return f"soups/{path_component(domain)}"


@dataclass(frozen=True)
class LeaveOneDomainOut:
    """`--test-domain all`: the results with each domain held out in turn, and the DomainBed table."""

    per_domain: dict[str, Results]

    def table(self) -> dict[str, dict[str, float]]:
        """Held-out accuracy by row (the best run by validation, each merge method's soup, the ensemble)
        and domain, with the rows' average over domains under `average`."""
        rows: dict[str, dict[str, float]] = {}
        for domain, results in self.per_domain.items():
            cells = {
                "best single run (by validation)": results.best_run.test_accuracy,
                **{f"soup, {method}": average.test_accuracy for method, average in results.averages.items()},
                "ensemble (reference)": results.ensemble.test_accuracy,
            }
            for name, accuracy in cells.items():
                rows.setdefault(name, {})[domain] = accuracy
        for cells in rows.values():
            cells["average"] = sum(cells.values()) / len(cells)
        return rows

    def to_dict(self) -> dict:
        return {
            "test_domains": list(self.per_domain),
            "test_accuracy": self.table(),
            "soups": {domain: soup_subfolder(domain) for domain in self.per_domain},
        }

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    def format(self) -> str:
        domains = [terminal_safe(d) for d in (*self.per_domain, "average")]
        width = max(8, *(len(d) for d in domains))
        lines = [f"{'held-out accuracy':<34}" + "".join(f"{d:>{width + 2}}" for d in domains)]
        for name, cells in self.table().items():
            lines.append(f"{name:<34}" + "".join(f"{100 * cells[d]:>{width + 1}.1f}%" for d in cells))
        return "\n".join(lines)
