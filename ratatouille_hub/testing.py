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


def tiny_resnet_config(*, names: Sequence[str] | None = None, num_labels: int = 3, hidden_sizes=(8, 16)):
    """The config of `tiny_resnet`, for a model whose weights come from elsewhere."""
    from transformers import ResNetConfig

    head = labels(names) if names is not None else {"num_labels": num_labels}
    return ResNetConfig(
        embedding_size=8, hidden_sizes=list(hidden_sizes), depths=[1] * len(hidden_sizes), layer_type="basic", **head
    )


def tiny_resnet(seed: int, *, names: Sequence[str] | None = None, num_labels: int = 3, hidden_sizes=(8, 16)):
    """A ResNet of a few thousand parameters (BatchNorm buffers included), its weights drawn from `seed`."""
    import torch
    from transformers import ResNetForImageClassification

    torch.manual_seed(seed)
    return ResNetForImageClassification(
        tiny_resnet_config(names=names, num_labels=num_labels, hidden_sizes=hidden_sizes)
    )


def tiny_vit(
    seed: int,
    *,
    names: Sequence[str] | None = None,
    num_labels: int = 3,
    hidden_size: int = 16,
    intermediate_size: int = 32,
):
    """A one-layer ViT of 16 px inputs in 8 px patches (no BatchNorm), its weights drawn from `seed`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    head = labels(names) if names is not None else {"num_labels": num_labels}
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        **head,
    )
    return ViTForImageClassification(config)


def tiny_processor(size: int = 16):
    """A Pillow image processor at `size` px with mean = std = 0.5, the tiny checkpoints' own."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def save_tiny_checkpoint(folder: Path, model, *, processor=None, pickle: bool = False) -> Path:
    """A transformers folder: config and safetensors weights (with `pickle`, a torch pickle instead, as
    old repos have), plus the processor's config when one is given."""
    if pickle:
        import torch

        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return Path(folder)


def perturbed_backbone(
    state: dict,
    seed: int,
    *,
    scale: float = 0.05,
    integer_value: int | None = None,
    rescale_running_var: bool = True,
    head: bool = False,
) -> dict:
    """A community-style fine-tune of `state`: every float tensor moved by `scale` x N(0, 1) noise (BatchNorm
    running variances rescaled by exp(0.2 N(0, 1)) instead, unless `rescale_running_var` is off), integer
    buffers set to `integer_value`; the head dropped, or perturbed too with `head`. Tensors are drawn in
    `state`'s order from a Generator of `seed`, so fixtures built with it keep their exact bytes."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    perturbed = {}
    for name, tensor in state.items():
        if name.startswith("classifier.") and not head:
            continue
        if rescale_running_var and name.endswith("running_var"):
            tensor = tensor * torch.exp(0.2 * torch.randn(tensor.shape, generator=generator))
        elif tensor.is_floating_point():
            tensor = tensor + scale * torch.randn(tensor.shape, generator=generator)
        elif integer_value is not None:
            tensor = torch.full_like(tensor, integer_value)
        perturbed[name] = tensor
    return perturbed


def finetune_of(base, model, seed: int, *, integer_value: int | None = None):
    """`model` (another head) given `base`'s backbone, perturbed by `seed`: a community fine-tune of `base`."""
    missing, unexpected = model.load_state_dict(
        perturbed_backbone(base.state_dict(), seed, integer_value=integer_value), strict=False
    )
    assert not unexpected and all(name.startswith("classifier.") for name in missing)
    return model


def write_hub_dataset(dataset, folder: Path, card: str | None = "---\nlicense: apache-2.0\n---\n# dataset\n") -> Path:
    """A `datasets.Dataset` in the Hub layout (data/train-*.parquet + README card, unless `card` is None),
    as a local folder."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def tiny_recipe(world, output: Path, **changes) -> RecipeConfig:
    """The tests' standard recipe on the tiny world (conftest.py): 3 runs of 4 steps, 16 px. Its soups'
    bytes are pinned by tests/test_parity.py."""
    return RecipeConfig(
        base=str(world.base),
        target=str(world.target),
        aux=tuple(str(a) for a in world.aux),
        runs=3,
        steps=4,
        eval_every=2,
        lp_steps=5,
        lp_lr=1e-2,
        warmup_steps=2,
        batch_size=4,
        lr=1e-3,
        lr_choices=(1e-3, 2e-3),
        image_size=16,
        output=str(output),
        **changes,
    )


def tiny_timm(folder: Path, pretrained_cfg: dict, *, variance=(0.5, 1.5), names=None) -> Path:
    """A timm-wrapped EfficientNet of a few thousand parameters (seed 7), with "pretrained" BatchNorm
    statistics (means in [-0.1, 0.1], variances in `variance`) and the given pretrained_cfg."""
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(7)
    names = names or [f"digit-{i}" for i in range(10)]
    config = TimmWrapperConfig(
        architecture="test_efficientnet",
        model_args={"channel_multiplier": 0.25},
        num_labels=len(names),
        **labels(names),
    )
    config.pretrained_cfg = dict(pretrained_cfg)
    model = TimmWrapperForImageClassification(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(*variance)
    model.config.label_names = names
    model.save_pretrained(folder)
    return folder


def two_run_soup_results(config: RecipeConfig, base: str, finetune: str, **changes) -> Results:
    """The results of a 2-run soup of `base` and one Hub fine-tune, at 50% validation and 25% held out."""
    return make_results(
        config,
        ingredients=[(base, "a" * 40, True), (finetune, "b" * 40, True)],
        run_inits=[f"{base}@{'a' * 40}", f"{finetune}@{'b' * 40}"],
        soup=(0.5, 0.25),
        runs=[(0.5, 0.25)] * 2,
        hparams={"lr": 5e-5, "weight_decay": 0.0, "dropout": 0.0},
        summary_names=["soup, uniform (2 runs) <- this model"],
        summary=(0.5, 0.25),
        **changes,
    )


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
        best_recycled_run=None,
        averages={} if method == "best-run" else {method: Average(members=members, **scores(*soup, train_domains))},
        greedy_order=sorted(range(n), key=lambda i: (-runs[i][0], i)),
        ensemble=Scores(**scores(*soup, train_domains)),
        summary=[SummaryRow(name, *summary) for name in summary_names],
        bn_policy=config.bn_policy,
        diagnostics=[],
    )


def write_perturbed_runs(model, folders: Sequence[Path], *, card: str | None = None) -> None:
    """Benchmark runs: `model`'s weights plus 1e-3 x N(0, 1) noise seeded by the number ending each folder's
    name (`run-07`), written whole (staged) into the folders that lack weights, so a killed run is redone."""
    import torch

    from .io import staged_folder

    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for folder in folders:
        if (Path(folder) / "model.safetensors").is_file():
            continue
        print(f"generating {folder}", flush=True)
        noise = torch.Generator().manual_seed(int(Path(folder).name.rsplit("-", 1)[1]))
        model.load_state_dict(base)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=noise), alpha=1e-3)
        with staged_folder(folder) as staging:
            model.save_pretrained(staging)
            if card is not None:
                (staging / "README.md").write_text(card)
