"""Executing plans: the only place the recipe trains.

Each spec is an artifact (artifacts.py): the probe, a fusion init and a run are each materialized into
their own folder, so an executor may run specs in any order, skip finished ones and be killed at any point
without losing one. Any number of processes may execute the same plans on one output folder at once
(accelerate ranks, scheduler array tasks, a second launch): each run is trained by exactly one of them, and
a run whose claimant dies is trained by whichever process next waits for it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..artifacts import FusionRecord, ProbeRecord, RunRecord, builds, materialize, materialize_all
from ..checkpoint import Checkpoint
from ..errors import RecipeError
from ..evaluation import inference_batch
from ..fetch import Ingredient
from ..hashing import stable_int
from ..merge_engine import average_state_dicts
from ..models import head_linear, load_classifier, serving_processor, set_head
from ..provenance import plan_fingerprint, run_name
from ..strategies import FusionSpec
from ..target import Target, predict_target
from ..tracking import UNTRACKED, Tracking, recipe_run
from ..train import DomainBatches, LinearHead, linear_probe, make_accelerator, optimize, validation_accuracy
from .plan import RecipePlan, RunSpec


@dataclass(frozen=True)
class Worker:
    """This process among the `count` that execute the same plans together (accelerate's ranks)."""

    rank: int = 0
    count: int = 1

    @classmethod
    def of_this_process(cls) -> Worker:
        """The rank accelerate (or torchrun) gave this process; rank 0 of 1 when it was started alone."""
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"rank {self.rank}/{self.count} " if self.count > 1 else ""

    def wait_for_everyone_then_part(self) -> None:
        """The processes' one meeting (once the plan is saved), after which they coordinate only through
        the output folder's claims: the process group goes, as transformers' save_pretrained writes nothing
        on ranks other than 0 while one is up, and here every rank saves runs of its own."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def echo(self, echo):
        """`echo` with every line naming this rank, when there are several."""
        return echo if self.count == 1 else (lambda line: echo(f"[{self.name.strip()}] {line}"))

    def first(self, items: Sequence) -> list:
        """`items` with this rank's share first (every count-th, from its rank), then the others' to take
        over where they fall behind."""
        own = list(items[self.rank :: self.count])
        return own + [item for i, item in enumerate(items) if i % self.count != self.rank]


ALONE = Worker()


def execute(
    jobs: Sequence[tuple[RecipePlan, Target]],
    output: Path,
    echo,
    worker: Worker = ALONE,
    tracking: Tracking = UNTRACKED,
) -> None:
    """Train every run the plans still miss that no other process is training; then wait for the runs
    others claimed (training any whose claimant died), so every run is done when this returns."""
    executor = RunExecutor(jobs[0][0].config.precision, output, worker.echo(echo), worker, tracking)
    executor.run_all(worker.first([(plan, spec, target) for plan, target in jobs for spec in plan.runs]))


class RunExecutor:
    """Trains one claimed run at a time on this process's device, from its plan's shared linear probe."""

    def __init__(self, precision: str, output: Path, echo, worker: Worker = ALONE, tracking: Tracking = UNTRACKED):
        self.accelerator = make_accelerator(precision)
        self.output, self.echo, self.worker, self.tracking = output, echo, worker, tracking
        self.heads: dict[str, LinearHead] = {}

    def run_all(self, work: Sequence[tuple[RecipePlan, RunSpec, Target]]) -> None:
        """Every run of `work` done, in its order, those no other process is training first."""
        pending = []
        for plan, spec, target in work:
            if RunRecord(self.output / spec.folder).is_done:
                self.echo(f"[train] {spec.label}: done earlier (from {spec.init.source}), reused")
            else:
                pending.append((plan, spec, target))

        def waiting(item) -> None:
            if not RunRecord(self.output / item[1].folder).is_done:
                self.echo(f"[train] {item[1].label}: claimed by another process; waiting for it")

        materialize_all(pending, lambda item, wait: self.run(*item, wait=wait), waiting)

    def run(self, plan: RecipePlan, spec: RunSpec, target: Target, *, wait: bool = True) -> RunRecord | None:
        if plan.lp.key not in self.heads:
            self.heads[plan.lp.key] = shared_linear_probe(
                plan, target, self.accelerator, self.output, self.echo, self.tracking
            )
        head = self.heads[plan.lp.key]
        inputs = (
            plan,
            spec,
            head,
            target,
            self.accelerator,
            self.output,
            self.echo,
            self.worker.name,
            True,
            self.tracking,
        )
        return materialize(RunRecord, self.output / spec.folder, *inputs, wait=wait)


def shared_linear_probe(
    plan: RecipePlan, target: Target, accelerator, output: Path, echo, tracking: Tracking = UNTRACKED
) -> LinearHead:
    """The target head trained once on the frozen base; every run starts from it (so heads average)."""
    head = materialize(ProbeRecord, output / plan.lp.folder, plan, target, accelerator, echo, tracking).head()
    echo(f"[train] linear probe: validation {100 * head.val_accuracy:.1f}% (step {head.step})")
    return head


@builds(ProbeRecord)
def _train_linear_probe(staging: Path, plan: RecipePlan, target: Target, accelerator, echo, tracking: Tracking) -> None:
    spec = plan.lp
    echo(f"[train] linear probe on the frozen base ({spec.steps} steps)")
    started = time.monotonic()
    model = load_classifier(plan.base.path, target.id2label).to(accelerator.device)
    hyperparameters = {"steps": spec.steps, "lr": spec.lr, "batch_size": spec.batch_size, "seed": spec.seed}
    with tracking.run(*recipe_run(plan, "linear probe"), config=hyperparameters) as log:
        head = linear_probe(
            model,
            target.data,
            steps=spec.steps,
            lr=spec.lr,
            batch_size=spec.batch_size,
            eval_every=spec.eval_every,
            seed=spec.seed,
            accelerator=accelerator,
            inference_batch=inference_batch(plan.config.micro_batch),
            log=log,
        )
    check_finite_weights({"weight": head.weight, "bias": head.bias}, f"the linear probe (lr {spec.lr:g})")
    ProbeRecord(staging).write(head, round(time.monotonic() - started, 1))


def check_finite_weights(state: dict[str, torch.Tensor], what: str) -> None:
    """A run whose training diverged is refused before it is saved: it is never marked done, and a rerun with
    a smaller learning rate trains it afresh."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RecipeError(
                f"{what} diverged: its trained weights are not finite (first: {name}); nothing was saved; "
                "lower the learning rate (--lr, --lr-choices, --lp-lr)"
            )


def init_checkpoint(plan: RecipePlan, spec: RunSpec, target: Target, output: Path, echo) -> Ingredient:
    """The checkpoint a run loads: its init, or its fusion built once into `inits/<key>`."""
    init = spec.init
    if not isinstance(init, FusionSpec):
        return init
    fusion = materialize(FusionRecord, output / "inits" / init.key, plan, spec, init, target, echo)
    return Ingredient(init.source, init.revision, fusion.folder)


@builds(FusionRecord)
def _build_fusion(staging: Path, plan: RecipePlan, spec: RunSpec, init: FusionSpec, target: Target, echo) -> None:
    mix = ", ".join(f"{w:.2f} x {m.source}" for w, m in zip(init.weights, init.members))
    echo(f"[fusing] {spec.label}: {mix}")
    torch.manual_seed(init.head_seed)
    states = [load_classifier(m.path, target.id2label).state_dict() for m in init.members]
    model = load_classifier(plan.base.path, target.id2label)
    model.load_state_dict(average_state_dicts(states, init.weights))
    FusionRecord(staging).write(model, [m.reference for m in init.members], init.weights)


@builds(RunRecord)
def train_run(
    staging: Path,
    plan: RecipePlan,
    spec: RunSpec,
    head: LinearHead,
    target: Target,
    accelerator,
    output: Path,
    echo,
    rank: str = "",
    fingerprinted: bool = False,
    tracking: Tracking = UNTRACKED,
) -> None:
    """One target fine-tune from (init featurizer, shared head), written into `staging`, resumed from the
    progress a killed build of it saved there. `rank` names this process in its progress bars; `fingerprinted`
    writes the recipe's fingerprint (from the shared probe's file), the run's index and its init beside the
    run's weights; `tracking` reports its fine-tuning steps."""
    progress = Checkpoint(staging, started=time.monotonic())
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
        micro_batch=spec.micro_batch,
    )
    resumed_at = progress.saved_step
    if spec.warmup_steps and resumed_at is None:  # a saved progress is past the head's warm-up
        head_params = list(head_linear(model).parameters())
        for param in model.parameters():
            param.requires_grad_(any(param is p for p in head_params))
        optimize(
            model,
            batches,
            parameters=head_params,
            steps=spec.warmup_steps,
            desc=f"{rank}{spec.label} head warm-up",
            **common,
        )
        for param in model.parameters():
            param.requires_grad_(True)
    if resumed_at is not None:
        echo(f"[train] {spec.label}: resuming at step {resumed_at} of {spec.steps}, from the progress it saved")
    pooled_val, passes = data.pooled_val, inference_batch(spec.micro_batch)
    hyperparameters = {"index": spec.index, "init": init.reference, **asdict(hparams), "steps": spec.steps}
    tracked_name = recipe_run(plan, run_name(spec.index, init.reference))
    with tracking.run(*tracked_name, config=hyperparameters | {"seed": spec.seed}) as log:  # after the warm-up
        outcome = optimize(
            model,
            batches,
            parameters=list(model.parameters()),
            steps=spec.steps,
            validate=lambda m: validation_accuracy(m, pooled_val, data.normalize, batch_size=passes),
            eval_every=spec.eval_every,
            desc=f"{rank}{spec.label}",
            checkpoint=progress,
            log=log,
            **common,
        )
    check_finite_weights(outcome.state, f"{spec.label} from {init.source} (lr {hparams.lr:g})")
    model.load_state_dict(outcome.state)
    processor = serving_processor(model, target.test.pixels.shape[-1], data.normalize)
    predictions = predict_target(model, target, passes)
    metrics = {
        "init": init.reference,
        "hparams": asdict(hparams),
        "warmup_steps": spec.warmup_steps,
        "best_step": outcome.step,
        "val_accuracy": outcome.val_accuracy,
        "history": outcome.history,
        "loss_history": outcome.losses,  # (step, mean training loss since the previous evaluation)
        "seconds": round(progress.seconds(), 1),  # what the run cost: benchmarks add these up
    }
    identity = None
    if fingerprinted:  # which recipe it belongs to, and its place in it
        identity = {"fingerprint": plan_fingerprint(plan, output), "index": spec.index, "init": init.reference}
    RunRecord(staging).write(model, processor, identity, predictions, metrics)
    echo(f"[train] {spec.label}: best validation {100 * outcome.val_accuracy:.1f}% at step {outcome.step}")
