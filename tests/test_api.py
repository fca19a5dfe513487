"""The Python API mirrors the CLI: one function per command, taking that command's options object and
returning a typed, frozen record; a journey through the functions alone, against the local Hub."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil

import jsondoc
import pytest

import ratatouille_hub
from ratatouille_hub import (
    AssembleOptions,
    ContributeOptions,
    PushOptions,
    ResultsOptions,
    UpdateOptions,
    assemble,
    contribute,
    push,
    read_results,
    recycle,
    update,
)
from ratatouille_hub.merge_engine import read_safetensors_metadata
from ratatouille_hub.provenance import INGREDIENTS_KEY, file_sha256
from ratatouille_hub.records import to_json, to_jsonable
from ratatouille_hub.testing import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMAND_FUNCTIONS = {  # command -> (the API function, the options class its flags are made from)
    "recycle": ("recycle", "RecipeConfig"),
    "intertrain": ("intertrain", "IntertrainConfig"),
    "merge": ("merge", "MergeOptions"),
    "discover": ("discover", "DiscoverOptions"),
    "diagnose": ("diagnose", "DiagnoseOptions"),
    "assemble": ("assemble", "AssembleOptions"),
    "contribute": ("contribute", "ContributeOptions"),
    "update": ("update", "UpdateOptions"),
    "push": ("push", "PushOptions"),
    "results": ("read_results", "ResultsOptions"),
}


def test_every_api_name_stays_the_function_once_every_module_is_imported():
    """A submodule named like a function (ratatouille_hub/diagnose.py) would replace it on first import."""
    for module in pkgutil.walk_packages(ratatouille_hub.__path__, "ratatouille_hub."):
        if module.name != "ratatouille_hub.__main__":  # it runs the command
            importlib.import_module(module.name)
    functions = sorted(name for name in ratatouille_hub.__all__ if name[0].islower() and not name.startswith("_"))
    assert functions == sorted([*(f for f, _ in COMMAND_FUNCTIONS.values()), "plan_recipe"])
    for name in functions:
        assert inspect.isfunction(getattr(ratatouille_hub, name)), name


@pytest.mark.parametrize("command", sorted(COMMAND_FUNCTIONS))
def test_each_command_is_a_function_of_its_options_with_a_docstring(command):
    function_name, options_name = COMMAND_FUNCTIONS[command]
    function = getattr(ratatouille_hub, function_name)
    first = next(iter(inspect.signature(function).parameters.values()))
    assert first.annotation == options_name and getattr(ratatouille_hub, options_name)  # exported beside it
    assert function.__doc__ and f"`ratatouille-hub {command}`" in function.__doc__


def test_records_serialize_paths_tuples_and_infinities_as_json_does():
    from pathlib import Path

    @dataclasses.dataclass(frozen=True)
    class Inner:
        where: Path
        ratio: float

    @dataclasses.dataclass(frozen=True)
    class Outer:
        items: tuple[Inner, ...]
        name: str

    record = Outer((Inner(Path("a/b"), float("inf")), Inner(Path("/c"), 0.5)), "x\x1b[2J")
    assert to_jsonable(record) == {
        "items": [{"where": "a/b", "ratio": None}, {"where": "/c", "ratio": 0.5}],
        "name": "x\x1b[2J",
    }
    text = to_json(record)
    assert "\x1b" not in text and "\\u001b" in text and json.loads(text) == to_jsonable(record)


@pytest.mark.parametrize("section", ["discover", "plan", "diagnose", "results"])
def test_each_example_of_the_json_docs_parses_and_its_table_documents_it(section):
    assert jsondoc.undocumented(json.loads(jsondoc.example(section)), section) == []


def test_a_journey_through_the_python_api_alone(tiny_world, local_hub, tmp_path):
    """recycle, results, assemble, contribute, assemble from the Hub, push and update, each a function of its
    options returning its record; a recipe of its own (seed 2), so runs other tests contribute are not its."""
    output = tmp_path / "out"
    results = recycle(tiny_recipe(tiny_world, output, seed=2), echo=lambda line: None)
    assert read_results(ResultsOptions(output=str(output))) == results
    assert read_results(ResultsOptions(output=str(output / "soup"))) == results
    assert assemble(AssembleOptions(output=str(output)), echo=lambda line: None) == results  # the same soup again
    runs = [output / run.folder / "model" for run in results.runs]

    contributed = contribute(
        ContributeOptions(output=str(output), to="alice/api-shapes", index=(0, 1)),
        token="tok-alice",
        echo=lambda line: None,
    )
    assert contributed.output == output
    assert [(p.repo_id, p.revision, p.changed) for p in contributed.pushed] == [
        ("alice/api-shapes-run0", "main", True),
        ("alice/api-shapes-run1", "main", True),
    ]

    soup = tmp_path / "soup"
    record = assemble(AssembleOptions(output=str(soup), from_hub="alice/api-shapes-run0"), echo=lambda line: None)
    assert [(i.sha256, i.source) for i in record.ingredients] == [
        (file_sha256(runs[i] / "model.safetensors"), f"alice/api-shapes-run{i}@{contributed.pushed[i].oid}")
        for i in (0, 1)
    ]
    saved = json.loads(read_safetensors_metadata(soup / "model.safetensors")[INGREDIENTS_KEY])
    assert jsondoc.undocumented(to_jsonable(record), "assemble --from-hub") == []
    assert saved == [{"sha256": i.sha256, "source": i.source} for i in record.ingredients]

    pushed = push(PushOptions(folder=str(soup), repo_id="carol/api-soup"), token="tok-carol", echo=lambda line: None)
    assert (pushed.repo_id, pushed.revision, pushed.changed) == ("carol/api-soup", "main", True)
    again = push(PushOptions(folder=str(soup), repo_id="carol/api-soup"), token="tok-carol", echo=lambda line: None)
    assert (again.oid, again.changed) == (pushed.oid, False)

    options = ContributeOptions(output=str(output), to="alice/api-shapes", index=(2,))
    [third] = contribute(options, token="tok-alice", echo=lambda line: None).pushed
    grown = update(
        UpdateOptions(soup="carol/api-soup", add=("alice/api-shapes-run2",)), token="tok-carol", echo=lambda line: None
    )
    assert grown.soup == "carol/api-soup" and grown.written_to is None and grown.validation is None
    assert [i.sha256 for i in grown.ingredients] == [file_sha256(run / "model.safetensors") for run in runs]
    assert grown.ingredients[2].source == f"alice/api-shapes-run2@{third.oid}"
    assert grown.fingerprint == record.fingerprint != ""

    smaller = update(
        UpdateOptions(soup=str(soup), remove=(str(runs[1]),), output=str(tmp_path / "smaller")),
        echo=lambda line: None,
    )
    assert smaller.written_to == tmp_path / "smaller"
    assert [i.sha256 for i in smaller.ingredients] == [file_sha256(runs[0] / "model.safetensors")]
