"""ratatouille-hub: Model Ratatouille (Ramé et al., ICML 2023) on the Hugging Face stack.

    from ratatouille_hub import RecipeConfig, recycle
    results = recycle(RecipeConfig(base="org/base", target="org/dataset", aux=("org/ft-a",)))
"""

from .config import RecipeConfig

__version__ = "0.1.0"
__all__ = ["RecipeConfig", "recycle", "__version__"]


def recycle(config: RecipeConfig, **kwargs):
    """Run the recipe (see `ratatouille_hub.recipe.recycle`); imported lazily to keep imports fast."""
    from .recipe import recycle as run

    return run(config, **kwargs)
