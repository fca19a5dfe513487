"""ratatouille-hub: Model Ratatouille (Ramé et al., ICML 2023) on the Hugging Face stack.

from ratatouille_hub import RecipeConfig, plan_recipe, recycle
config = RecipeConfig(base="org/base", target="org/dataset", aux=("org/ft-a",))
plan = plan_recipe(config)    # every run, before anything trains
results = recycle(config)     # plan -> execute -> assemble; a typed Results record

from ratatouille_hub import IntertrainConfig, intertrain
folders = intertrain(IntertrainConfig(base="org/base", dataset="org/aux-dataset", steps=2000))

from ratatouille_hub import MergeOptions, merge
result = merge(MergeOptions(models=("org/ft-a", "./ft-b"), output="merged"))  # card and merge.yaml beside it
"""

from .config import IntertrainConfig, MergeOptions, RecipeConfig
from .logs import install as _install_logging

_install_logging()  # progress lines on stderr, for the API as for the command (docs/logging.md)

__version__ = "0.1.0"
__all__ = [
    "IntertrainConfig",
    "MergeOptions",
    "RecipeConfig",
    "intertrain",
    "merge",
    "plan_recipe",
    "recycle",
    "__version__",
]


def recycle(config: RecipeConfig, **kwargs):
    """Run the recipe (see `ratatouille_hub.recipe.recycle`); imported lazily to keep imports fast."""
    from .recipe import recycle as run

    return run(config, **kwargs)


def plan_recipe(config: RecipeConfig, **kwargs):
    """The recipe's plan, without training or writing (see `ratatouille_hub.recipe.plan_recipe`)."""
    from .recipe import plan_recipe as plan

    return plan(config, **kwargs)


def intertrain(config: IntertrainConfig, **kwargs):
    """Fine-tune the base on an auxiliary dataset (see `ratatouille_hub.intertrain.intertrain`)."""
    from .intertrain import intertrain as run

    return run(config, **kwargs)


def merge(options: MergeOptions, **kwargs):
    """Merge checkpoints (folders or Hub ids) by a registered method, with a card and merge.yaml (see
    `ratatouille_hub.merging.merge`)."""
    from .merging import merge as run

    return run(options, **kwargs)
