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

import sys
import types

from .config import IntertrainConfig, MergeOptions, RecipeConfig

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


class _MergeEntry:
    """`ratatouille_hub.merge` names two things: the API call, `merge(options)` (`ratatouille_hub.merging.merge`),
    and the merge engine's submodule. Calling it merges; its attributes are the submodule's (imported on first
    use, so `import ratatouille_hub` stays light), so `from ratatouille_hub import merge` serves both."""

    __slots__ = ()

    @property
    def __dict__(self) -> dict:  # the submodule's namespace, as monkeypatching and introspection read it
        return vars(_engine())

    def __call__(self, options: MergeOptions, **kwargs):
        from .merging import merge as run

        return run(options, **kwargs)

    def __getattr__(self, name: str):
        return getattr(_engine(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(_engine(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(_engine(), name)


def _engine():
    import importlib

    return importlib.import_module(f"{__name__}.merge")


class _Package(types.ModuleType):
    # importing the submodule sets the package's `merge` to it: the entry stays, and reaches the submodule
    merge = property(lambda package: _MERGE_ENTRY, lambda package, submodule: None)


_MERGE_ENTRY = _MergeEntry()
sys.modules[__name__].__class__ = _Package
