"""The Model Ratatouille recipe, stage by stage (METHOD.md): fetch, data, linear probe, runs, merge,
evaluate, card.

Every expensive artefact lives in a folder named after a hash of what produced it, written whole
or not at all, with a `done` marker: rerunning an interrupted recipe redoes only what is missing.

    output/
      recipe.yaml        the config, replayable with --config
      lp/<hash>/         the shared linear-probe head
      inits/<hash>/      fusing only: one run's starting point, a convex combination of checkpoints
      runs/<hash>/       one target fine-tune: model/, metrics.json, predictions.safetensors, done
      soup/              the result as a transformers model folder (+ README.md, recipe.yaml, results.json):
                         the weight average (ratatouille, soup) or the best run by validation (erm, fusing)
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .card import build_card, is_hub_id
from .config import AVERAGING_STRATEGIES, RecipeConfig, RunHParams, draw_hparams, stable_hash
from .data import (
    DataError,
    ImageTensors,
    decode_images,
    load_target,
    normalization_of,
    resolution_of,
    split_domains,
)
from .diagnose import diagnose_states, plot_paths
from .discover import discover_finetunes, format_candidates
from .evaluation import accuracy, ensemble_probabilities, predict_logits
from .fetch import Ingredient, resolve_dataset, resolve_model
from .io import atomic_write_json, exclusive_lock, staged_folder, sweep_staging
from .merge import average_state_dicts, greedy_select, merge_model_folders
from .models import (
    head_linear,
    load_classifier,
    load_processor,
    quiet_transformers,
    record_input_size,
    set_head,
)
from .train import (
    DomainBatches,
    LinearHead,
    TargetData,
    linear_probe,
    make_accelerator,
    optimize,
    reestimate_batchnorm,
    validation_accuracy,
)
from .vetting import vet_ingredients

DONE = "done"
PROCESSOR_FILE = "preprocessor_config.json"
DIAGNOSTICS_PLOT = "diagnostics.png"


class RecipeError(ValueError):
    """The recipe cannot run with these ingredients."""


@dataclass(frozen=True)
class Target:
    """The decoded target task: training domains (train/val) and the held-out test domain."""

    reference: str  # id@sha for a Hub dataset, else the path
    data: TargetData
    test: ImageTensors
    train_domains: tuple[str, ...]
    test_domain: str
    id2label: dict[int, str]
    fingerprint: str


@dataclass(frozen=True)
class RunRecord:
    index: int
    init: Ingredient
    hparams: RunHParams
    folder: Path

    @property
    def metrics(self) -> dict:
        return json.loads((self.folder / "metrics.json").read_text())

    @property
    def model_folder(self) -> Path:
        return self.folder / "model"

    def predictions(self) -> dict[str, torch.Tensor]:
        return load_file(self.folder / "predictions.safetensors")


def recycle(config: RecipeConfig, *, token: str | bool | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run the whole recipe; returns the results written to `<output>/soup/results.json`."""
    quiet_transformers()
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"output {output} exists and is not a folder")
    check_same_recipe(output / "recipe.yaml", config)  # read only: refuse another recipe's folder before any work
    return _run_stages(config, output, token, echo)


@contextmanager
def claimed_output(output: Path, config: RecipeConfig):
    """Lock the output folder and save recipe.yaml in it. Taken only once every input has been checked,
    so a command that fails on bad input leaves the output folder as it found it."""
    output.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output / ".lock", f"{output} is in use by another ratatouille-hub process"):
        check_same_recipe(output / "recipe.yaml", config)
        for folder in (output, output / "lp", output / "inits", output / "runs"):  # what a killed run left half-written
            sweep_staging(folder)
        config.save_yaml(output / "recipe.yaml")
        yield


# A changed value of these keeps every finished run valid (a run's folder is named after its own
# init, so strategy and aux only choose which runs exist); any other change is another recipe.
REUSABLE_CHANGES = frozenset({"runs", "method", "bn_policy", "output", "strategy", "aux", "aux_limit"})


def check_same_recipe(saved: Path, config: RecipeConfig) -> None:
    """Refuse an output folder that holds another recipe's runs (mixing them would mislead)."""
    if not saved.exists():
        return
    previous = RecipeConfig.load_yaml(saved).to_dict()
    changed = sorted(k for k, v in config.to_dict().items() if previous.get(k) != v and k not in REUSABLE_CHANGES)
    if changed:
        raise RecipeError(
            f"{saved.parent} holds the runs of another recipe (differs in: {', '.join(changed)}); "
            "use another --output, or replay it with --config " + str(saved)
        )


def _run_stages(config: RecipeConfig, output: Path, token, echo) -> dict:
    echo(f"[fetch] base {config.base}")
    base = resolve_model(config.base, token=token)
    aux = [resolve_model(*_pinned(source), token=token) for source in recycled_sources(config, token, echo)]
    for ingredient in aux:
        echo(f"[fetch] recycled {ingredient.reference}")
    check_ingredients(base, aux)
    if config.strategy == "fusing" and not aux:
        raise RecipeError("--strategy fusing needs recycled fine-tunes (--aux, or a Hub base to discover them)")

    echo(f"[data] {config.target}")
    target = prepare_target(config, base, token)
    echo(f"[data] {target.reference}: train domains {', '.join(target.train_domains)}; held out: {target.test_domain}")

    with claimed_output(output, config):  # every input checked: only now is anything written
        return _train_and_merge(config, output, base, aux, target, echo)


def _train_and_merge(
    config: RecipeConfig, output: Path, base: Ingredient, aux: list[Ingredient], target: Target, echo
) -> dict:
    accelerator = make_accelerator(config.precision)
    head, head_key = shared_linear_probe(config, base, target, accelerator, output / "lp", echo)
    inits = run_inits(config, base, aux, target, output / "inits", echo)
    runs = [
        fine_tune(config, index, init, base, (head, head_key), target, accelerator, output / "runs", echo)
        for index, init in enumerate(inits)
    ]
    recycled = {member for init in inits for member in fusion_members(init, aux)}
    used = [i for i in aux if i in recycled]
    echo(
        "[merge] averaging runs"
        if config.strategy in AVERAGING_STRATEGIES
        else "[merge] evaluating runs and their averages"
    )
    return make_soup(config, base, runs, target, output / "soup", echo, ingredients=[base, *used])


def run_inits(
    config: RecipeConfig, base: Ingredient, aux: list[Ingredient], target: Target, root: Path, echo
) -> list[Ingredient]:
    """Where each run starts (METHOD.md): the base, one recycled fine-tune, or a fusion of several."""
    if config.strategy == "ratatouille":
        return [aux[index - 1] if 1 <= index <= len(aux) else base for index in range(config.runs)]
    if config.strategy == "fusing":
        groups = featurizers_by_dataset(aux)
        return [fused_init(config, index, base, groups, target, root, echo) for index in range(config.runs)]
    return [base] * config.runs


def featurizers_by_dataset(aux: list[Ingredient]) -> list[list[Ingredient]]:
    """Recycled fine-tunes grouped by the dataset their card names (ungrouped when it names none)."""
    groups: dict[str, list[Ingredient]] = {}
    for ingredient in aux:
        groups.setdefault(trained_on(ingredient), []).append(ingredient)
    return [groups[name] for name in sorted(groups)]


def trained_on(ingredient: Ingredient) -> str:
    from huggingface_hub import ModelCard

    card = ingredient.path / "README.md"
    try:
        datasets = ModelCard.load(card).data.datasets if card.is_file() else None
    except Exception:  # a card we cannot parse names no dataset
        datasets = None
    if isinstance(datasets, str):
        datasets = [datasets]
    return ",".join(sorted(str(d) for d in datasets)) if datasets else ingredient.reference


FUSION_FILE = "fusion.json"


def fused_init(
    config: RecipeConfig, index: int, base: Ingredient, groups: list[list[Ingredient]], target: Target, root: Path, echo
) -> Ingredient:
    """Fusing (METHOD.md): the base and one fine-tune per auxiliary dataset, mixed with weights
    exp(4U) / sum, drawn from the run's seed. Heads are irrelevant: the run replaces its head with the LP."""
    rng = random.Random(stable_int(f"{config.seed}:{index}:fusing"))
    members = [base] + [group[rng.randrange(len(group))] for group in groups]
    raw = [math.exp(4 * rng.random()) for _ in members]
    weights = [w / sum(raw) for w in raw]
    key = stable_hash({"members": [m.revision for m in members], "weights": weights, "labels": target.id2label})
    folder = root / key
    if not (folder / DONE).exists():
        echo(f"[fusing] run {index + 1}: " + ", ".join(f"{w:.2f} x {m.source}" for w, m in zip(weights, members)))
        torch.manual_seed(stable_int(f"{config.seed}:{index}:fusing-heads"))
        states = [load_classifier(m.path, target.id2label).state_dict() for m in members]
        model = load_classifier(base.path, target.id2label)
        model.load_state_dict(average_state_dicts(states, weights))
        with staged_folder(folder) as staging:
            model.save_pretrained(staging)
            copy_processor(base.path, staging)
            atomic_write_json(staging / FUSION_FILE, {"members": [m.reference for m in members], "weights": weights})
            (staging / DONE).touch()
    return Ingredient(f"fusion:{key}", f"fused:{key}", folder)


def fusion_members(init: Ingredient, aux: list[Ingredient]) -> list[Ingredient]:
    """The recycled checkpoints an init is made of (itself, or the members of a fusion)."""
    if not init.revision.startswith("fused:"):
        return [init]
    references = json.loads((init.path / FUSION_FILE).read_text())["members"]
    return [i for i in aux if i.reference in references]


def copy_processor(base_folder: Path, destination: Path) -> None:
    """A complete model folder: the base's image processor config, where it has one (timm-wrapped
    models keep theirs inside config.json)."""
    if (base_folder / PROCESSOR_FILE).exists():
        shutil.copyfile(base_folder / PROCESSOR_FILE, destination / PROCESSOR_FILE)


def recycled_sources(config: RecipeConfig, token, echo) -> list[str]:
    """The --aux list, or (Hub base, no --aux) the fine-tunes discovery accepts, pinned as id@sha."""
    if config.strategy not in ("ratatouille", "fusing"):
        return []
    if config.aux or not is_hub_id(config.base):
        return list(config.aux)
    echo(f"[discover] fine-tunes of {config.base} on the Hub")
    target_id, _, _ = resolve_dataset(config.target, config.domain_column, config.label_column)
    candidates = discover_finetunes(config.base, target=target_id, limit=config.aux_limit, token=token)
    echo(format_candidates(candidates))
    return [f"{c.repo_id}@{c.revision}" for c in candidates if c.accepted]


def dataset_revision(target: str, token) -> str | None:
    """The commit sha of a Hub dataset, so the data are read at one pinned revision (None: local)."""
    if not is_hub_id(target):
        return None
    from huggingface_hub import HfApi

    return HfApi(token=token).dataset_info(target).sha


def _pinned(source: str) -> tuple[str, str | None]:
    """`org/name@sha` -> (org/name, sha); folders and plain ids -> (source, None)."""
    name, at, revision = source.partition("@")
    if at and is_hub_id(name) and not Path(source).exists():
        return name, revision
    return source, None


def prepare_target(config: RecipeConfig, base: Ingredient, token=None) -> Target:
    target_id, domain_column, label_column = resolve_dataset(config.target, config.domain_column, config.label_column)
    config = config.replace(target=target_id, domain_column=domain_column, label_column=label_column)
    revision = dataset_revision(target_id, token)
    dataset = load_target(config.target, revision=revision, token=token)
    if config.image_column not in dataset.column_names:
        raise DataError(
            f"target dataset has no column {config.image_column!r} (columns: {', '.join(dataset.column_names)})"
        )
    splits = split_domains(
        dataset,
        domain_column=config.domain_column,
        label_column=config.label_column,
        test_domain=config.test_domain,
        holdout_fraction=config.holdout_fraction,
        seed=config.seed,
    )
    processor = load_processor(base.path)
    size = resolution_of(processor, config.image_size)

    def decode(rows) -> ImageTensors:
        return decode_images(
            dataset,
            rows,
            image_column=config.image_column,
            label_column=config.label_column,
            label_names=splits.label_names,
            size=size,
        )

    data = TargetData(
        train=[decode(d.train) for d in splits.train_domains],
        val=[decode(d.val) for d in splits.train_domains],
        normalize=normalization_of(processor),
        augment=config.augment,
    )
    fingerprint = stable_hash(
        {
            "dataset": getattr(dataset, "_fingerprint", config.target),
            "splits": [[d.domain, d.train, d.val] for d in splits.train_domains],
            "test": splits.test_domain,
            "size": size,
            "normalize": asdict(data.normalize),
        }
    )
    return Target(
        reference=f"{target_id}@{revision}" if revision else target_id,
        data=data,
        test=decode(splits.test),
        train_domains=tuple(d.domain for d in splits.train_domains),
        test_domain=splits.test_domain,
        id2label=splits.id2label,
        fingerprint=fingerprint,
    )


def check_ingredients(base: Ingredient, aux: list[Ingredient], id2label: dict[int, str] | None = None) -> None:
    """Every recycled checkpoint must be a fine-tune of the base (vetting.py): same architecture and backbone
    tensors (names, shapes, dtypes), finite weights, near the base's; no custom code in any of them."""
    vet_ingredients(base, aux)


def shared_linear_probe(
    config, base: Ingredient, target: Target, accelerator, root: Path, echo
) -> tuple[LinearHead, str]:
    """The target head trained once on the frozen base; every run starts from it (so heads average)."""
    key = stable_hash(
        {
            "base": base.revision,
            "data": target.fingerprint,
            "steps": config.lp_steps,
            "lr": config.lp_lr,
            "batch": config.batch_size,
            "eval_every": config.eval_every,
            "seed": config.seed,
        }
    )
    folder = root / key
    if not (folder / DONE).exists():
        echo(f"[train] linear probe on the frozen base ({config.lp_steps} steps)")
        model = load_classifier(base.path, target.id2label).to(accelerator.device)
        head = linear_probe(
            model,
            target.data,
            steps=config.lp_steps,
            lr=config.lp_lr,
            batch_size=config.batch_size,
            eval_every=config.eval_every,
            seed=config.seed,
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
    return LinearHead(tensors["weight"], tensors["bias"], metrics["step"], metrics["val_accuracy"]), key


def fine_tune(
    config,
    index: int,
    init: Ingredient,
    base: Ingredient,
    shared_head: tuple[LinearHead, str],
    target: Target,
    accelerator,
    root: Path,
    echo,
) -> RunRecord:
    """One target fine-tune from (init featurizer, shared head); skipped when already done."""
    head, head_key = shared_head
    hparams = draw_hparams(config, index)
    recycled = init.revision != base.revision
    warmup = config.warmup_steps if recycled else 0
    key = stable_hash(
        {
            "init": init.revision,
            "head": head_key,
            "data": target.fingerprint,
            "hparams": asdict(hparams),
            "seed": [config.seed, index],
            "steps": config.steps,
            "warmup": warmup,
            "eval_every": config.eval_every,
            "batch": config.batch_size,
            "augment": config.augment,
            "precision": config.precision,
        }
    )
    folder = root / key
    record = RunRecord(index, init, hparams, folder)
    label = f"run {index + 1}/{config.runs}"
    if (folder / DONE).exists():
        echo(f"[train] {label}: done earlier (from {init.source}), reused")
        return record
    echo(
        f"[train] {label} from {init.source}: lr {hparams.lr:g}, wd {hparams.weight_decay:g}, dropout {hparams.dropout:g}"
    )
    # Randomness depends on (trial seed, run index) only, never on where the init was fetched from.
    run_seed = f"{config.seed}:{index}"
    torch.manual_seed(stable_int(run_seed + ":init"))
    model = load_classifier(init.path, target.id2label).to(accelerator.device)
    set_head(model, head.weight, head.bias)
    batches = DomainBatches(target.data.train, config.batch_size, seed=stable_int(run_seed + ":batches"))
    data = target.data
    augment_seed = stable_int(run_seed + ":augment") if data.augment else None
    common = dict(
        steps=0,
        lr=hparams.lr,
        weight_decay=hparams.weight_decay,
        accelerator=accelerator,
        normalize=data.normalize,
        augment_seed=augment_seed,
        dropout=hparams.dropout,
    )
    if warmup:
        head_params = list(head_linear(model).parameters())
        for param in model.parameters():
            param.requires_grad_(any(param is p for p in head_params))
        optimize(model, batches, parameters=head_params, **{**common, "steps": warmup}, desc=f"{label} head warm-up")
        for param in model.parameters():
            param.requires_grad_(True)
    pooled_val = data.pooled_val
    outcome = optimize(
        model,
        batches,
        parameters=list(model.parameters()),
        **{**common, "steps": config.steps},
        validate=lambda m: validation_accuracy(m, pooled_val, data.normalize),
        eval_every=config.eval_every,
        desc=label,
    )
    model.load_state_dict(outcome.state)
    record_input_size(model, target.test.pixels.shape[-1])
    predictions = predict_target(model, target)
    metrics = {
        "init": init.reference,
        "hparams": asdict(hparams),
        "warmup_steps": warmup,
        "best_step": outcome.step,
        "val_accuracy": outcome.val_accuracy,
        "history": outcome.history,
    }
    with staged_folder(folder) as staging:
        model.save_pretrained(staging / "model")
        copy_processor(base.path, staging / "model")
        save_file({k: v.contiguous() for k, v in predictions.items()}, staging / "predictions.safetensors")
        atomic_write_json(staging / "metrics.json", metrics)
        (staging / DONE).touch()
    echo(f"[train] {label}: best validation {100 * outcome.val_accuracy:.1f}% at step {outcome.step}")
    return record


def stable_int(text: str) -> int:
    return int(stable_hash({"k": text}, length=15), 16)


def make_soup(
    config, base: Ingredient, runs: list[RunRecord], target: Target, folder: Path, echo, ingredients: list[Ingredient]
) -> dict:
    """Evaluate the runs, their uniform and greedy averages and their ensemble; write the result folder
    atomically: the weight average (ratatouille, soup) or the best run by validation (erm, fusing)."""
    labels_val = {name: images.labels for name, images in zip(target.train_domains, target.data.val)}
    pooled_labels = torch.cat(list(labels_val.values()))

    def score(predictions: dict[str, torch.Tensor]) -> dict:
        return _scores(predictions, labels_val, target.test.labels, pooled_labels)

    run_predictions = [run.predictions() for run in runs]
    run_rows = [score(predictions) for predictions in run_predictions]

    by_val = sorted(range(len(runs)), key=lambda i: (-run_rows[i]["val_accuracy"], i))
    best = by_val[0]
    averager = RunAverager([run.model_folder for run in runs], target, config.bn_policy)
    averages = {
        "uniform": list(range(len(runs))),
        "greedy": sorted(greedy_select(by_val, averager.validation_accuracy)),
    }
    averaging = config.strategy in AVERAGING_STRATEGIES

    with staged_folder(folder) as staging:
        average_rows = {}
        if averaging:
            members = averages[config.method]
            merge_model_folders([runs[i].model_folder for i in members], staging)
            copy_processor(base.path, staging)
            soup_model = load_classifier(staging, target.id2label)
            if config.bn_policy == "reestimate":
                averager.reestimate(soup_model)
                soup_model.save_pretrained(staging)
            average_rows[config.method] = score(predict_target(soup_model, target))
            result = {"method": config.method, "members": members, **average_rows[config.method]}
        else:
            for file in runs[best].model_folder.iterdir():
                shutil.copyfile(file, staging / file.name)
            result = {"method": "best-run", "members": [best], **run_rows[best]}
        for method, members in averages.items():
            if method not in average_rows:
                average_rows[method] = score(predict_target(averager.model(members), target))
        ensemble_row = score({k: ensemble_probabilities([p[k] for p in run_predictions]) for k in run_predictions[0]})

        this_model = ", this model"
        summary = [
            {
                "name": f"best single run (#{best}, by validation){'' if averaging else this_model}",
                **_pick(run_rows[best]),
            },
            *(
                {
                    "name": f"soup, {method} ({len(averages[method])} runs)"
                    f"{this_model if averaging and method == config.method else ''}",
                    **_pick(average_rows[method]),
                }
                for method in ("uniform", "greedy")
            ),
            {"name": f"ensemble of the {len(runs)} runs (reference)", **_pick(ensemble_row)},
        ]
        results = {
            "recipe": config.to_dict(),
            "target": target.reference,
            "test_domain": target.test_domain,
            "train_domains": list(target.train_domains),
            "id2label": {str(k): v for k, v in target.id2label.items()},
            "ingredients": [
                {"source": i.source, "revision": i.revision, "is_hub": not i.is_local and is_hub_id(i.source)}
                for i in ingredients
            ],
            "runs": [
                {
                    "index": run.index,
                    "init": run.init.reference,
                    "hparams": asdict(run.hparams),
                    "best_step": run.metrics["best_step"],
                    "folder": run.folder.relative_to(folder.parent).as_posix(),
                    **row,
                }
                for run, row in zip(runs, run_rows)
            ],
            "soup": result,
            "best_run": {"index": best, **run_rows[best]},
            **{f"soup_{method}": {"members": averages[method], **average_rows[method]} for method in averages},
            "greedy_order": by_val,
            "ensemble": ensemble_row,
            "summary": summary,
            "bn_policy": config.bn_policy,
            "diagnostics": averager.diagnose_against(
                best, [i for i in by_val if i != best], staging / DIAGNOSTICS_PLOT
            ),
        }
        atomic_write_json(staging / "results.json", results)
        config.save_yaml(staging / "recipe.yaml")
        build_card(results, figure=DIAGNOSTICS_PLOT if len(runs) > 1 else None).save(staging / "README.md")
    return results


class RunAverager:
    """Weight averages of any subset of the runs, in memory, with the soup's BatchNorm policy applied.

    Loads each run once and holds the state dicts (in the model's own key space): greedy search
    evaluates many subsets.
    """

    def __init__(self, model_folders: list[Path], target: Target, bn_policy: str):
        self.target = target
        self.bn_policy = bn_policy
        self.states = [load_classifier(folder, target.id2label).state_dict() for folder in model_folders]
        self._model = load_classifier(model_folders[0], target.id2label)

    def model(self, subset: list[int]):
        self._model.load_state_dict(average_state_dicts([self.states[i] for i in subset]))
        if self.bn_policy == "reestimate":
            self.reestimate(self._model)
        return self._model

    def reestimate(self, model) -> None:
        reestimate_batchnorm(model, self.target.data.pooled_train, self.target.data.normalize)

    def validation_accuracy(self, subset: list[int]) -> float:
        return validation_accuracy(self.model(subset), self.target.data.pooled_val, self.target.data.normalize)

    def diagnose_against(self, reference: int, others: list[int], plot: Path) -> list[dict]:
        """Diversity and averageability of `reference` with each other run (training-domain validation);
        the interpolation paths are drawn to `plot`. Raw weights: no BatchNorm policy on the paths."""
        if not others:
            return []
        validation = self.target.data.pooled_val

        def predict(state) -> torch.Tensor:
            self._model.load_state_dict(state)
            return predict_logits(self._model, validation, self.target.data.normalize).argmax(dim=1)

        names = [f"run {i}" for i in range(len(self.states))]
        diagnosis = diagnose_states(
            names, self.states, predict, validation.labels, pairs=[(reference, i) for i in others]
        )
        plot_paths(diagnosis, plot)
        return [
            {
                "runs": [pair.a, pair.b],
                "ratio_error": pair.ratio_error,
                "barrier": pair.barrier,
                "path_accuracies": list(pair.path_accuracies),
            }
            for pair in diagnosis.pairs
        ]


def greedy_members(model_folders: list[Path], config: RecipeConfig, token=None) -> list[int]:
    """Greedy soup of existing checkpoints of the target's labels: the `merge --method greedy` path.

    Candidates are ranked by their own training-domain validation accuracy, as in `recycle`.
    """
    base = resolve_model(str(model_folders[0]), token=token)
    target = prepare_target(config, base, token)
    averager = RunAverager(list(model_folders), target, config.bn_policy)
    order = sorted(range(len(model_folders)), key=lambda i: (-averager.validation_accuracy([i]), i))
    return sorted(greedy_select(order, averager.validation_accuracy))


def predict_target(model, target: Target) -> dict[str, torch.Tensor]:
    """Logits on every training domain's validation split (`val/<domain>`) and on the test domain."""
    predictions = {
        f"val/{name}": predict_logits(model, images, target.data.normalize)
        for name, images in zip(target.train_domains, target.data.val)
    }
    predictions["test"] = predict_logits(model, target.test, target.data.normalize)
    return predictions


def _scores(predictions: dict[str, torch.Tensor], labels_val, test_labels, pooled_labels) -> dict:
    per_domain = {name: accuracy(predictions[f"val/{name}"], labels) for name, labels in labels_val.items()}
    pooled = accuracy(torch.cat([predictions[f"val/{name}"] for name in labels_val]), pooled_labels)
    return {
        "val_accuracy": pooled,
        "val_accuracy_per_domain": per_domain,
        "test_accuracy": accuracy(predictions["test"], test_labels),
    }


def _pick(row: dict) -> dict:
    return {"val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"]}
