"""Inter-training: fine-tune the base on an auxiliary dataset (docs/method.md step 2).

What comes out is a community-style checkpoint: a transformers folder whose card names the base
(`base_model_relation: finetune`) and the dataset, the kind of model `recycle` discovers on the Hub
and recycles. As in the reference code, the last-step weights are kept: there is no model selection
on an auxiliary task.

Each fine-tune is an artifact (artifacts.IntertrainRecord), claimed on its own: several processes
(accelerate ranks, two launches) make the fine-tunes of one output together, each exactly once.

    output/
      recipe.yaml        the options, replayable with --config
      runs/<hash>/       one fine-tune: config.json, model.safetensors, README.md, results.json, done
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .artifacts import IntertrainRecord, builds, materialize, materialize_all
from .card import card_license, plain_text
from .config import IntertrainConfig, RunHParams, TrackingOptions, draw_hparams
from .data import (
    DataError,
    ImageTensors,
    Normalization,
    decode_images,
    evenly_spaced,
    image_entries,
    label_names_of,
    normalization_of,
    resolution_of,
)
from .errors import RecipeError
from .evaluation import accuracy, predict_logits
from .fetch import Ingredient, dataset_revision, is_hub_id, resolve_model, split_revision
from .hashing import stable_hash, stable_int
from .models import load_classifier, load_processor, refuse_unbuildable, serving_processor
from .provenance import run_name
from .recipe.executor import Worker
from .sources import image_files_of, load_dataset_source, refuse_output_inside
from .target import refuse_untakeable_size
from .tracking import TRAIN_ACCURACY, Tracking
from .train import DomainBatches, make_accelerator, optimize

log = logging.getLogger(__name__)
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

`{{ base }}` fine-tuned on **{{ dataset }}** ({{ n_classes }} classes, {{ n_images }} images) for {{ steps }}
steps with ratatouille-hub `intertrain` (lr {{ lr }}, weight decay {{ weight_decay }}, feature dropout
{{ dropout }}, {{ batch_size }} images per step, {{ resolution }} px, BatchNorm statistics frozen). The
last-step weights are kept. Accuracy on (up to 1,000 of) its own training images: {{ train_accuracy }}%.

Made to be recycled: `ratatouille-hub recycle --base {{ base }} --target ...` finds fine-tunes like this
one and starts target fine-tunes from them (Model Ratatouille, Ramé et al., ICML 2023).
"""


def intertrain(
    config: IntertrainConfig,
    *,
    index: int | None = None,
    token: str | bool | None = None,
    echo: Callable[[str], None] = log.info,
    tracking: TrackingOptions | None = None,
) -> list[Path]:
    """Make `config.runs` fine-tunes of the base on the dataset (only fine-tune `index`, a scheduler's array
    task, when given); returns their folders (finished ones are reused). The recipe.yaml it saves pins the
    base and the dataset at the commits it read, so `intertrain --config` replays these fine-tunes.
    `tracking` says where each fine-tune's losses are reported."""
    if index is not None and not 0 <= index < config.runs:
        raise RecipeError(f"--index {index}: this intertrain makes fine-tunes 0 to {config.runs - 1}")
    tracked = Tracking.of(tracking, config.output)  # a missing tracker package is refused before any work
    echo(f"[fetch] base {config.base}")
    base = resolve_model(config.base, token=token)
    dataset_id, pinned = split_revision(config.dataset)  # `org/name@rev` reads that revision, as --target does
    refuse_output_inside(config.output, dataset_id)
    revision = dataset_revision(dataset_id, token, pinned)
    echo(f"[data] {config.dataset}")
    dataset = load_dataset_source(dataset_id, revision=revision, token=token)
    for column in (config.image_column, config.label_column):
        if column not in dataset.column_names:
            raise DataError(
                f"dataset {config.dataset} has no column {column!r} (columns: {', '.join(dataset.column_names)})"
            )
    label_names = label_names_of(dataset, config.label_column, name=config.dataset)
    if len(label_names) < 2:
        raise DataError(f"dataset {config.dataset} has {len(label_names)} class(es); a classifier needs 2 or more")
    processor = load_processor(base.path, base.source)
    size = resolution_of(processor, config.image_size, base.source)
    normalize = normalization_of(processor, base.source)
    refuse_unbuildable(base.path, base.source)
    refuse_untakeable_size(base, config.image_size)
    files = image_files_of(dataset_id)  # a path in the dataset is read only inside its own folder, as for targets
    dataset = image_entries(dataset, config.image_column, name=config.dataset, files=files)

    def decode() -> ImageTensors:
        images = decode_images(
            dataset,
            range(len(dataset)),
            image_column=config.image_column,
            label_column=config.label_column,
            label_names=label_names,
            size=size,
            root=files.folder,
        )
        echo(f"[data] {len(images)} images, {len(label_names)} classes, {size} px")
        return images

    data_reference = f"{dataset_id}@{revision}" if revision else dataset_id

    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"output {output} exists and is not a folder")
    job = Intertraining(
        config, base, data_reference, label_names, None, size, normalize, make_accelerator(config.precision), tracked
    )
    folders = [output / "runs" / job.key(run) for run in range(config.runs)]
    chosen = range(config.runs) if index is None else [index]
    pending = [run for run in chosen if not IntertrainRecord(folders[run]).is_done]
    if pending:  # decoded before anything is written, so an image that cannot be decoded leaves nothing behind
        job = replace(job, images=decode())
    output.mkdir(parents=True, exist_ok=True)
    pinned_config = config.replace(base=config.base if base.is_local else base.reference, dataset=data_reference)
    pinned_config.save_yaml(output / "recipe.yaml")  # in one rename: every process writes the same file
    worker = Worker.of_this_process()
    worker.wait_for_everyone_then_part()  # every rank saves runs of its own
    echo = worker.echo(echo)
    for run in chosen:
        if run not in pending:
            echo(f"[train] {job.label(run)}: done earlier, reused ({folders[run]})")

    def make(run: int, wait: bool) -> IntertrainRecord | None:
        return materialize(IntertrainRecord, folders[run], job, run, echo, wait=wait)

    def waiting(run: int) -> None:
        if not IntertrainRecord(folders[run]).is_done:
            echo(f"[train] {job.label(run)}: claimed by another process; waiting for it")

    materialize_all(worker.first(pending), make, waiting)
    return folders if index is None else [folders[index]]


@dataclass(frozen=True)
class Intertraining:
    """What every fine-tune of one intertrain output shares: the base, the decoded dataset, the device."""

    config: IntertrainConfig
    base: Ingredient
    data_reference: str
    label_names: list[str]
    images: ImageTensors | None  # None when no fine-tune is left to train: a rerun then decodes nothing
    size: int
    normalize: Normalization
    accelerator: object
    tracking: Tracking

    def label(self, run: int) -> str:
        return f"intertrain run {run} of {self.config.runs}"

    def tracked_name(self, run: int) -> str:
        """The run as the tracker names it: its index, its init (the base) and its dataset."""
        dataset = Path(split_revision(self.config.dataset)[0]).name
        return f"{run_name(run, self.base.source)} on {dataset}"

    def hparams(self, run: int) -> RunHParams:
        """Drawn by the run's index as recycle draws its runs' (never the seed: `--seed 1` does not turn run 0
        into a draw), what the user gave held for every run."""
        return draw_hparams(self.config, run)

    def key(self, run: int) -> str:
        """The content key naming fine-tune `run`'s folder."""
        config = self.config
        return stable_hash(
            {
                "base": self.base.revision,
                "data": self.data_reference,
                "size": self.size,
                # the pixels it trains on: a local base's revision is its weights' digest alone, so a processor
                # changed beside the same weights (or read anew: MobileViT's BGR) must not reuse the old fine-tune
                "normalize": self.normalize.fingerprint(),
                "steps": config.steps,
                "batch": config.batch_size,
                "augment": config.augment,
                "hparams": asdict(self.hparams(run)),
                "seed": config.seed + run,
                "precision": config.precision,
                "labels": self.label_names,
                # only a split batch changes the bytes, so whole-batch runs keep the keys they had
                **({"micro_batch": config.micro_batch} if 0 < config.micro_batch < config.batch_size else {}),
            }
        )


@builds(IntertrainRecord)
def _intertrain_run(staging: Path, job: Intertraining, run: int, echo: Callable[[str], None]) -> None:
    config, label, images, normalize = job.config, job.label(run), job.images, job.normalize
    hparams = job.hparams(run)
    echo(
        f"[train] {label} on {config.dataset}: lr {hparams.lr:g}, wd {hparams.weight_decay:g}, dropout {hparams.dropout:g}"
    )
    seed = f"intertrain:{config.seed + run}"
    torch.manual_seed(stable_int(seed + ":head"))
    model = load_classifier(job.base.path, dict(enumerate(job.label_names))).to(job.accelerator.device)
    hyperparameters = {"index": run, "init": job.base.reference, "dataset": job.data_reference, **asdict(hparams)}
    hyperparameters |= {"steps": config.steps, "seed": config.seed + run}
    with job.tracking.run(job.tracked_name(run), config=hyperparameters) as log:
        outcome = optimize(
            model,
            DomainBatches([images], config.batch_size, seed=stable_int(seed + ":batches")),
            parameters=list(model.parameters()),
            steps=config.steps,
            lr=hparams.lr,
            weight_decay=hparams.weight_decay,
            accelerator=job.accelerator,
            normalize=normalize,
            augment_seed=stable_int(seed + ":augment") if config.augment else None,
            dropout=hparams.dropout,
            micro_batch=config.micro_batch or None,
            desc=label,
            log=log,
        )
        model.load_state_dict(outcome.state)
        processor = serving_processor(model, job.size, normalize)
        sample = evenly_spaced(images, 1000)
        train_accuracy = accuracy(predict_logits(model, sample, normalize), sample.labels)
        if log is not None:
            log({TRAIN_ACCURACY: train_accuracy}, config.steps)
    results = {
        "base": job.base.reference,
        "dataset": job.data_reference,
        "hparams": asdict(hparams),
        "steps": config.steps,
        "image_size": job.size,
        "n_images": len(images),
        "train_accuracy": train_accuracy,
        "loss_history": outcome.losses,  # (step, mean training loss since the previous; every 100 steps and the last)
    }
    card = aux_card(config, job.base, job.label_names, results)
    IntertrainRecord(staging).write(model, processor, results, card)
    echo(f"[train] {label}: {100 * results['train_accuracy']:.1f}% on its training images")


def aux_card(config: IntertrainConfig, base: Ingredient, label_names, results: dict):
    """A community-style card: the lineage the Hub indexes (`base_model:finetune:<base>`), the dataset, and the
    license (--license, else the base's)."""
    from huggingface_hub import ModelCard, ModelCardData

    base_source = base.source
    dataset_id = split_revision(config.dataset)[0]
    dataset_name = dataset_id if is_hub_id(dataset_id) else Path(dataset_id).name
    base_id = config.base_model or (base_source if is_hub_id(base_source) else None)
    data = ModelCardData(
        base_model=base_id,
        base_model_relation="finetune" if base_id else None,
        **card_license(config.license, base.path),
        datasets=[plain_text(dataset_name)],
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["ratatouille-hub", "intertraining"],
    )
    hparams = results["hparams"]
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        name=plain_text(f"{Path(base_source).name} fine-tuned on {dataset_name}"),
        base=plain_text(base_source),
        dataset=plain_text(dataset_name),
        n_classes=len(label_names),
        n_images=results["n_images"],
        steps=config.steps,
        lr=hparams["lr"],
        weight_decay=hparams["weight_decay"],
        dropout=hparams["dropout"],
        batch_size=config.batch_size,
        resolution=results["image_size"],
        train_accuracy=f"{100 * results['train_accuracy']:.1f}",
    )
