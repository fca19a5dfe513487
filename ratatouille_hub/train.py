"""Training with Accelerate: the shared linear probe and the target fine-tunes.

Batches hold `batch_size` images from every training domain (DomainBed). A fine-tune keeps the
state of its best step on pooled training-domain validation; BatchNorm running statistics stay
frozen so every run keeps the statistics of the checkpoint it started from.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .data import (
    ImageTensors,
    Normalization,
    StreamedPixels,
    augment,
    decode_workers,
    decoded_batches,
    evenly_spaced,
    join_pixels,
    pixel_batches,
)
from .evaluation import INFERENCE_BATCH, accuracy, predict_logits
from .logs import bar_disable
from .models import (
    capture_features,
    feature_dropout,
    head_linear,
    to_channels_last,
    to_contiguous,
    train_mode_frozen_bn,
)
from .tracking import LOSS, VAL_ACCURACY, Log, log_steps


def resolved_precision(precision: str) -> str:
    """What `precision` trains in here: `auto` is bf16 autocast on CUDA with bf16 support, fp32 (`no`) elsewhere.
    On CPU bf16 slows the recipe's backbone (benchmarks/results/precision.json, 2-core Xeon with AMX: EfficientNet-
    Lite0's step at 0.78x fp32's speed at 128 px, 0.50x at 224; ResNet-18's 1.8-2.1x), so CPU runs keep fp32 and
    their bytes (a tiny PACS run selected the same steps and runs under both, 0.7 points apart at most)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(precision: str):
    """An Accelerator training in `resolved_precision(precision)`."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=resolved_precision(precision), cpu=not torch.cuda.is_available())


class DomainBatches:
    """Endless batches of `batch_size` images per domain, reshuffled every epoch, from one seed.

    Each batch is gathered from the domains' rows straight into one tensor, in pinned memory where CUDA is
    present (`pin_memory`, by default), so that its copy to the device is one asynchronous transfer. Domains
    of streamed images (`StreamedPixels`) give the same batches, decoded a few batches ahead by DataLoader
    workers: the rows are still drawn here, in order, and the position saved is the last batch taken's."""

    def __init__(self, domains: list[ImageTensors], batch_size: int, seed: int, pin_memory: bool | None = None):
        self.domains = domains
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._orders = [torch.empty(0, dtype=torch.long) for _ in domains]
        self._streamed = isinstance(domains[0].pixels, StreamedPixels)
        self._decoded = None  # streamed: the batches the workers decode, in the order drawn
        self._ahead: deque[dict[str, torch.Tensor]] = deque()  # streamed: the position before each batch drawn ahead

    def _take(self, index: int) -> torch.Tensor:
        needed, taken = self.batch_size, []
        while needed > 0:
            if len(self._orders[index]) == 0:
                self._orders[index] = torch.randperm(len(self.domains[index]), generator=self.generator)
            chunk, self._orders[index] = self._orders[index][:needed], self._orders[index][needed:]
            taken.append(chunk)
            needed -= len(chunk)
        return torch.cat(taken)

    def _draw(self) -> list[torch.Tensor]:
        return [self._take(index) for index in range(len(self.domains))]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._streamed:
            if self._decoded is None:
                self._decoded = self._decoding()
            batch = next(self._decoded)
            self._ahead.popleft()
            return batch
        rows = self._draw()
        pixels = self._gather([domain.pixels for domain in self.domains], rows)
        return pixels, self._gather([domain.labels for domain in self.domains], rows)

    def _decoding(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The streamed domains joined, read at the positions of each batch drawn (a domain's rows after the
        domains before it), by DataLoader workers."""
        joined = ImageTensors(
            join_pixels([domain.pixels for domain in self.domains]), torch.cat([d.labels for d in self.domains])
        )
        starts = [0, *itertools.accumulate(len(domain) for domain in self.domains)][:-1]
        batches = weakref.ref(self)  # no cycle: dropping these batches stops their workers at once

        def positions():
            while True:
                batches()._ahead.append(batches()._position())
                yield torch.cat([rows + start for rows, start in zip(batches()._draw(), starts)]).tolist()

        return decoded_batches(joined, positions(), workers=decode_workers(), pin_memory=self.pin_memory)

    def _gather(self, sources: list[torch.Tensor], rows: list[torch.Tensor]) -> torch.Tensor:
        """`rows` of each source, one after the other, copied once into a new tensor. The pinned memory
        comes from torch's caching host allocator, which keeps a block until its copy to the device is done."""
        first = sources[0]
        shape = (sum(len(taken) for taken in rows), *first.shape[1:])
        batch = torch.empty(shape, dtype=first.dtype, pin_memory=self.pin_memory)
        start = 0
        for source, taken in zip(sources, rows):
            torch.index_select(source, 0, taken, out=batch[start : start + len(taken)])
            start += len(taken)
        return batch

    def __iter__(self):
        return self

    def _position(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), **{f"order.{i}": o for i, o in enumerate(self._orders)}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Where the batches are: the generator's state and what is left of each domain's permutation, after
        the last batch taken (not after those drawn ahead for the workers)."""
        return self._ahead[0] if self._ahead else self._position()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._orders = [state[f"order.{i}"] for i in range(len(self.domains))]
        self._decoded = None  # batches decoded ahead from the old position are dropped
        self._ahead.clear()


@dataclass
class TargetData:
    """The decoded target: per training domain train/val images, and how to normalise them."""

    train: list[ImageTensors]
    val: list[ImageTensors]
    normalize: Normalization

    @property
    def pooled_val(self) -> ImageTensors:
        return _pooled(self.val)

    @property
    def pooled_train(self) -> ImageTensors:
        return _pooled(self.train)


def _pooled(parts: list[ImageTensors]) -> ImageTensors:
    return ImageTensors(join_pixels([p.pixels for p in parts]), torch.cat([p.labels for p in parts]))


@dataclass
class TrainOutcome:
    state: dict[str, torch.Tensor]
    step: int
    val_accuracy: float | None
    history: list[tuple[int, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (evaluation step, mean loss since the last)


def validation_accuracy(
    model, images: ImageTensors, normalize: Normalization, batch_size: int = INFERENCE_BATCH
) -> float:
    return accuracy(predict_logits(model, images, normalize, batch_size=batch_size), images.labels)


def optimize(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    parameters: list[nn.Parameter],
    steps: int,
    lr: float,
    weight_decay: float,
    accelerator,
    normalize: Normalization,
    augment_seed: int | None,
    validate: Callable[[nn.Module], float] | None = None,
    eval_every: int = 100,
    freeze_bn: bool = True,
    dropout: float = 0.0,
    micro_batch: int | None = None,
    desc: str = "train",
    checkpoint: Checkpoint | None = None,
    log: Log | None = None,
) -> TrainOutcome:
    """Adam over `parameters` for `steps` steps, with a fresh optimizer state.

    With `validate`, evaluates every `eval_every` steps and at the last step, and returns the best
    state (ties keep the earlier step); without it, returns the last state (auxiliary fine-tunes).
    `micro_batch` images go through each forward and backward pass and a step's gradient accumulates
    over its passes: peak memory is that of one pass, the gradient the whole batch's up to rounding
    (BatchNorm statistics are frozen; with `freeze_bn=False` each pass normalises over its own images).
    With `checkpoint` (and `validate`), the progress is saved at evaluations, and progress saved earlier is
    resumed from: the steps after it go as they would have gone without the interruption.
    Every `eval_every` steps and at the last, the mean training loss since the previous such step is
    recorded (`losses`) and, with `log`, each step's loss and the evaluation are logged.
    """
    # foreach: the same bytes as the per-tensor loop (checked on CPU), a third less time for the step's update
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, foreach=True)
    # Neither is accelerator.prepare()d: among several processes the model would be wrapped for data-parallel
    # training (each process here trains a run of its own), and the optimizer wrapper, needed only for fp16's
    # gradient scaler (no precision here uses one), costs 3-8% of a small model's steps (benchmarks/train.py).
    model = to_channels_last(model).to(accelerator.device)
    generator = torch.Generator().manual_seed(augment_seed) if augment_seed is not None else None
    best: TrainOutcome | None = None
    history: list[tuple[int, float]] = []
    done = 0
    losses: list[tuple[int, float]] = []
    window: list[torch.Tensor] = []  # the steps' losses since the last evaluation, read once there (no sync per step)
    if checkpoint is not None and checkpoint.saved_step is not None:
        done, saved_best, history, losses = checkpoint.restore(model, optimizer, batches, generator)
        best = None if saved_best is None else TrainOutcome(*saved_best)
    loss_fn = nn.CrossEntropyLoss()
    progress = tqdm(
        range(done + 1, steps + 1),
        initial=done,
        total=steps,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=bar_disable(),
    )
    with feature_dropout(model, dropout):
        for step in progress:
            if freeze_bn:
                train_mode_frozen_bn(model)
            else:
                model.train()
            x, labels = device_batch(next(batches), accelerator.device, normalize, generator)
            passes = _passes(len(labels), micro_batch)
            loss = 0.0
            for rows in passes:
                chunk = x[rows].contiguous(memory_format=torch.channels_last)
                with accelerator.autocast():
                    logits = model(pixel_values=chunk).logits
                    chunk_loss = loss_fn(logits.float(), labels[rows])
                if len(passes) > 1:  # the mean over the whole batch, as one pass would take it
                    chunk_loss = chunk_loss * (len(logits) / len(labels))
                accelerator.backward(chunk_loss)
                loss += chunk_loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss)
            if step % eval_every == 0 or step == steps:
                step_losses = torch.stack(window).tolist()
                window.clear()
                losses.append((step, statistics.fmean(step_losses)))
                values = {LOSS: losses[-1][1]}
                if validate is not None:
                    score = validate(model)
                    history.append((step, score))
                    values[VAL_ACCURACY] = score
                    progress.set_postfix(loss=f"{step_losses[-1]:.3f}", val=f"{score:.3f}")
                    if best is None or score > best.val_accuracy:
                        best = TrainOutcome(_clone_state(model), step, score)
                if log is not None:
                    log_steps(log, step, step_losses, values)
                if validate is not None and checkpoint is not None and checkpoint.due():
                    checkpoint.save(step, model, optimizer, batches, generator, best, history, losses)
    to_contiguous(model)
    if best is None:
        return TrainOutcome(_clone_state(model), steps, None, history, losses)
    best.history, best.losses = history, losses
    return best


def device_batch(
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    normalize: Normalization,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch and its labels copied to `device` as they are (asynchronously from pinned memory), then
    augmented with `generator`'s draws (None: not augmented) and normalised there: the host's share of a
    step is the gather, the copy and a few random numbers per image, whatever the resolution."""
    pixels, labels = (tensor.to(device, non_blocking=True) for tensor in batch)
    x = augment(pixels, generator) if generator is not None else pixels.float().div_(255.0)
    return normalize(x), labels


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, images: ImageTensors, normalize: Normalization, *, max_images: int = 2048, batch_size: int = 128
) -> None:
    """Recompute BatchNorm running statistics of an averaged model on target training images.

    Averaged weights no longer match the averaged statistics of their members; a forward pass over
    (at most `max_images`, evenly spaced, un-augmented) training images gives the soup its own.
    Not `torch.optim.swa_utils.update_bn`: it puts the whole model in train mode, so dropout and
    drop-path (timm backbones) would perturb the statistics; here only BatchNorm layers train.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches
    sample = evenly_spaced(images, max_images)
    model.eval()
    for norm in norms:
        norm.train()
    device = next(model.parameters()).device
    for pixels in pixel_batches(sample, batch_size):
        model(pixel_values=normalize.from_uint8(pixels.to(device)))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def _passes(count: int, micro_batch: int | None) -> list[slice]:
    size = count if micro_batch is None else micro_batch
    return [slice(start, start + size) for start in range(0, count, size)]


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone(memory_format=torch.contiguous_format)
        for name, tensor in model.state_dict().items()
    }


@dataclass(frozen=True)
class LinearHead:
    weight: torch.Tensor
    bias: torch.Tensor
    step: int
    val_accuracy: float


@torch.no_grad()
def _features(model, images: ImageTensors, normalize: Normalization, batch_size: int) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    to_channels_last(model)
    with capture_features(model) as captured:
        for batch in pixel_batches(images, batch_size):
            pixels = normalize.from_uint8(batch.to(device))
            model(pixel_values=pixels.contiguous(memory_format=torch.channels_last))
    to_contiguous(model)
    return torch.cat(captured).float().cpu()


def linear_probe(
    model,
    data: TargetData,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    eval_every: int,
    seed: int,
    accelerator,
    inference_batch: int = INFERENCE_BATCH,
    log: Log | None = None,
) -> LinearHead:
    """Train only a new head on frozen base features; the best step on validation is kept.

    Features are computed once on un-augmented images (the featurizer is frozen, so they do not
    change between steps): thousands of LP steps then cost seconds instead of hours. With `log`, each step's
    loss and, at each evaluation, the mean loss since the last and the validation accuracy are logged.
    """
    torch.manual_seed(seed)
    train_features = [ImageTensors(_features(model, d, data.normalize, inference_batch), d.labels) for d in data.train]
    val = data.pooled_val
    val_features = _features(model, val, data.normalize, inference_batch)
    template = head_linear(model)
    head = copy.deepcopy(template).float().to(accelerator.device)
    nn.init.zeros_(head.weight)  # the checkpoint's head was drawn from the global RNG at load time
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    batches = DomainBatches(train_features, batch_size, seed)
    best: LinearHead | None = None
    window: list[torch.Tensor] = []  # with `log`: the steps' losses since the last evaluation
    for step in tqdm(range(1, steps + 1), desc="linear probe", leave=False, dynamic_ncols=True, disable=bar_disable()):
        features, labels = next(batches)
        loss = nn.functional.cross_entropy(head(features.to(accelerator.device)), labels.to(accelerator.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None:
            window.append(loss.detach())
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                score = accuracy(head(val_features.to(accelerator.device)).cpu(), val.labels)
            if log is not None:
                step_losses = torch.stack(window).tolist()
                window.clear()
                log_steps(log, step, step_losses, {LOSS: statistics.fmean(step_losses), VAL_ACCURACY: score})
            if best is None or score > best.val_accuracy:
                best = LinearHead(head.weight.detach().cpu().clone(), head.bias.detach().cpu().clone(), step, score)
    assert best is not None
    return best
