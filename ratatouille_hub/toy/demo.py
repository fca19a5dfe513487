"""The embedded default: a tiny world built from scratch, then recycled, with no network.

1. A small ResNet (about 80k parameters) is pretrained for seconds on generated digits: the base.
2. Three community fine-tunes of it on other generated tasks (stripes, dots, polygons), made the way the
   method assumes, with the product's own `intertrain` (BatchNorm statistics frozen, the recipe's lr),
   each with a card naming its base and dataset; and a fourth made carelessly, as many Hub fine-tunes
   are: BatchNorm in train mode and a 3x larger learning rate, and the most downloaded of all.
3. A target with a real domain shift: six shapes drawn as photo, sketch, cartoon and painting.
4. The same budget of target fine-tunes three times: all from the base (model soups), from random
   mixes of base and fine-tunes (fusing), and from the recycled fine-tunes (Model Ratatouille);
   compared with ERM, inter-training and the ensemble. The output shows the product catching the
   careless fine-tune: vetting's distance and BatchNorm check, greedy leaving its run out (or not), and
   the barrier on the weight path to it.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import RecipeConfig
from ..data import ImageTensors, decode_images
from ..io import atomic_write_text
from ..results import Results
from ..safe_text import say
from ..train import DomainBatches, make_accelerator, optimize
from ..vetting import Vetted

log = logging.getLogger(__name__)
BASE_ID = "toy-world/resnet-tiny"
TARGET_ID = "toy-world/shapes"
SOUP_ID = "demo/ratatouille-soup"
AUX_TASKS = ("stripes", "dots", "polygons")
CARELESS_TASK = "polygons"  # the careless fine-tune's task: one the careful fine-tunes also learn
CARELESS_ID = f"quick-finetunes/resnet-tiny-{CARELESS_TASK}"


@dataclass(frozen=True)
class WorldDesign:
    """Every knob of the toy world and the demo's recipe, in one place, so benchmarks/demo_criteria.py can
    measure the method's three criteria on training-domain validation for any variant of it.

    Chosen on training-domain validation only, with that script (the held-out domain never drawn): a base
    pretrained long enough that its features transfer (linear probe 77.8%); community fine-tunes that stay
    close to it (lr 1e-4: distance 0.07 against 0.2-0.3 before), so runs from them
    stay linearly connected with runs from the base; target runs at lr 2e-4 to 5e-4, where the runs from
    the base average above their own mean (at 3e-4 to 1e-3 they did not).
    """

    pretrain_images: int = 4000
    pretrain_steps: int = 1200
    pretrain_lr: float = 2e-3
    finetune_steps: int = 250  # the community fine-tunes and the careless one
    community_lr: float = 1e-4
    careless_lr: float = 3e-4  # 3x the community's, BatchNorm trained: what vetting flags
    target_per_class_per_domain: int = 60  # 216 validation images: one image is 0.46 points
    runs: int = 6
    steps: int = 300
    batch_size: int = 32  # images per training domain per step
    eval_every: int = 50
    lp_steps: int = 400
    lp_lr: float = 1e-2
    warmup_steps: int = 50
    lr: float = 3e-4
    lr_choices: tuple[float, ...] = (2e-4, 3e-4, 5e-4)
    weight_decay_choices: tuple[float, ...] = (1e-4, 1e-6)
    dropout_choices: tuple[float, ...] = (0.0, 0.1, 0.5)


DESIGN = WorldDesign()
STRATEGIES = {
    "soup": "every run from the base",
    "fusing": "every run from a random mix of the base and the recycled fine-tunes",
    "ratatouille": "runs from recycled fine-tunes",
}
VETTED = "ratatouille-vetted"  # the last recycle: only the fine-tunes vetting did not flag
IMAGE_SIZE = 32


def build_world(
    root: Path, echo: Callable[[str], None] = log.info, seed: int = 0, design: WorldDesign = DESIGN
) -> dict[str, Path]:
    """Write the base, the community fine-tunes and the target dataset under `root`; reuse them if present."""
    from . import world as toyworld

    paths = build_checkpoints(root, echo, seed, design)
    paths["target"] = root / "datasets" / TARGET_ID
    if not (paths["target"] / "README.md").exists():
        echo("[world] drawing the target: six shapes in four styles")
        _save_dataset(
            toyworld.target_dataset(design.target_per_class_per_domain, size=IMAGE_SIZE, seed=seed),
            paths["target"],
            TARGET_ID,
            toyworld.describe()["shapes"],
        )
    return paths


def build_checkpoints(
    root: Path, echo: Callable[[str], None] = log.info, seed: int = 0, design: WorldDesign = DESIGN
) -> dict[str, Path]:
    """Write the base, the community fine-tunes and the careless one under `root`; reuse them if present."""
    from . import world as toyworld

    paths = {"base": root / BASE_ID}
    aux_tasks = toyworld.aux_datasets(size=IMAGE_SIZE, seed=seed)
    if not (paths["base"] / "model.safetensors").exists():
        echo("[world] pretraining the base on generated digits")
        glyphs = toyworld.pretrain_dataset(design.pretrain_images, size=IMAGE_SIZE, seed=seed)
        model = _tiny_resnet(glyphs, seed)
        _train_with_live_batchnorm(
            model,
            glyphs,
            steps=design.pretrain_steps,
            lr=design.pretrain_lr,
            seed=seed,
            accelerator=make_accelerator("no"),
        )
        _save_base(model, paths["base"], dataset="toy-world/glyphs", description=toyworld.describe()["glyphs"])
    for offset, (task, dataset) in enumerate(aux_tasks.items(), start=1):
        paths[task] = community_finetune(root, paths["base"], task, dataset, seed + offset, echo, design)
    paths["careless"] = careless_finetune(root, paths["base"], aux_tasks[CARELESS_TASK], seed + 10, echo, design)
    return paths


def community_finetune(
    root: Path, base: Path, task: str, dataset, seed: int, echo, design: WorldDesign = DESIGN
) -> Path:
    """A community fine-tune of the base made with the product's own `intertrain` (BatchNorm statistics
    frozen, last step kept, a card naming the base's Hub id and the dataset); reused when done."""
    from ..config import IntertrainConfig
    from ..intertraining import intertrain
    from . import world as toyworld

    data = root / "datasets" / "toy-world" / task
    if not (data / "README.md").exists():
        echo(f"[world] community fine-tune of the base on '{task}' (ratatouille-hub intertrain)")
        _save_dataset(dataset, data, f"toy-world/{task}", toyworld.describe()[task])
    config = IntertrainConfig(
        base=str(base),
        dataset=str(data),
        base_model=BASE_ID,
        steps=design.finetune_steps,
        batch_size=64,
        lr=design.community_lr,
        image_size=IMAGE_SIZE,
        precision="no",
        seed=seed,
        output=str(root / "intertrain" / task),
    )
    (folder,) = intertrain(config, echo=lambda line: None)
    return folder


def careless_finetune(root: Path, base: Path, dataset, seed: int, echo, design: WorldDesign = DESIGN) -> Path:
    """A fine-tune made the way many Hub fine-tunes are: BatchNorm in train mode (its statistics move to
    the task's), a 3x larger learning rate, no augmentation; with a
    community card naming the base."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..io import staged_folder
    from ..models import load_classifier

    folder = root / CARELESS_ID
    if (folder / "model.safetensors").exists():
        return folder
    echo(
        f"[world] a careless fine-tune of the base on '{CARELESS_TASK}' (BatchNorm trained, lr {design.careless_lr:g})"
    )
    names = dataset.features["label"].names
    torch.manual_seed(seed)
    model = load_classifier(base, dict(enumerate(names)))
    _train_with_live_batchnorm(
        model,
        dataset,
        steps=design.finetune_steps,
        lr=design.careless_lr,
        seed=seed,
        accelerator=make_accelerator("no"),
        augment=False,
        desc="careless fine-tune",
    )
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        _processor().save_pretrained(staging)
        data = ModelCardData(
            base_model=BASE_ID,
            base_model_relation="finetune",
            datasets=[f"toy-world/{CARELESS_TASK}"],
            library_name="transformers",
            pipeline_tag="image-classification",
        )
        body = f"# {folder.name}\n\n{BASE_ID} fine-tuned on {CARELESS_TASK}: lr {design.careless_lr:g}, the model in train mode.\n"
        ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(staging / "README.md")
    return folder


def run_demo(output: Path, hub, echo: Callable[[str], None] = log.info) -> list[dict]:
    """Build the world, publish it on the local Hub, recycle it both ways through the Hub clients,
    print the comparison (the result, on stdout; `echo` says the progress), push the soup and load it back
    from the Hub like any model.

    The HF clients must already point at `hub` (see `localhub.server.hub_environment`): the world's
    checkpoints and dataset are seeded there, so discovery, pinned fetch and push are all real.
    """
    from ..publish import push_folder
    from ..recipe import recycle

    paths = build_world(output / "world", echo)
    publish_world(hub, paths)
    results = {}
    for strategy, what in STRATEGIES.items():
        echo(f"\n== {strategy}: {what}")
        results[strategy] = recycle(demo_config(output, strategy), echo=echo)
    vetted = vet_recycled(results["ratatouille"])
    unflagged = tuple(f"{source}@{v.revision}" for source, v in vetted.items() if not v.vetted.warnings)
    echo(f"\n== ratatouille again, recycling only what vetting did not flag: --aux {' '.join(unflagged)}")
    results[VETTED] = recycle(replace(demo_config(output, "ratatouille"), aux=unflagged), echo=echo)
    rows = comparison_rows(results)
    say("\n" + headline(results))
    say("\n" + criteria_table(results))
    say("\n" + format_table(rows, results["ratatouille"].test_domain))
    say("\n" + careless_digest(results["ratatouille"], results[VETTED], vetted))
    soup = output / "recycle" / "soup"  # the last recycle's: without the flagged fine-tune
    pushed = push_folder(soup, SOUP_ID)
    say(f"\nsoup written to {soup} and pushed to the local Hub as {SOUP_ID} ({pushed.url})")
    say(check_loads(SOUP_ID, results[VETTED]))
    return rows


def publish_world(hub, paths: dict[str, Path]) -> None:
    """Seed the local Hub with the world, as if its authors had pushed it; once, so shas stay put
    and a rerun of the demo reuses every finished run."""
    from ..localhub.store import RepoNotFound

    def seed(kind: str, repo_id: str, folder: Path, downloads: int = 0) -> None:
        try:
            hub.store.get_repo(kind, repo_id)
        except RepoNotFound:
            if kind == "model":
                hub.seed_model(repo_id, folder, downloads=downloads)
            else:
                hub.seed_dataset(repo_id, folder)

    seed("model", BASE_ID, paths["base"], downloads=100)
    for downloads, task in enumerate(AUX_TASKS, start=10):
        seed("model", aux_id(task), paths[task], downloads=downloads)
    seed("model", CARELESS_ID, paths["careless"], downloads=50)  # careless and popular: discovered first
    seed("dataset", TARGET_ID, paths["target"])


def aux_id(task: str) -> str:
    return f"community-{task}/resnet-tiny-{task}"


def comparison_rows(results: dict[str, Results]) -> list[dict]:
    """docs/method.md's table: ERM, model soups, inter-training, fusing, Ratatouille, and the ensemble reference."""
    soups, ratatouille, vetted = results["soup"], results["ratatouille"], results[VETTED]
    return [
        {"method": "ERM (LP init, best run by validation)", **_accuracies(soups.best_single)},
        *({"method": f"Soups, {m}", **_accuracies(soups.averages[m])} for m in soups.averages),
        {"method": "Inter-training (best recycled-init run)", **_accuracies(ratatouille.best_recycled_single)},
        {"method": "Fusing (best run by validation)", **_accuracies(results["fusing"].best_single)},
        *({"method": f"Ratatouille, {m}", **_accuracies(ratatouille.averages[m])} for m in ratatouille.averages),
        {"method": "Ensemble of the Ratatouille runs", **_accuracies(ratatouille.ensemble)},
        *(
            {"method": f"Ratatouille without the flagged, {m}", **_accuracies(vetted.averages[m])}
            for m in ("uniform", "greedy")
        ),
    ]


AVERAGED = {  # the recycles whose uniform averages the headline and the criteria compare
    "soup": "Model soup (every run from the base)",
    VETTED: "Ratatouille (the careful fine-tunes)",
    "ratatouille": "Ratatouille (with the careless one)",
}


def headline(results: dict[str, Results]) -> str:
    """The demo's answer, first: each uniform average against ERM on the held-out domain, as measured."""
    erm = results["soup"].best_single
    domain = results["soup"].test_domain
    lines = [
        f"Held out ({domain}), never seen in training or selection: ERM (best run from the base) {_pct(erm.test_accuracy)}"
    ]
    for key, label in AVERAGED.items():
        average = results[key].averages["uniform"].test_accuracy
        gap = 100 * (average - erm.test_accuracy)
        verdict = f"{abs(gap):.1f} points {'above' if gap > 0 else 'below'} ERM" if round(gap, 1) else "level with ERM"
        lines.append(f"- {label}, uniform average: {_pct(average)}, {verdict}")
    return "\n".join(lines)


def criteria_table(results: dict[str, Results]) -> str:
    """docs/method.md's three criteria for each averaged recycle, as recycle's diagnose measured them on
    training-domain validation (the held-out domain is never read there): the runs' own accuracy, the
    barriers on the weight paths from the best run, the pairs' ratio-error; then the uniform average's."""
    header = (
        f"{'on training-domain validation':<38} {'runs: min-max (mean)':>22} {'barrier: median, max':>21} "
        f"{'ratio-error':>11} {'uniform avg':>11}"
    )
    lines = [header, "-" * len(header)]
    for key, label in AVERAGED.items():
        result = results[key]
        accuracies = [100 * run.val_accuracy for run in result.runs]
        barriers = [100 * pair.barrier for pair in result.diagnostics]
        ratio = statistics.median(pair.ratio_error for pair in result.diagnostics)
        runs = f"{min(accuracies):.1f}-{max(accuracies):.1f} ({statistics.mean(accuracies):.1f})"
        barrier = f"{statistics.median(barriers):.1f}, {max(barriers):.1f}"
        average = 100 * result.averages["uniform"].val_accuracy
        lines.append(f"{label:<38} {runs:>22} {barrier:>21} {ratio:>11.2f} {average:>10.1f}%")
    return "\n".join(lines)


def _pct(accuracy: float) -> str:
    return f"{100 * accuracy:.1f}%"


@dataclass(frozen=True)
class VettedIngredient:
    revision: str
    vetted: Vetted


def vet_recycled(results: Results) -> dict[str, VettedIngredient]:
    """What vetting says about each fine-tune a recycle used (it printed the same while fetching)."""
    from ..fetch import resolve_model
    from ..vetting import vet_ingredients

    recycled = [i for i in results.ingredients if i.source != BASE_ID]
    base = next(i for i in results.ingredients if i.source == BASE_ID)
    report = vet_ingredients(
        resolve_model(base.source, base.revision), [resolve_model(i.source, i.revision) for i in recycled]
    )
    return {i.source: VettedIngredient(i.revision, v) for i, v in zip(recycled, report, strict=True)}


def careless_digest(results: Results, without: Results, vetted: dict[str, VettedIngredient]) -> str:
    """What the product said about the careless fine-tune, and what recycling without it gave."""
    careless = vetted[CARELESS_ID].vetted
    careful = [v.vetted for source, v in vetted.items() if source != CARELESS_ID]
    run = next(r for r in results.runs if r.init.split("@")[0] == CARELESS_ID)
    others = [r for r in results.runs if r.init.split("@")[0] in {v.source for v in careful}]
    greedy = results.averages["greedy"]
    if run.index == results.best_run.index:
        barrier = f"its run is the best by validation; barriers from it to each other run: {_barriers(results)}"
    else:
        [pair] = [p for p in results.diagnostics if p.runs[1] == run.index]
        barrier = (
            f"barrier {100 * pair.barrier:.1f} points on the weight path from the best run to it "
            f"(to each other run: {_barriers(results)})"
        )
    before, after = results.averages["uniform"], without.averages["uniform"]
    return "\n".join(
        [
            f"The careless fine-tune, {CARELESS_ID} (Ratatouille's run {run.index}):",
            f"- vetting: distance to the base {careless.distance:.3f} (the careful ones: "
            + ", ".join(f"{v.distance:.3f}" for v in careful)
            + f"); BatchNorm statistics moved {careless.batchnorm_shift:.3f} (the careful ones: "
            + ", ".join(f"{v.batchnorm_shift:.3f}" for v in careful)
            + ")",
            f"- its run: validation {100 * run.val_accuracy:.1f}%, {results.test_domain} {100 * run.test_accuracy:.1f}% "
            f"(runs from the careful ones: validation "
            + ", ".join(f"{100 * r.val_accuracy:.1f}%" for r in others)
            + ")",
            f"- greedy: {'kept it' if run.index in greedy.members else 'left it out'} "
            f"({len(greedy.members)} of {len(results.runs)} runs kept)",
            f"- diagnose: {barrier}; without it, from the best run: {_barriers(without)}",
            f"- Ratatouille uniform without it: validation {100 * before.val_accuracy:.1f}% -> "
            f"{100 * after.val_accuracy:.1f}%, {results.test_domain} {100 * before.test_accuracy:.1f}% -> "
            f"{100 * after.test_accuracy:.1f}%",
        ]
    )


def _barriers(results: Results) -> str:
    barriers = sorted(100 * p.barrier for p in results.diagnostics)
    return ", ".join(f"{b:.1f}" for b in barriers)


def _accuracies(scores) -> dict:
    return {"val_accuracy": scores.val_accuracy, "test_accuracy": scores.test_accuracy}


def format_table(rows: list[dict], test_domain: str) -> str:
    header = f"{'method':<40} {'train-domain val':>16} {test_domain + ' (test)':>16}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['method']:<40} {100 * row['val_accuracy']:>15.1f}% {100 * row['test_accuracy']:>15.1f}%")
    return "\n".join(lines)


def check_loads(repo_id: str, results: dict) -> str:
    """The soup is a plain transformers model: AutoModel and pipeline load it from the Hub."""
    from transformers import AutoModelForImageClassification, pipeline

    from ..sources import load_dataset_source

    model = AutoModelForImageClassification.from_pretrained(repo_id)
    classify = pipeline("image-classification", model=repo_id)
    dataset = load_dataset_source(TARGET_ID)
    row = dataset.filter(lambda d: d == results.test_domain, input_columns="domain")[0]
    top = classify(row["image"], top_k=1)[0]
    truth = model.config.id2label[row["label"]]
    return (
        f"AutoModelForImageClassification and pipeline load {repo_id} from the Hub ({type(model).__name__}); "
        f"first {results.test_domain} image: predicted {top['label']} ({top['score']:.2f}), true {truth}"
    )


def demo_config(output: Path, strategy: str, design: WorldDesign = DESIGN) -> RecipeConfig:
    """The demo's recipe: docs/method.md's structure at toy scale (fewer, shorter runs; larger lr than
    ResNet-50's, as a tiny network from a weak base needs).

    No --aux: the recycled checkpoints are discovered on the (local) Hub as fine-tunes of the base.
    """
    return RecipeConfig(
        base=BASE_ID,
        target=TARGET_ID,
        test_domain="sketch",
        strategy=strategy,
        runs=design.runs,
        steps=design.steps,
        eval_every=design.eval_every,
        lp_steps=design.lp_steps,
        lp_lr=design.lp_lr,
        warmup_steps=design.warmup_steps,
        batch_size=design.batch_size,
        lr=design.lr,
        lr_choices=design.lr_choices,
        weight_decay_choices=design.weight_decay_choices,
        dropout_choices=design.dropout_choices,
        output=str(output / "recycle"),  # shared: base-initialised runs are the same in both strategies
    )


def _tiny_resnet(dataset, seed: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    names = dataset.features["label"].names
    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    return ResNetForImageClassification(config)


def _processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def _normalization():
    from ..data import Normalization

    return Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _train_with_live_batchnorm(
    model, dataset, *, steps: int, lr: float, seed: int, accelerator, augment: bool = True, desc: str = "pretraining"
) -> None:
    """Train every parameter with BatchNorm in train mode, last step kept: the base's pretraining (it has no
    statistics yet) and the careless fine-tune (whose statistics move to its task)."""
    images: ImageTensors = decode_images(
        dataset,
        range(len(dataset)),
        image_column="image",
        label_column="label",
        label_names=dataset.features["label"].names,
        size=IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    optimize(
        model,
        DomainBatches([images], 64, seed),
        parameters=list(model.parameters()),
        steps=steps,
        lr=lr,
        weight_decay=0.0,
        accelerator=accelerator,
        normalize=_normalization(),
        augment_seed=seed if augment else None,
        freeze_bn=False,
        desc=desc,
    )


def _save_base(model, folder: Path, *, dataset: str, description: str) -> None:
    """The pretrained base, with the card of a model that is nobody's fine-tune."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..io import staged_folder

    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        _processor().save_pretrained(staging)
        data = ModelCardData(
            datasets=[dataset],
            library_name="transformers",
            pipeline_tag="image-classification",
            license="apache-2.0",
        )
        body = f"# {folder.name}\n\nA toy-world checkpoint made by `ratatouille-hub demo`: {description}.\n"
        ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(staging / "README.md")


def _save_dataset(dataset, folder: Path, name: str, description: str) -> None:
    """The Hub layout (README card + data/train-*.parquet), so the folder can be pushed as it is."""
    from ..io import staged_folder

    with staged_folder(folder) as staging:
        (staging / "data").mkdir()
        dataset.to_parquet(str(staging / "data" / "train-00000-of-00001.parquet"))
        atomic_write_text(
            staging / "README.md",
            "---\nlicense: apache-2.0\ntask_categories:\n- image-classification\n---\n\n"
            f"# {name}\n\nGenerated by ratatouille-hub: {description}.\n",
        )
