"""RecipeConfig: docs/method.md's defaults, the recipe.yaml round trip, validation, per-run hyperparameters."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ratatouille_hub.config import ConfigError, IntertrainConfig, RecipeConfig, RunHParams, draw_hparams

REQUIRED = {"base": "org/base", "target": "org/dataset"}


def config(**changes) -> RecipeConfig:
    return RecipeConfig(**{**REQUIRED, **changes})


# -- defaults ---------------------------------------------------------------------------------------


def test_defaults_are_the_reference_recipe():
    """docs/method.md: 20 runs, 5001 steps, eval every 100, LP 5001 steps at 5e-5, 200 head-only warm-up
    steps, 32 images per domain, Adam 5e-5 / wd 0 / dropout 0 for run 0 and the DomainBed draws."""
    c = config()
    assert (c.runs, c.steps, c.eval_every) == (20, 5001, 100)
    assert (c.lp_steps, c.lp_lr, c.warmup_steps, c.batch_size) == (5001, 5e-5, 200, 32)
    assert (c.lr, c.weight_decay, c.dropout) == (5e-5, 0.0, 0.0)
    assert c.lr_choices == (1e-5, 3e-5, 5e-5)
    assert c.weight_decay_choices == (1e-4, 1e-6)
    assert c.dropout_choices == (0.0, 0.1, 0.5)
    assert c.holdout_fraction == 0.2
    assert (c.strategy, c.method) == ("ratatouille", "uniform")
    assert c.augment is True
    assert (c.test_domain, c.aux, c.image_size, c.seed) == (None, (), None, 0)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config().runs = 3  # type: ignore[misc]


# -- recipe.yaml round trip -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(
            test_domain="sketch",
            aux=("alice/ft-a", "./local ft"),
            strategy="soup",
            method="greedy",
            runs=3,
            steps=7,
            eval_every=2,
            lp_steps=9,
            lp_lr=1e-2,
            warmup_steps=0,
            batch_size=5,
            lr=3.5e-4,
            lr_choices=(1e-3, 2e-3),
            weight_decay=1e-6,
            weight_decay_choices=(0.0,),
            dropout=0.1,
            dropout_choices=(0.25,),
            holdout_fraction=0.3,
            image_size=64,
            augment=False,
            bn_policy="reestimate",
            precision="no",
            seed=7,
            output="some/where",
            domain_column="env",
            label_column="y",
            image_column="img",
        ),
    ],
    ids=["defaults", "every-field-changed"],
)
def test_yaml_round_trip_is_equal(tmp_path, changes):
    original = config(**changes)
    path = tmp_path / "recipe.yaml"
    original.save_yaml(path)
    loaded = RecipeConfig.load_yaml(path)
    assert loaded == original
    assert type(loaded.aux) is tuple and type(loaded.lr_choices) is tuple
    plain = yaml.safe_load(path.read_text())  # plain YAML: no Python tags, every field present
    assert list(plain) == [f.name for f in dataclasses.fields(RecipeConfig)]


def test_yaml_written_by_hand_is_coerced(tmp_path):
    # YAML 1.1 reads `5e-5` (no dot) as a string; a quoted int is a string too
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "base: b\ntarget: t\nlr: 5e-5\nlr_choices: [1e-5, 2.0e-5]\nruns: '4'\naux: one/model\naugment: 'no'\n"
    )
    loaded = RecipeConfig.load_yaml(path)
    assert loaded.lr == 5e-5 and isinstance(loaded.lr, float)
    assert loaded.lr_choices == (1e-5, 2e-5)
    assert loaded.runs == 4
    assert loaded.aux == ("one/model",)
    assert loaded.augment is False


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runs": 0}, "runs must be at least 1"),
        ({"steps": -5}, "steps must be at least 1"),
        ({"lp_steps": 0}, "lp_steps must be at least 1"),
        ({"eval_every": 0}, "eval_every must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"holdout_fraction": 0.0}, "holdout_fraction"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"image_size": 4}, "image_size"),
        ({"method": "median"}, "method must be one of uniform, greedy"),
        ({"strategy": "stacking"}, "strategy must be one of"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"bn_policy": "train"}, "bn_policy must be one of"),
        ({"lr_choices": ()}, "lr_choices must not be empty"),
        ({"base": ""}, "base is required"),
        ({"target": ""}, "target is required"),
    ],
)
def test_impossible_values_raise_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        config(**changes)
    with pytest.raises(ConfigError, match=message):  # the YAML / CLI path
        RecipeConfig.from_dict({**REQUIRED, **changes})
    with pytest.raises(ConfigError, match=message):  # replace() validates too
        config().replace(**changes)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        config(runs=0, steps=0, method="x")
    assert all(part in str(caught.value) for part in ("runs", "steps", "method"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"step": 5}, "unknown recipe keys: step"),
        ({"runs": "many"}, "runs must be int"),
        ({"runs": 2.5}, "runs must be int"),
        ({"lr": "fast"}, "lr must be float"),
        ({"augment": "maybe"}, "augment must be bool"),
        ({"runs": None}, "runs must not be empty"),
    ],
)
def test_bad_keys_and_types_raise_config_error(data, message):
    with pytest.raises(ConfigError, match=message):
        RecipeConfig.from_dict({**REQUIRED, **data})


def test_a_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("- base\n- target\n")
    with pytest.raises(ConfigError, match="mapping"):
        RecipeConfig.load_yaml(path)


def test_config_error_is_a_value_error():
    # the CLI turns ValueErrors into `error: ...` and exit code 2
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "changes",
    [
        {"lr": -1e-3},
        {"lp_lr": -1e-2},
        {"weight_decay": -1.0},
        {"dropout": 1.5},
        {"lr_choices": (1e-3, -1e-3)},
        {"dropout_choices": (0.0, 2.0)},
        {"weight_decay_choices": (-1e-4,)},
    ],
)
def test_impossible_optimiser_values_raise_config_error(changes):
    with pytest.raises(ConfigError):
        config(**changes)


# -- per-run hyperparameters ------------------------------------------------------------------------


def test_run_zero_takes_the_defaults_even_outside_the_choices():
    c = config(lr=7e-4, weight_decay=0.0, dropout=0.3)
    assert draw_hparams(c, 0) == RunHParams(lr=7e-4, weight_decay=0.0, dropout=0.3)


def test_draws_are_deterministic_and_in_the_choice_sets():
    c = config()
    draws = [draw_hparams(c, seed) for seed in range(1, 121)]
    assert draws == [draw_hparams(config(), seed) for seed in range(1, 121)]  # same seed, same draw
    assert {d.lr for d in draws} == set(c.lr_choices)  # every choice is reached, nothing else
    assert {d.weight_decay for d in draws} == set(c.weight_decay_choices)
    assert {d.dropout for d in draws} == set(c.dropout_choices)
    assert len(set(draws)) == len(c.lr_choices) * len(c.weight_decay_choices) * len(c.dropout_choices)


def test_each_hparam_has_its_own_rng():
    # With one RNG per run (not per name), two hparams with the same choices would always agree.
    same = (0.1, 0.2, 0.5)
    c = config(lr_choices=same, dropout_choices=same)
    pairs = [(draw_hparams(c, s).lr, draw_hparams(c, s).dropout) for s in range(1, 61)]
    assert sum(lr != dropout for lr, dropout in pairs) >= 20


@pytest.mark.parametrize(
    ("changed", "unchanged"),
    [
        ({"weight_decay_choices": (0.5, 0.25, 0.125, 0.0625)}, ("lr", "dropout")),
        ({"lr_choices": (1.0, 2.0, 3.0, 4.0, 5.0)}, ("weight_decay", "dropout")),
        ({"dropout_choices": (0.2,)}, ("lr", "weight_decay")),
    ],
)
def test_changing_one_choice_list_never_reshuffles_the_others(changed, unchanged):
    before, after = config(), config(**changed)
    for seed in range(1, 61):
        a, b = draw_hparams(before, seed), draw_hparams(after, seed)
        for name in unchanged:
            assert getattr(a, name) == getattr(b, name), (seed, name)


def test_intertrain_draws_as_recycle_does_and_honours_what_it_is_given():
    recipe = config()
    intertrain = IntertrainConfig(base="org/base", dataset="org/data", seed=7)
    assert draw_hparams(intertrain, 0) == RunHParams(lr=5e-5, weight_decay=0.0, dropout=0.0)  # the method's defaults
    assert [draw_hparams(intertrain, i) for i in range(1, 30)] == [draw_hparams(recipe, i) for i in range(1, 30)]
    given = IntertrainConfig(base="org/base", dataset="org/data", seed=1, lr=1e-3, dropout=0.25)
    drawn = [draw_hparams(given, i) for i in range(30)]
    assert {(h.lr, h.dropout) for h in drawn} == {(1e-3, 0.25)}  # every run, whatever its seed or index
    assert {h.weight_decay for h in drawn} == {0.0, *given.weight_decay_choices}  # not given: drawn
