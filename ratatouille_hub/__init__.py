"""ratatouille-hub: Model Ratatouille (Ramé et al., ICML 2023) on the Hugging Face stack.

Every command is a function of its options object (the dataclasses that make its flags), returning a typed record:

from ratatouille_hub import RecipeConfig, plan_recipe, recycle
config = RecipeConfig(base="org/base", target="org/dataset", aux=("org/ft-a",))
plan = plan_recipe(config)    # every run, before anything trains
results = recycle(config)     # plan -> execute -> assemble; a typed Results record

from ratatouille_hub import DiscoverOptions, discover
found = discover(DiscoverOptions(base="org/base", target="PACS"))  # each fine-tune's verdict, no weight downloaded

from ratatouille_hub import MergeOptions, merge
result = merge(MergeOptions(models=("org/ft-a", "./ft-b"), output="merged"))  # card and merge.yaml beside it

diagnose, assemble, contribute, update, push, intertrain and read_results (`ratatouille-hub results`) follow
the same shape; `ratatouille_hub.records.to_json` prints any record as `--format json` does.
"""

from .api import (
    Contribution,
    Discovery,
    UpdateResult,
    assemble,
    contribute,
    diagnose,
    discover,
    intertrain,
    merge,
    plan_recipe,
    push,
    read_results,
    recycle,
    update,
)
from .config import (
    AssembleOptions,
    ContributeOptions,
    DiagnoseOptions,
    DiscoverOptions,
    IntertrainConfig,
    MergeOptions,
    PushOptions,
    RecipeConfig,
    ResultsOptions,
    UpdateOptions,
)
from .logs import install as _install_logging

_install_logging()  # progress lines on stderr, for the API as for the command (docs/logging.md)

__version__ = "0.1.0"
__all__ = [
    "AssembleOptions",
    "ContributeOptions",
    "Contribution",
    "DiagnoseOptions",
    "DiscoverOptions",
    "Discovery",
    "IntertrainConfig",
    "MergeOptions",
    "PushOptions",
    "RecipeConfig",
    "ResultsOptions",
    "UpdateOptions",
    "UpdateResult",
    "assemble",
    "contribute",
    "diagnose",
    "discover",
    "intertrain",
    "merge",
    "plan_recipe",
    "push",
    "read_results",
    "recycle",
    "update",
    "__version__",
]
