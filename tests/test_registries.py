"""A new merge method is one decorated function: the CLI, config validation, results and card follow."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from ratatouille_hub import cli, recycle
from ratatouille_hub.config import ConfigError, MergeOptions, RecipeConfig
from ratatouille_hub.merge_methods import MERGE_METHODS, merge_method, recycle_methods, weighted_mean
from ratatouille_hub.strategies import STRATEGIES
from ratatouille_hub.testing import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def best_run_only():
    """A merge method that keeps the best run by validation: registered for one test, then taken back."""

    @merge_method(
        "best-only",
        help="the best run by validation, alone",
        needs=("validation",),
        select=lambda inputs: inputs.ranking[:1],
    )
    def best_only(runs, weights):
        return weighted_mean(runs, weights)

    yield "best-only"
    MERGE_METHODS.unregister("best-only")


def test_the_registries_list_the_methods_and_strategies_of_the_method():
    assert list(MERGE_METHODS) == [
        "uniform",
        "greedy",
        "weighted",
        "model-stock",
        "interpolate",
        "task-arithmetic",
        "ties",
        "dare",
    ]
    assert recycle_methods() == ("uniform", "greedy", "model-stock", "interpolate")  # not user weights
    assert list(STRATEGIES) == ["ratatouille", "soup", "erm", "fusing"]
    assert [name for name, s in STRATEGIES.items() if s.averages] == ["ratatouille", "soup"]
    with pytest.raises(ConfigError, match="method must be one of uniform, greedy"):
        RecipeConfig(base="b", target="t", method="weighted")


def test_a_registered_method_is_a_cli_choice_and_a_valid_option(best_run_only, capsys):
    assert RecipeConfig(base="b", target="t", method="best-only").method == "best-only"
    assert MergeOptions(models=("a", "b"), output="o", target="t", method="best-only").method == "best-only"
    for command in ("recycle", "merge"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "best-only" in capsys.readouterr().out


def test_a_registered_method_is_computed_reported_and_carded_by_recycle(best_run_only, tiny_world, tmp_path):
    config = tiny_recipe(tiny_world, tmp_path / "out", method="best-only")
    results = recycle(config, echo=lambda line: None)
    best = results.greedy_order[0]
    assert list(results.averages) == ["uniform", "greedy", "model-stock", "interpolate", "best-only"]
    assert (results.soup.method, results.soup.members) == ("best-only", [best])
    assert results.averages["best-only"].members == [best]
    assert results.soup.test_accuracy == results.runs[best].test_accuracy  # one run "averaged": that run
    soup = load_file(tmp_path / "out" / "soup" / "model.safetensors")
    run = load_file(tmp_path / "out" / results.runs[best].folder / "model" / "model.safetensors")
    assert soup.keys() == run.keys() and all((soup[k] == v).all() for k, v in run.items())
    assert "soup, best-only (1 runs), this model" in [row.name for row in results.summary]
    card = (tmp_path / "out" / "soup" / "README.md").read_text()
    assert "| soup, best-only (1 runs), this model |" in card and "best-only average of 1 runs" in card
