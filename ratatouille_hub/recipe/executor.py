"""Executing a plan: the only place the recipe trains.

Each spec is executed into its own folder, written under a staging name and marked `done` last, so an
executor may run specs in any order, skip finished ones and be killed at any point without losing one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fetch import Ingredient
from ..hashing import stable_int
from ..io import DONE, atomic_write_json, staged_folder
from ..merge import average_state_dicts
from ..models import head_linear, load_classifier, serving_processor, set_head
from ..strategies import FusionSpec
from ..target import Target, predict_target
from ..train import DomainBatches, LinearHead, linear_probe, make_accelerator, optimize, validation_accuracy
from .plan import RecipePlan, RunSpec

FUSION_FILE = "fusion.json"


def execute(plan: RecipePlan, output: Path, target: Target, echo) -> None:
    """Train what the plan still misses, one spec after the other, in this process."""
    accelerator = make_accelerator(plan.config.precision)
    head = shared_linear_probe(plan, target, accelerator, output, echo)
    for spec in plan.runs:
        execute_run(plan, spec, head, target, accelerator, output, echo)


def shared_linear_probe(plan: RecipePlan, target: Target, accelerator, output: Path, echo) -> LinearHead:
    """The target head trained once on the frozen base; every run starts from it (so heads average)."""
    spec = plan.lp
    folder = output / spec.folder
    if not (folder / DONE).exists():
        echo(f"[train] linear probe on the frozen base ({spec.steps} steps)")
        model = load_classifier(plan.base.path, target.id2label).to(accelerator.device)
        head = linear_probe(
            model,
            target.data,
            steps=spec.steps,
            lr=spec.lr,
            batch_size=spec.batch_size,
            eval_every=spec.eval_every,
            seed=spec.seed,
            accelerator=accelerator,
        )
        with staged_folder(folder) as staging:
            save_file(
                {"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, staging / "head.safetensors"
            )
            atomic_write_json(staging / "metrics.json", {"step": head.step, "val_accuracy": head.val_accuracy})
            (staging / DONE).touch()
    tensors = load_file(folder / "head.safetensors")
    metrics = json.loads((folder / "metrics.json").read_text())
    echo(f"[train] linear probe: validation {100 * metrics['val_accuracy']:.1f}% (step {metrics['step']})")
    return LinearHead(tensors["weight"], tensors["bias"], metrics["step"], metrics["val_accuracy"])


def init_checkpoint(plan: RecipePlan, spec: RunSpec, target: Target, output: Path, echo) -> Ingredient:
    """The checkpoint a run loads: its init, or its fusion built once into `inits/<key>`."""
    init = spec.init
    if not isinstance(init, FusionSpec):
        return init
    folder = output / "inits" / init.key
    if not (folder / DONE).exists():
        mix = ", ".join(f"{w:.2f} x {m.source}" for w, m in zip(init.weights, init.members))
        echo(f"[fusing] run {spec.index + 1}: {mix}")
        torch.manual_seed(init.head_seed)
        states = [load_classifier(m.path, target.id2label).state_dict() for m in init.members]
        model = load_classifier(plan.base.path, target.id2label)
        model.load_state_dict(average_state_dicts(states, init.weights))
        with staged_folder(folder) as staging:
            model.save_pretrained(staging)
            fusion = {"members": [m.reference for m in init.members], "weights": list(init.weights)}
            atomic_write_json(staging / FUSION_FILE, fusion)
            (staging / DONE).touch()
    return Ingredient(init.source, init.revision, folder)


def execute_run(
    plan: RecipePlan, spec: RunSpec, head: LinearHead, target: Target, accelerator, output: Path, echo
) -> Path:
    """One target fine-tune from (init featurizer, shared head); returns at once when already done."""
    folder = output / spec.folder
    if (folder / DONE).exists():
        echo(f"[train] {spec.label}: done earlier (from {spec.init.source}), reused")
        return folder
    init = init_checkpoint(plan, spec, target, output, echo)
    hparams = spec.hparams
    echo(
        f"[train] {spec.label} from {init.source}: lr {hparams.lr:g}, wd {hparams.weight_decay:g}, "
        f"dropout {hparams.dropout:g}"
    )
    torch.manual_seed(stable_int(spec.run_seed + ":init"))
    model = load_classifier(init.path, target.id2label).to(accelerator.device)
    set_head(model, head.weight, head.bias)
    data = target.data
    batches = DomainBatches(data.train, spec.batch_size, seed=stable_int(spec.run_seed + ":batches"))
    common = dict(
        lr=hparams.lr,
        weight_decay=hparams.weight_decay,
        accelerator=accelerator,
        normalize=data.normalize,
        augment_seed=stable_int(spec.run_seed + ":augment") if spec.augment else None,
        dropout=hparams.dropout,
    )
    if spec.warmup_steps:
        head_params = list(head_linear(model).parameters())
        for param in model.parameters():
            param.requires_grad_(any(param is p for p in head_params))
        optimize(
            model, batches, parameters=head_params, steps=spec.warmup_steps, desc=f"{spec.label} head warm-up", **common
        )
        for param in model.parameters():
            param.requires_grad_(True)
    pooled_val = data.pooled_val
    outcome = optimize(
        model,
        batches,
        parameters=list(model.parameters()),
        steps=spec.steps,
        validate=lambda m: validation_accuracy(m, pooled_val, data.normalize),
        eval_every=spec.eval_every,
        desc=spec.label,
        **common,
    )
    model.load_state_dict(outcome.state)
    processor = serving_processor(model, target.test.pixels.shape[-1], data.normalize)
    predictions = predict_target(model, target)
    metrics = {
        "init": init.reference,
        "hparams": asdict(hparams),
        "warmup_steps": spec.warmup_steps,
        "best_step": outcome.step,
        "val_accuracy": outcome.val_accuracy,
        "history": outcome.history,
    }
    with staged_folder(folder) as staging:
        model.save_pretrained(staging / "model")
        if processor is not None:
            processor.save_pretrained(staging / "model")
        save_file({k: v.contiguous() for k, v in predictions.items()}, staging / "predictions.safetensors")
        atomic_write_json(staging / "metrics.json", metrics)
        (staging / DONE).touch()
    echo(f"[train] {spec.label}: best validation {100 * outcome.val_accuracy:.1f}% at step {outcome.step}")
    return folder
