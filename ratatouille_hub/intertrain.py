"""Inter-training: fine-tune the base on an auxiliary dataset (METHOD.md step 2).

What comes out is a community-style checkpoint: a transformers folder whose card names the base
(`base_model_relation: finetune`) and the dataset, the kind of model `recycle` discovers on the Hub
and recycles. As in the reference code, the last-step weights are kept: there is no model selection
on an auxiliary task.

    output/
      recipe.yaml        the options, replayable with --config
      runs/<hash>/       one fine-tune: config.json, model.safetensors, README.md, results.json, done
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .card import plain_text
from .config import IntertrainConfig, draw_hparams
from .data import (
    DataError,
    decode_images,
    evenly_spaced,
    image_entries,
    label_names_of,
    normalization_of,
    resolution_of,
)
from .errors import RecipeError
from .evaluation import accuracy, predict_logits
from .fetch import dataset_revision, is_hub_id, resolve_model
from .hashing import stable_hash, stable_int
from .io import DONE, atomic_write_json, exclusive_lock, staged_folder, sweep_staging
from .models import load_classifier, load_processor, quiet_transformers, refuse_unbuildable, serving_processor
from .safe_text import say
from .sources import image_files_of, load_dataset_source, refuse_output_inside
from .train import DomainBatches, make_accelerator, optimize

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
    config: IntertrainConfig, *, token: str | bool | None = None, echo: Callable[[str], None] = say
) -> list[Path]:
    """Make `config.runs` fine-tunes of the base on the dataset; returns their folders (finished ones are reused)."""
    quiet_transformers()
    echo(f"[fetch] base {config.base}")
    base = resolve_model(config.base, token=token)
    refuse_output_inside(config.output, config.dataset)
    revision = dataset_revision(config.dataset, token)
    echo(f"[data] {config.dataset}")
    dataset = load_dataset_source(config.dataset, revision=revision, token=token)
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
    files = image_files_of(config.dataset)  # a path in the dataset is read only inside its own folder, as for targets
    dataset = image_entries(dataset, config.image_column, name=config.dataset, files=files)
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
    data_reference = f"{config.dataset}@{revision}" if revision else config.dataset
    id2label = dict(enumerate(label_names))

    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"output {output} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output / ".lock", f"{output} is in use by another ratatouille-hub process"):
        sweep_staging(output / "runs")
        config.save_yaml(output / "recipe.yaml")
        accelerator = make_accelerator(config.precision)
        folders = []
        for run in range(config.runs):
            hparams = draw_hparams(config, config.seed + run)
            key = stable_hash(
                {
                    "base": base.revision,
                    "data": data_reference,
                    "size": size,
                    "steps": config.steps,
                    "batch": config.batch_size,
                    "augment": config.augment,
                    "hparams": asdict(hparams),
                    "seed": config.seed + run,
                    "precision": config.precision,
                    "labels": label_names,
                    # only a split batch changes the bytes, so whole-batch runs keep the keys they had
                    **({"micro_batch": config.micro_batch} if 0 < config.micro_batch < config.batch_size else {}),
                }
            )
            folder = output / "runs" / key
            label = f"intertrain {run + 1}/{config.runs}"
            if (folder / DONE).exists():
                echo(f"[train] {label}: done earlier, reused ({folder})")
            else:
                echo(
                    f"[train] {label} on {config.dataset}: lr {hparams.lr:g}, wd {hparams.weight_decay:g}, dropout {hparams.dropout:g}"
                )
                seed = f"intertrain:{config.seed + run}"
                torch.manual_seed(stable_int(seed + ":head"))
                model = load_classifier(base.path, id2label).to(accelerator.device)
                outcome = optimize(
                    model,
                    DomainBatches([images], config.batch_size, seed=stable_int(seed + ":batches")),
                    parameters=list(model.parameters()),
                    steps=config.steps,
                    lr=hparams.lr,
                    weight_decay=hparams.weight_decay,
                    accelerator=accelerator,
                    normalize=normalize,
                    augment_seed=stable_int(seed + ":augment") if config.augment else None,
                    dropout=hparams.dropout,
                    micro_batch=config.micro_batch or None,
                    desc=label,
                )
                model.load_state_dict(outcome.state)
                processor = serving_processor(model, size, normalize)
                sample = evenly_spaced(images, 1000)
                results = {
                    "base": base.reference,
                    "dataset": data_reference,
                    "hparams": asdict(hparams),
                    "steps": config.steps,
                    "image_size": size,
                    "n_images": len(images),
                    "train_accuracy": accuracy(predict_logits(model, sample, normalize), sample.labels),
                }
                with staged_folder(folder) as staging:
                    model.save_pretrained(staging)
                    if processor is not None:
                        processor.save_pretrained(staging)
                    atomic_write_json(staging / "results.json", results)
                    aux_card(config, base.source, label_names, results).save(staging / "README.md")
                    (staging / DONE).touch()
                echo(f"[train] {label}: {100 * results['train_accuracy']:.1f}% on its training images -> {folder}")
            folders.append(folder)
    return folders


def aux_card(config: IntertrainConfig, base_source: str, label_names, results: dict):
    """A community-style card: the lineage the Hub indexes (`base_model:finetune:<base>`) and the dataset."""
    from huggingface_hub import ModelCard, ModelCardData

    dataset_name = config.dataset if is_hub_id(config.dataset) else Path(config.dataset).name
    base_id = config.base_model or (base_source if is_hub_id(base_source) else None)
    data = ModelCardData(
        base_model=base_id,
        base_model_relation="finetune" if base_id else None,
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
