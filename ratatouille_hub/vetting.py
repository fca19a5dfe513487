"""Pre-flight checks of the checkpoints a recipe would average, before any data is decoded, any step is
trained or anything is written.

Every recycled checkpoint must descend from the base (docs/method.md): same architecture, same backbone
tensors (names, shapes, dtypes), finite weights, and weights near the base's. Nothing here runs code from
a checkpoint: configs are read as JSON, weights through safetensors headers and tensor reads, and a config
that asks for custom code (`auto_map`) is refused outright. A headless base (a ViTModel) is read under its
classifier's tensor names (`discovery.classifier_names`), as from_pretrained loads it and its fine-tunes name it.

Distance to the base
--------------------
`distance_to_base` is the relative L2 distance ||w - w_base|| / ||w_base|| over the backbone's weight
kernels: floating tensors with two or more dimensions (conv and linear weights), the head excluded.
One-dimensional tensors are left out on purpose: BatchNorm scales and shifts, biases and running
statistics start at the same constants (1 or 0) in every initialisation, so they make an unrelated model
look close (an independently initialised toy-world ResNet measures 0.85 with them, 1.32 without), and
community fine-tunes trained with BatchNorm in train mode move their running statistics a lot.

The threshold is MAX_DISTANCE_TO_BASE = 1.0: a checkpoint farther from the base than the zero vector is
refused. A model whose weights are uncorrelated with the base's measures sqrt(1 + (|w| / |w_base|)^2) > 1
whatever its scale, while a fine-tune keeps most of its base. Measured (docs/errors.md has the table):
fine-tunes of the toy world's base measure 0.11 to 0.42 (community fine-tunes 0.21 to 0.33, target runs
started from them up to 0.42; lr 1e-3 Adam on an 80k-parameter net, likely more motion than a real
fine-tune); independently initialised models of the same shapes measure 1.32 (toy-world ResNet) and 1.41
(ResNet-50). Two models trained separately from the same random init measure 0.70 and pass: the check
catches a different base, not every incompatible pair (a loss barrier between the two measures the rest).
Since measured: the demo world's careful fine-tunes (intertrain, lr 1e-3, 250 steps) 0.195 to 0.291 (0.012
to 0.053 while intertrain still drew their lr, 1e-5 to 5e-5, from the seed), its careless one (BatchNorm trained, lr 3e-3) 0.450, and 1.48 at lr 1e-2 (refused); the real EfficientNet-Lite0
fine-tuned 1000 steps on caltech101 by intertrain (lr 3e-5 to 5e-5), 0.029 to 0.032.

What vetting reports without refusing
-------------------------------------
Each accepted fine-tune's distance, and how far its BatchNorm running statistics moved from the base's
(`batchnorm_shift`, the same relative distance over running means and variances: exactly 0 when they
were frozen, as the recipe and `intertrain` train). Two signs of a fine-tune made otherwise are flagged,
since runs from it may not average with the rest: statistics that moved, and a distance more than
OUTLIER_FACTOR times the median of the other fine-tunes' (a larger learning rate or longer training),
when there are at least MIN_OTHERS others.
Both are warnings, not refusals: whether such a run helps is for greedy averaging and the barriers of
diagnose to say, on validation.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .discovery import backbone_mismatch, classifier_names, head_names_of, local_signature
from .errors import RatatouilleError
from .fetch import Ingredient, weight_files

MAX_DISTANCE_TO_BASE = 1.0
# A distance above this multiple of the others' median is flagged. Not less: distance grows about with the
# learning rate, and the recipe's own grid spans 5x (1e-5..5e-5; its PACS fine-tunes: 0.012-0.056).
OUTLIER_FACTOR = 5.0
MIN_OTHERS = 3  # ... among at least this many others: the median of two is just their mean
BATCHNORM_STATISTICS = ("running_mean", "running_var")


@dataclass(frozen=True)
class Vetted:
    """An accepted fine-tune and what vetting measured on it."""

    source: str
    distance: float  # to the base, over the backbone's kernels
    batchnorm_shift: float  # to the base's running statistics (0.0: frozen; nan: the model has none)
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        moved = (
            "no BatchNorm statistics"
            if math.isnan(self.batchnorm_shift)
            else "BatchNorm statistics unchanged"
            if self.batchnorm_shift == 0.0
            else f"BatchNorm statistics moved {self.batchnorm_shift:.3f}"
        )
        return f"{self.source}: distance to the base {self.distance:.3f}, {moved}"


CODE_CONFIGS = ("config.json", "preprocessor_config.json")


class IngredientError(RatatouilleError, ValueError):
    """A checkpoint that cannot join the soup of this base."""


def vet_ingredients(
    base: Ingredient, aux: list[Ingredient], refuse: Callable[[Ingredient, IngredientError], None] | None = None
) -> list[Vetted]:
    """Refuse, with one line naming the checkpoint, anything that is not a usable fine-tune of `base`;
    report on the rest (module docstring). With `refuse`, a refused fine-tune is handed to it and left out
    instead: discovered fine-tunes are strangers' repos, and one of them must not stop every recipe."""
    base_config = read_config(base)
    stored = signature_of(base)  # validates every header (truncation, corruption, absurd shapes)
    try:
        head_names = head_names_of(base.path / "config.json", stored)  # a weightless model: no code, no memory
        read = classifier_names(base.path / "config.json", stored)  # headless: as its fine-tunes name it
    except (ValueError, ImportError) as error:  # unknown model_type, missing library, no linear head
        raise IngredientError(f"{base.source}: {named(base, _first_line(error))}") from None
    check_finite(base, head_names)
    base_signature, names = read.renamed(stored), read.names
    head_names = head_names | read.dropped  # what neither the base's classifier nor a fine-tune's is compared on
    measured = []
    for ingredient in aux:
        try:
            distance = _distance_of_a_finetune(base, base_config, base_signature, head_names, names, ingredient)
        except IngredientError as error:
            if refuse is None:
                raise
            refuse(ingredient, error)
            continue
        measured.append((ingredient.source, distance, batchnorm_shift(base, ingredient, names)))
    return [
        Vetted(
            source, distance, shift, _warnings(distance, shift, [d for j, (_, d, _) in enumerate(measured) if j != i])
        )
        for i, (source, distance, shift) in enumerate(measured)
    ]


def _distance_of_a_finetune(
    base: Ingredient,
    base_config: dict,
    base_signature: dict,
    head_names: set[str],
    base_names: dict[str, str],
    ingredient: Ingredient,
) -> float:
    """`ingredient`'s distance to the base (`base_signature`: under the names `base_names` gives the base's
    stored ones); IngredientError when it is not a usable fine-tune of it."""
    config = read_config(ingredient)
    if config.get("model_type") != base_config.get("model_type"):
        raise IngredientError(
            f"{ingredient.source} is a {config.get('model_type')} model but the base {base.source} is "
            f"{base_config.get('model_type')}: only fine-tunes of the base can be recycled"
        )
    signature = signature_of(ingredient)
    problem = backbone_mismatch(base_signature, signature, head_names)
    if problem:
        raise IngredientError(f"{ingredient.source} cannot be averaged with {base.source}: {problem}")
    check_finite(ingredient, head_names)
    distance = distance_to_base(base, ingredient, base_signature, head_names, base_names)
    if not distance <= MAX_DISTANCE_TO_BASE:
        raise IngredientError(
            f"{ingredient.source} is not a fine-tune of {base.source}: its backbone weights are at relative "
            f"distance {distance:.2f} from the base's (fine-tunes stay within {MAX_DISTANCE_TO_BASE:g})"
        )
    return distance


def signature_of(ingredient: Ingredient) -> dict:
    """The ingredient's tensor signature from its validated headers; a bad header is refused as `named`."""
    from .merge_engine import MergeError

    try:
        return local_signature(ingredient.path)
    except MergeError as error:  # its line starts with the file's path
        raise IngredientError(named(ingredient, str(error))) from None


def named(ingredient: Ingredient, text: str) -> str:
    """`text` (an error line) with a Hub model's folder written `org/name@sha`: its path inside the HF cache
    names neither the repo nor how to get it again. A local folder stays the path the user gave."""
    return text if ingredient.is_local else text.replace(str(ingredient.path), ingredient.reference)


def _warnings(distance: float, shift: float, others: list[float]) -> tuple[str, ...]:
    warnings = []
    if shift > 0.0:
        warnings.append("its BatchNorm statistics were trained (the recipe freezes them)")
    if len(others) >= MIN_OTHERS and distance > OUTLIER_FACTOR * statistics.median(others):
        warnings.append(
            f"it moved {distance / statistics.median(others):.1f}x as far from the base as the median of the others"
        )
    return tuple(warnings)


def batchnorm_shift(base: Ingredient, ingredient: Ingredient, base_names: dict[str, str] | None = None) -> float:
    """||s - s_base|| / ||s_base|| over the BatchNorm running means and variances (nan if there are none)."""
    return _relative_distance(base, ingredient, lambda name, tensor: name.endswith(BATCHNORM_STATISTICS), base_names)


def read_config(ingredient: Ingredient) -> dict:
    """config.json as JSON; a config or image-processor config that asks for custom code is refused."""
    path = ingredient.path / "config.json"
    if not path.is_file():
        raise IngredientError(f"{ingredient.source}: no config.json (not a transformers model folder)")
    configs = {}
    for name in CODE_CONFIGS:
        file = ingredient.path / name
        if not file.is_file():
            continue
        try:
            configs[name] = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise IngredientError(f"{ingredient.source}: {name} is not valid JSON ({error})") from None
        if not isinstance(configs[name], dict):
            raise IngredientError(f"{ingredient.source}: {name} is not a JSON object")
        if "auto_map" in configs[name]:
            raise IngredientError(
                f"{ingredient.source}: {name} asks for custom code (auto_map); code from a checkpoint is never run"
            )
    return configs["config.json"]


def _tensors(folder: Path):
    """(file, name, tensor) for every tensor of a folder's weights, one at a time (memory stays one tensor)."""
    from safetensors import safe_open

    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield file, name, handle.get_tensor(name)


def check_finite(ingredient: Ingredient, skip: set[str]) -> None:
    """Every floating tensor outside `skip` (the head, which is replaced anyway) must be finite."""
    import torch

    for file, name, tensor in _tensors(ingredient.path):
        if name in skip or not tensor.is_floating_point():
            continue
        if not torch.isfinite(tensor).all():
            raise IngredientError(f"{named(ingredient, str(file))}: tensor {name!r} contains NaN or Inf")


def distance_to_base(
    base: Ingredient,
    ingredient: Ingredient,
    base_signature: dict,
    head_names: set[str],
    base_names: dict[str, str] | None = None,
) -> float:
    """||w - w_base|| / ||w_base|| over the backbone's weight kernels (float tensors with 2+ dimensions)."""
    kernels = {
        name
        for name, (dtype, shape) in base_signature.items()
        if name not in head_names and len(shape) >= 2 and dtype in ("F64", "F32", "F16", "BF16")
    }
    distance = _relative_distance(base, ingredient, lambda name, tensor: name in kernels, base_names)
    return 0.0 if math.isnan(distance) else distance


def _relative_distance(
    base: Ingredient, ingredient: Ingredient, selected, base_names: dict[str, str] | None = None
) -> float:
    """||w - w_base|| / ||w_base|| over the tensors `selected(name, tensor)` keeps (nan: it keeps none); the
    base's tensors are read under the names `base_names` gives their stored ones (`classifier_names`)."""
    from safetensors import safe_open

    squared_difference = squared_norm = 0.0
    kept = 0
    with ExitStack() as stack:
        base_files = {}
        for file in weight_files(base.path):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for stored in handle.keys():
                name = stored if base_names is None else base_names.get(stored)
                if name is not None:
                    base_files[name] = (handle, stored)
        for _, name, tensor in _tensors(ingredient.path):
            if name not in base_files or not tensor.is_floating_point() or not selected(name, tensor):
                continue
            handle, stored = base_files[name]
            reference = handle.get_tensor(stored).double()
            if reference.shape != tensor.shape:
                continue
            kept += 1
            squared_difference += float((tensor.double() - reference).pow(2).sum())
            squared_norm += float(reference.pow(2).sum())
    if kept == 0:
        return math.nan
    if squared_norm == 0.0:
        return 0.0 if squared_difference == 0.0 else math.inf
    return math.sqrt(squared_difference / squared_norm)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
