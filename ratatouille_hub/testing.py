"""Test infrastructure (not the product): one home for the tiny models, perturbed fine-tunes, dataset
writers and results fixtures that the test suite and the benchmarks share.

Everything is deterministic in its seed, so tests can make exact assertions on what comes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import RecipeConfig
from .results import Average, BestRun, IngredientRecord, Outcome, Results, RunResult, Scores, SummaryRow

TRAIN_DOMAINS = ("art_painting", "cartoon", "photo")


def labels(names: Sequence[str]) -> dict:
    """id2label and label2id for a transformers config."""
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def tiny_resnet(seed: int, *, names: Sequence[str] | None = None, num_labels: int = 3, hidden_sizes=(8, 16)):
    """A ResNet of a few thousand parameters (BatchNorm buffers included), its weights drawn from `seed`."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    head = labels(names) if names is not None else {"num_labels": num_labels}
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=list(hidden_sizes), depths=[1] * len(hidden_sizes), layer_type="basic", **head
    )
    return ResNetForImageClassification(config)


def perturbed_backbone(state: dict, seed: int, *, scale: float = 0.05, integer_value: int | None = None) -> dict:
    """A community-style fine-tune of `state`'s backbone: every float tensor moved by `scale` x N(0, 1)
    noise, BatchNorm running variances rescaled, integer buffers set to `integer_value`; heads dropped."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    backbone = {}
    for name, tensor in state.items():
        if name.startswith("classifier."):
            continue
        if name.endswith("running_var"):
            tensor = tensor * torch.exp(0.2 * torch.randn(tensor.shape, generator=generator))
        elif tensor.is_floating_point():
            tensor = tensor + scale * torch.randn(tensor.shape, generator=generator)
        elif integer_value is not None:
            tensor = torch.full_like(tensor, integer_value)
        backbone[name] = tensor
    return backbone


def write_hub_dataset(dataset, folder: Path, card: str = "---\nlicense: apache-2.0\n---\n# dataset\n") -> Path:
    """A `datasets.Dataset` in the Hub layout (data/train-*.parquet + README card), as a local folder."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "README.md").write_text(card)
    return folder


def scores(val: float, test: float, domains: Sequence[str] = TRAIN_DOMAINS) -> dict:
    return {"val_accuracy": val, "test_accuracy": test, "val_accuracy_per_domain": dict.fromkeys(domains, val)}


def make_results(
    config: RecipeConfig,
    *,
    ingredients: Sequence[tuple[str, str, bool]],
    run_inits: Sequence[str],
    members: Sequence[int] | None = None,
    method: str | None = None,
    soup: tuple[float, float] = (0.91, 0.8),
    runs: Sequence[tuple[float, float]] | None = None,
    hparams: dict | None = None,
    summary_names: Sequence[str] | None = None,
    summary: tuple[float, float] = (0.9, 0.8),
    test_domain: str = "sketch",
    train_domains: Sequence[str] = TRAIN_DOMAINS,
) -> Results:
    """A results record as assembly builds it, with the values a test chooses: (val, test) accuracies of
    the soup, of each run (default 0.9 - 0.01 i, 0.7 + 0.01 i) and of every summary row."""
    n = len(run_inits)
    runs = runs or [(0.9 - 0.01 * i, 0.7 + 0.01 * i) for i in range(n)]
    hparams = hparams or {"lr": 5e-5, "weight_decay": 1e-4, "dropout": 0.1}
    members = list(range(n)) if members is None else list(members)
    method = method or config.method
    if summary_names is None:
        summary_names = ["best single run (#0, by validation)", f"soup, {method} ({len(members)} runs), this model"]
    best = max(range(n), key=lambda i: (runs[i][0], -i))
    return Results(
        recipe=config.to_dict(),
        target=config.target,
        test_domain=test_domain,
        train_domains=list(train_domains),
        id2label={"0": "a", "1": "b", "2": "c"},
        ingredients=[IngredientRecord(source, revision, is_hub) for source, revision, is_hub in ingredients],
        runs=[
            RunResult(
                index=i,
                init=init,
                hparams=dict(hparams),
                best_step=100 * (i + 1),
                folder=f"runs/{i:012x}",
                **scores(*runs[i], train_domains),
            )
            for i, init in enumerate(run_inits)
        ],
        soup=Outcome(method=method, members=members, **scores(*soup, train_domains)),
        best_run=BestRun(index=best, **scores(*runs[best], train_domains)),
        averages={} if method == "best-run" else {method: Average(members=members, **scores(*soup, train_domains))},
        greedy_order=sorted(range(n), key=lambda i: (-runs[i][0], i)),
        ensemble=Scores(**scores(*soup, train_domains)),
        summary=[SummaryRow(name, *summary) for name in summary_names],
        bn_policy=config.bn_policy,
        diagnostics=[],
    )
