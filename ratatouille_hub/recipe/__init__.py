"""The Model Ratatouille recipe (METHOD.md) as plan -> execute -> assemble.

    plan      fetch the base, discover and vet the fine-tunes to recycle, describe the target, and list
              the shared linear probe and every run (init, hparams, seeds, folder key): no training
    execute   train what the plan still misses (the only place training happens)
    assemble  average, score, diagnose and write the result folder from finished run folders

Every expensive artefact lives in a folder named after a hash of what produced it, written whole or not
at all, with a `done` marker: rerunning an interrupted recipe redoes only what is missing.

    output/
      recipe.yaml        the config, replayable with --config
      lp/<hash>/         the shared linear-probe head
      inits/<hash>/      fusing only: one run's starting point, a convex combination of checkpoints
      runs/<hash>/       one target fine-tune: model/, metrics.json, predictions.safetensors, done
      soup/              the result as a transformers model folder (+ README.md, recipe.yaml, results.json):
                         the weight average (ratatouille, soup) or the best run by validation (erm, fusing)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ..config import RecipeConfig
from ..discover import discover_finetunes, format_candidates
from ..errors import RecipeError
from ..fetch import Ingredient, is_hub_id, resolve_dataset, resolve_model
from ..io import exclusive_lock, sweep_staging
from ..models import quiet_transformers
from ..results import Results
from ..strategies import STRATEGIES
from ..target import TargetPreparation
from ..vetting import vet_ingredients
from .assembly import assemble
from .executor import execute
from .plan import RecipePlan, build_plan, format_plan

__all__ = ["RecipeError", "RecipePlan", "Results", "plan_recipe", "recycle", "format_plan"]


def recycle(config: RecipeConfig, *, token: str | bool | None = None, echo: Callable[[str], None] = print) -> Results:
    """Run the whole recipe; returns the results written to `<output>/soup/results.json`."""
    plan, target = _plan(config, token, echo)
    decoded = target.decode()
    output = Path(config.output)
    with claimed_output(output, config):  # every input checked: only now is anything written
        execute(plan, output, decoded, echo)
        return assemble(plan, output, decoded, echo)


def plan_recipe(
    config: RecipeConfig, *, token: str | bool | None = None, echo: Callable[[str], None] = print
) -> RecipePlan:
    """The recipe's plan, without training and without writing anything (`recycle --dry-run`)."""
    return _plan(config, token, echo)[0]


def _plan(config: RecipeConfig, token, echo) -> tuple[RecipePlan, TargetPreparation]:
    quiet_transformers()
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"output {output} exists and is not a folder")
    check_same_recipe(output / "recipe.yaml", config)  # read only: refuse another recipe's folder before any work
    base, recycled = fetch_ingredients(config, token, echo)
    echo(f"[data] {config.target}")
    target = TargetPreparation(config, base, token)
    spec = target.spec()
    echo(f"[data] {spec.reference}: train domains {', '.join(spec.train_domains)}; held out: {spec.test_domain}")
    return build_plan(config, base, recycled, spec, trained_on), target


def fetch_ingredients(config: RecipeConfig, token, echo) -> tuple[Ingredient, list[Ingredient]]:
    """The base and the vetted fine-tunes to recycle, each pinned to the revision seen now."""
    echo(f"[fetch] base {config.base}")
    base = resolve_model(config.base, token=token)
    recycled = [resolve_model(*_pinned(source), token=token) for source in recycled_sources(config, token, echo)]
    for ingredient in recycled:
        echo(f"[fetch] recycled {ingredient.reference}")
    vet_ingredients(base, recycled)
    if STRATEGIES[config.strategy].needs_recycled and not recycled:
        raise RecipeError(
            f"--strategy {config.strategy} needs recycled fine-tunes (--aux, or a Hub base to discover them)"
        )
    return base, recycled


def recycled_sources(config: RecipeConfig, token, echo) -> list[str]:
    """The --aux list, or (Hub base, no --aux) the fine-tunes discovery accepts, pinned as id@sha."""
    if not STRATEGIES[config.strategy].recycles:
        return []
    if config.aux or not is_hub_id(config.base):
        return list(config.aux)
    echo(f"[discover] fine-tunes of {config.base} on the Hub")
    target_id, _, _ = resolve_dataset(config.target, config.domain_column, config.label_column)
    candidates = discover_finetunes(config.base, target=target_id, limit=config.aux_limit, token=token)
    echo(format_candidates(candidates))
    return [f"{c.repo_id}@{c.revision}" for c in candidates if c.accepted]


def _pinned(source: str) -> tuple[str, str | None]:
    """`org/name@sha` -> (org/name, sha); folders and plain ids -> (source, None)."""
    name, at, revision = source.partition("@")
    if at and is_hub_id(name) and not Path(source).exists():
        return name, revision
    return source, None


def trained_on(ingredient: Ingredient) -> str:
    """The dataset(s) a fine-tune's card names (its own reference when it names none): fusing groups by it."""
    from huggingface_hub import ModelCard

    card = ingredient.path / "README.md"
    try:
        datasets = ModelCard.load(card).data.datasets if card.is_file() else None
    except Exception:  # a card we cannot parse names no dataset
        datasets = None
    if isinstance(datasets, str):
        datasets = [datasets]
    return ",".join(sorted(str(d) for d in datasets)) if datasets else ingredient.reference


@contextmanager
def claimed_output(output: Path, config: RecipeConfig):
    """Lock the output folder and save recipe.yaml in it. Taken only once every input has been checked,
    so a command that fails on bad input leaves the output folder as it found it."""
    output.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output / ".lock", f"{output} is in use by another ratatouille-hub process"):
        check_same_recipe(output / "recipe.yaml", config)
        for folder in (output, output / "lp", output / "inits", output / "runs"):  # what a killed run left half-written
            sweep_staging(folder)
        config.save_yaml(output / "recipe.yaml")
        yield


# A changed value of these keeps every finished run valid (a run's folder is named after its own
# init, so strategy and aux only choose which runs exist); any other change is another recipe.
REUSABLE_CHANGES = frozenset({"runs", "method", "bn_policy", "output", "strategy", "aux", "aux_limit"})


def check_same_recipe(saved: Path, config: RecipeConfig) -> None:
    """Refuse an output folder that holds another recipe's runs (mixing them would mislead)."""
    if not saved.exists():
        return
    previous = RecipeConfig.load_yaml(saved).to_dict()
    changed = sorted(k for k, v in config.to_dict().items() if previous.get(k) != v and k not in REUSABLE_CHANGES)
    if changed:
        raise RecipeError(
            f"{saved.parent} holds the runs of another recipe (differs in: {', '.join(changed)}); "
            "use another --output, or replay it with --config " + str(saved)
        )
