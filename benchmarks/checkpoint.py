"""What saving a fine-tune's progress costs against a training step, for a ResNet-50-size run.

    python benchmarks/checkpoint.py [--repeats 3] [--threads 2]

A randomly initialised ResNet-50 (transformers' `ResNetConfig()`, 7 labels as PACS) takes one Adam step, so
the optimizer holds both moments; `checkpoint.Checkpoint.save` then writes what a run saves at an evaluation
whose best state is an earlier step's (the largest case: the model, the best state and Adam's two moments,
plus the generators and the data order), into a folder on the same disk as this repository, and
`Checkpoint.restore` reads it back. Both are timed `--repeats` times (the median is reported), with the bytes
written. A training step is timed on this CPU as `train.optimize` takes it (fp32, channels-last, 224 px,
frozen BatchNorm), on one domain's 32 images after a warm-up step: a recipe's step is 3 domains' 96, so it is
reported times 3, with the load average (others' work on the cores slows it). On a GPU the step is not
measured here (no GPU in this session): `gpu_step_s` is 96 images at the 6,000 images/s that issue 23 names as
an H200-class GPU's ResNet-50 rate in bf16, an assumption.

From these, `evaluations_between_saves` is how many evaluations (at the default `--eval-every` 100) pass
between saves under `checkpoint.SAVE_SHARE`, on this CPU and on such a GPU. Results:
benchmarks/results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "checkpoint.json"
IMAGE_SIZE, PER_DOMAIN, DOMAINS, EVAL_EVERY = 224, 32, 3, 100
GPU_IMAGES_PER_S = 6000.0  # issue 23's H200-class ResNet-50 bf16 rate: an assumption, not a measurement


def main() -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    from ratatouille_hub.checkpoint import SAVE_SHARE, Checkpoint
    from ratatouille_hub.data import ImageTensors
    from ratatouille_hub.models import to_channels_last, train_mode_frozen_bn
    from ratatouille_hub.train import DomainBatches, TrainOutcome, _clone_state

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = to_channels_last(ResNetForImageClassification(ResNetConfig(num_labels=7)))
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
    images = torch.randint(0, 256, (PER_DOMAIN, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    labels = torch.randint(0, 7, (PER_DOMAIN,))
    batches = DomainBatches([ImageTensors(images, labels)] * DOMAINS, PER_DOMAIN, seed=0)

    def step() -> float:
        began = time.monotonic()
        train_mode_frozen_bn(model)
        x = (images.float() / 255.0).contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.monotonic() - began

    step()  # warm-up: Adam's moments exist from here on
    cpu_step = step() * DOMAINS
    best = TrainOutcome(_clone_state(model), 100, 0.5)
    augmentation = torch.Generator().manual_seed(1)
    saves, restores = [], []
    with tempfile.TemporaryDirectory(dir=ROOT) as folder:
        for _ in range(args.repeats):
            checkpoint = Checkpoint(Path(folder), started=time.monotonic())
            began = time.monotonic()
            checkpoint.save(
                200, model, optimizer, batches, augmentation, best, [(100, 0.5), (200, 0.4)], [(100, 2.3), (200, 2.1)]
            )
            saves.append(time.monotonic() - began)
            written = checkpoint.file.stat().st_size
            began = time.monotonic()
            checkpoint.restore(model, optimizer, batches, augmentation)
            restores.append(time.monotonic() - began)
    save_s = statistics.median(saves)
    gpu_step = DOMAINS * PER_DOMAIN / GPU_IMAGES_PER_S

    def between(step_s: float) -> int:
        """Evaluations from one save to the next: the first whose training reaches 1 / SAVE_SHARE saves."""
        return max(1, math.ceil(save_s / SAVE_SHARE / (EVAL_EVERY * step_s)))

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "load_average_1_5_15_min_at_end": os.getloadavg(),  # other work on the cores slows the CPU step
        },
        "model": "ResNet-50 (transformers ResNetConfig(), 7 labels), random init",
        "parameters": parameters,
        "bytes_written": written,
        "save_s": {"median": save_s, "all": saves},
        "restore_s": {"median": statistics.median(restores), "all": restores},
        "cpu_step_s": cpu_step,
        "gpu_step_s": gpu_step,
        "save_share": SAVE_SHARE,
        "eval_every": EVAL_EVERY,
        "evaluations_between_saves": {"cpu": between(cpu_step), "gpu": between(gpu_step)},
        "save_vs_eval_interval": {
            "cpu": save_s / (EVAL_EVERY * cpu_step),
            "gpu": save_s / (EVAL_EVERY * gpu_step),
        },
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ResNet-50 run state: {parameters / 1e6:.1f}M parameters, {written / 1e6:.0f} MB written")
    print(f"save {save_s:.2f} s, restore {result['restore_s']['median']:.2f} s (median of {args.repeats})")
    for where, step_s in (("this CPU", cpu_step), ("GPU (assumed)", gpu_step)):
        share = save_s / (EVAL_EVERY * step_s)
        print(
            f"{where}: step {step_s:.3f} s; a save at every evaluation would cost {100 * share:.1f}% of training; "
            f"with SAVE_SHARE {SAVE_SHARE}: every {between(step_s)} evaluation(s)"
        )


if __name__ == "__main__":
    main()
