"""Model Ratatouille from Python, on local folders, offline.

Builds the toy world of `ratatouille-hub demo` (a base, three community fine-tunes and a 4-domain
target) under ./example-output/world, recycles it with a small recipe, and classifies one image with
the soup through a standard transformers pipeline.

    python examples/recycle_python_api.py
"""

from pathlib import Path

from ratatouille_hub import RecipeConfig, recycle
from ratatouille_hub.toy.demo import AUX_TASKS, build_world

output = Path("example-output")
world = build_world(output / "world")

config = RecipeConfig(
    base=str(world["base"]),
    target=str(world["target"]),
    aux=tuple(str(world[task]) for task in AUX_TASKS),  # local folders: no discovery needed
    test_domain="sketch",
    runs=4,  # run 0 from the base, runs 1-3 from one community fine-tune each
    steps=200,
    eval_every=50,
    lp_steps=300,
    lp_lr=1e-2,
    warmup_steps=50,
    lr=1e-3,
    lr_choices=(5e-4, 1e-3, 2e-3),
    method="greedy",
    output=str(output / "recycle"),
)
results = recycle(config)
for row in results.summary:
    print(f"{row.name:<48} held-out {100 * row.test_accuracy:.1f}%")

from transformers import pipeline  # noqa: E402  (imported late: the recipe above is the point)

from ratatouille_hub.sources import load_dataset_source  # noqa: E402
from ratatouille_hub.toy.world import SHAPES as toyworld_classes  # noqa: E402

soup = output / "recycle" / "soup"
classify = pipeline("image-classification", model=str(soup))
sketch = load_dataset_source(str(world["target"])).filter(lambda d: d == "sketch", input_columns="domain")[0]
print("first sketch:", classify(sketch["image"], top_k=1)[0], "true:", toyworld_classes[sketch["label"]])
print(f"replay with: ratatouille-hub recycle --config {output / 'recycle' / 'recipe.yaml'}")
