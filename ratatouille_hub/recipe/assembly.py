"""Assembling a plan's finished runs into the result: every run scored, each merge method's average, the
ensemble, diagnostics, and the result folder (model, card, recipe.yaml, results.json), written atomically.

Assembly reads finished runs only, through their records (artifacts.RunRecord): it never trains, so the
runs can come from any executor. The soup folder is an artifact like the runs (artifacts.SoupFolder).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import ProbeRecord, RunRecord, SoupFolder, builds, materialize
from ..card import build_card, card_license
from ..diagnostics import diagnose_loaded
from ..errors import RecipeError
from ..evaluation import INFERENCE_BATCH, ensemble_probabilities, inference_batch, predict_logits, scoring_device
from ..fetch import is_hub_id, resolve_model, weights_digest
from ..figures import ScorePoint, plot_paths, plot_scores
from ..hashing import stable_hash
from ..io import foreign_entries, match_umask
from ..merge_engine import (
    COPIED_CONFIGS,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    SafetensorsSource,
    StateSource,
    collect,
    merge_model_folders,
    read_safetensors_header,
)
from ..merge_methods import MERGE_METHODS, MergeInputs, Mixture, recycle_methods
from ..models import load_classifier, set_head
from ..provenance import (
    RUN_FILE,
    SoupIngredient,
    SoupRecord,
    file_sha256,
    plan_fingerprint,
    relative_source,
    run_name,
)
from ..results import (
    Average,
    BestRun,
    IngredientRecord,
    Outcome,
    PairRecord,
    Results,
    RunResult,
    Scores,
    SummaryRow,
)
from ..target import Target, predict_target, prepare_target, score_predictions
from ..tracking import TEST_ACCURACY, UNTRACKED, VAL_ACCURACY, Tracking, recipe_run
from ..train import reestimate_batchnorm, validation_accuracy
from .plan import RecipePlan

DIAGNOSTICS_PLOT = "diagnostics.png"
SCORES_PLOT = "accuracies.png"
SOUP_FOLDER_FILES = (  # what `assemble` writes into a soup folder (and weight shards, for a large model)
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    *COPIED_CONFIGS,
    "README.md",
    "recipe.yaml",
    SoupFolder.RESULTS,
    RUN_FILE,  # a best-run soup (erm, fusing) is its run's model folder, fingerprint included
    DIAGNOSTICS_PLOT,
    SCORES_PLOT,
)


def assemble(
    plan: RecipePlan, output: Path, target: Target, echo, destination: Path, tracking: Tracking = UNTRACKED
) -> Results:
    """Score the finished runs, average them with every merge method recycle offers, and write the result
    folder `destination`: the weight average (averaging strategies) or the best run by validation. A soup
    made there from the same recipe and runs is returned as it is: nothing merged or evaluated again. A
    built soup's scores are reported to `tracking`."""
    key = soup_key(plan, output)
    soup = materialize(SoupFolder, destination, plan, output, target, echo, destination, tracking, key=key)
    results = soup.results()
    if not soup.built:
        echo("[merge] the soup of these runs with this recipe is done: reused, nothing merged or evaluated")
        runs = [RunRecord(output / spec.folder) for spec in plan.runs]
        for line in explain_selection(results, run_names(runs)):
            echo(line)
    return results


def soup_key(plan: RecipePlan, output: Path) -> str:
    """What a soup is made from: every option of the recipe that can change it (method, BatchNorm policy, alpha,
    strategy, the output it names, ...; not the cache budget), the target as planned, and every run by its folder and the digest of its weights."""
    runs = [(spec.folder, weights_digest(RunRecord(output / spec.folder).model_folder)) for spec in plan.runs]
    target = {"reference": plan.target.reference, "fingerprint": plan.target.fingerprint}
    # the cache budget only says whether the same pixels come from the cache or from the files
    recipe = {**plan.config.to_dict(), "cache_budget_gb": None}
    return stable_hash({"recipe": recipe, "target": target, "runs": runs}, length=64)


def rank_by_validation(accuracies: Sequence[float]) -> list[int]:
    """Run indices best first by validation accuracy, the lower index on a tie: the one order behind the best
    run, the best recycled run and greedy's candidates."""
    return sorted(range(len(accuracies)), key=lambda i: (-accuracies[i], i))


@builds(SoupFolder)
def _write_soup(
    staging: Path, plan: RecipePlan, output: Path, target: Target, echo, destination: Path, tracking: Tracking
) -> None:
    """The soup folder, written into `staging`; `destination` is where it lands (anything foreign there is
    refused, and a soup's ingredient sources are relative to it)."""
    config, strategy = plan.config, plan.strategy
    check_replaceable_soup(destination)
    echo("[merge] averaging runs" if strategy.averages else "[merge] evaluating runs and their averages")
    runs = [RunRecord(output / spec.folder) for spec in plan.runs]
    run_predictions = [run.predictions() for run in runs]
    run_scores = [score_predictions(predictions, target) for predictions in run_predictions]
    ranking = rank_by_validation([scores["val_accuracy"] for scores in run_scores])
    best = ranking[0]
    passes, device = inference_batch(config.micro_batch), scoring_device()
    averager = RunAverager(
        [run.model_folder for run in runs],
        target,
        config.bn_policy,
        anchor=lambda: base_with_head(plan, output),
        inference_batch=passes,
        device=device,
    )
    inputs = MergeInputs(count=len(runs), ranking=ranking, score=averager.validation_accuracy, alpha=config.alpha)
    mixtures = {name: MERGE_METHODS[name].mix(inputs) for name in recycle_methods()}
    average_scores = {}
    if strategy.averages:
        mixture = mixtures[config.method]
        members = list(mixture.members)
        if mixture.anchored is None:
            folders = [runs[i].model_folder for i in members]
            record = soup_record(plan, output, folders, destination) if is_plain_mean(config, mixture) else None
            metadata = record and record.to_metadata()
            merge_model_folders(folders, staging, mixture.weights, metadata, mixture.tensor_rule)  # run 0's processor
        else:  # anchored at the base with the runs' probe head, in the model's key space
            write_state_folder(averager.state(mixture), runs[members[0]].model_folder, staging, target.id2label)
        soup_model = load_classifier(staging, target.id2label).to(device)
        if config.bn_policy == "reestimate":
            averager.reestimate(soup_model)
            soup_model.save_pretrained(staging)
            match_umask(staging.glob("*.safetensors"))
        average_scores[config.method] = score_predictions(predict_target(soup_model, target, passes), target)
        soup = Outcome(method=config.method, members=members, **average_scores[config.method])
    else:
        for file in runs[best].model_folder.iterdir():
            shutil.copyfile(file, staging / file.name)
        soup = Outcome(method="best-run", members=[best], **run_scores[best])
    for method, mixture in mixtures.items():
        if method not in average_scores:
            model = averager.model(mixture)
            average_scores[method] = score_predictions(predict_target(model, target, passes), target)
    ensemble = score_predictions(
        {k: ensemble_probabilities([p[k] for p in run_predictions]) for k in run_predictions[0]}, target
    )
    averages = {
        m: Average(members=list(mixtures[m].members), parameters=dict(mixtures[m].parameters), **average_scores[m])
        for m in mixtures
    }
    results = Results(
        recipe=config.to_dict(),
        target=target.reference,
        test_domain=target.test_domain,
        train_domains=list(target.train_domains),
        id2label={str(k): v for k, v in target.id2label.items()},
        ingredients=[
            IngredientRecord(i.source, i.revision, not i.is_local and is_hub_id(i.source)) for i in plan.ingredients
        ],
        runs=[
            RunResult(
                index=spec.index,
                init=metrics["init"],
                hparams=asdict(spec.hparams),
                best_step=metrics["best_step"],
                folder=spec.folder,
                recycled=spec.recycled,
                **scores,
            )
            for spec, metrics, scores in zip(plan.runs, (run.metrics for run in runs), run_scores)
        ],
        soup=soup,
        best_run=BestRun(index=best, **run_scores[best]),
        best_recycled_run=next(
            (BestRun(index=i, **run_scores[i]) for i in ranking if plan.runs[i].recycled), None
        ),  # the ranking's order: validation first, the lower index on a tie, as best_run
        averages=averages,
        greedy_order=ranking,
        ensemble=Scores(**ensemble),
        summary=summary_rows(
            strategy.averages,
            config.method,
            best,
            Scores(**run_scores[best]),
            averages,
            Scores(**ensemble),
            len(runs),
        ),
        bn_policy=config.bn_policy,
        diagnostics=averager.diagnose_against(best, ranking[1:], staging / DIAGNOSTICS_PLOT, run_names(runs)),
    )
    results.save(SoupFolder(staging).results_file)
    # beside the runs' curves, at their last step; named by the strategy, as a sweep's share seed and domain
    tracked_name = recipe_run(plan, f"result {strategy.name}")
    tracking.record(*tracked_name, values=tracked_scores(results), step=plan.runs[0].steps)
    config.save_yaml(staging / "recipe.yaml")
    names = run_names(runs)
    plot_scores(
        [
            *(
                ScorePoint(str(i), n, r.val_accuracy, r.test_accuracy, "run")
                for i, (n, r) in enumerate(zip(names, results.runs))
            ),
            *(
                ScorePoint(m, f"soup, {a.label(m)}", a.val_accuracy, a.test_accuracy, "soup")
                for m, a in averages.items()
            ),
            ScorePoint(
                "ensemble", "ensemble of the runs", ensemble["val_accuracy"], ensemble["test_accuracy"], "ensemble"
            ),
        ],
        target.test_domain,
        staging / SCORES_PLOT,
    )
    figures = {"figure": DIAGNOSTICS_PLOT if len(runs) > 1 else None, "scores_figure": SCORES_PLOT}
    build_card(results, **figures, license=card_license(config.license, plan.base.path)).save(staging / "README.md")
    for line in explain_selection(results, names):
        echo(line)


def tracked_scores(results: Results) -> dict[str, float]:
    """The result folder's model's validation and held-out accuracy, and under `validation/<name>` and
    `test/<name>` each merge method's average, the ensemble and the best run."""
    scores = {VAL_ACCURACY: results.soup.val_accuracy, TEST_ACCURACY: results.soup.test_accuracy}
    for name, score in {**results.averages, "ensemble": results.ensemble, "best-run": results.best_run}.items():
        scores |= {f"validation/{name}": score.val_accuracy, f"test/{name}": score.test_accuracy}
    return scores


def check_replaceable_soup(folder: Path) -> None:
    """Refuse a soup folder holding anything a soup is not made of: it is replaced whole, and the output
    folder may come from a downloaded recipe.yaml (`output: /home/you/thesis`)."""
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"{folder} exists and is not a soup folder; move it or choose another --output")
    foreign = foreign_entries(folder, SOUP_FOLDER_FILES) if folder.is_dir() else []
    if foreign:
        raise RecipeError(
            f"{folder} holds files a soup is not made of ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "the soup is replaced whole - move them or choose another --output"
        )


def explain_selection(results: Results, names: Sequence[str]) -> list[str]:
    """What greedy kept and left out, and the barriers between the best run and the others: the lines that
    tell a user which run did not average with the rest, and why."""
    greedy = results.averages.get("greedy")
    lines = []
    if greedy is not None and len(greedy.members) < len(names):
        left_out = [names[i] for i in results.greedy_order if i not in greedy.members]
        lines.append(
            f"[merge] greedy kept {len(greedy.members)} of {len(names)} runs; left out (they lowered validation): "
            + ", ".join(left_out)
        )
    if results.diagnostics:
        best = results.best_run.index
        worst = sorted(results.diagnostics, key=lambda pair: -pair.barrier)[:3]
        lines.append(
            f"[diagnose] barrier on the weight path from the best run ({names[best]}): median "
            f"{100 * statistics.median(p.barrier for p in results.diagnostics):.1f} points; largest: "
            + ", ".join(f"{names[p.runs[1]]} {100 * p.barrier:.1f}" for p in worst)
        )
    return lines


def summary_rows(
    averaged: bool, method: str, best: int, best_scores: Scores, averages: dict[str, Average], ensemble: Scores, n: int
) -> list[SummaryRow]:
    """The printed table and the card's: the best run, each merge method's average, the ensemble."""

    def row(name: str, scores: Scores) -> SummaryRow:
        return SummaryRow(name, scores.val_accuracy, scores.test_accuracy)

    this_model = ", this model"
    return [
        row(f"best single run (#{best}, by validation){'' if averaged else this_model}", best_scores),
        *(
            row(
                f"soup, {average.label(name)} ({len(average.members)} runs)"
                + (this_model if averaged and name == method else ""),
                average,
            )
            for name, average in averages.items()
        ),
        row(f"ensemble of the {n} runs (reference)", ensemble),
    ]


class RunAverager:
    """Weight averages of any subset of the runs, with the soup's BatchNorm policy applied, and diagnostics.

    Every average is the merge engine's (merge_engine.merge_sources) over the runs' weight files, read tensor by
    tensor, so memory is the model being evaluated, the method's per-tensor state and one tensor per run
    (N for a method that compares the runs), whatever the number of runs. Greedy's candidates are averaged
    from scratch: re-weighting the accepted runs' running sum by k/(k+1) would round differently.
    """

    def __init__(
        self,
        model_folders: Sequence[Path],
        target: Target,
        bn_policy: str,
        anchor: Callable[[], dict[str, torch.Tensor]] | None = None,
        inference_batch: int = INFERENCE_BATCH,
        device: torch.device | str = "cpu",
    ):
        """`device`: where the averages are scored (`recycle` passes the device its runs trained on)."""
        self.model_folders = list(model_folders)
        self.inference_batch = inference_batch
        self.target = target
        self.bn_policy = bn_policy
        self._anchor = anchor  # the base's state, built when a method anchored at it first needs it
        self._anchor_state: dict[str, torch.Tensor] | None = None
        model = load_classifier(self.model_folders[0], target.id2label)  # compared with its file on the host
        self._names = list(model.state_dict())
        self._files_are_states = self._loads_as_stored(self.model_folders[0], model)
        self._model = model.to(device)
        self._converted: Path | None = None  # runs saved in the model's key space, where files are not

    def _stored_state(self, folder: Path) -> dict[str, torch.Tensor] | None:
        """The folder's weights file if it has the model's tensor names (None otherwise)."""
        if not (folder / WEIGHTS_NAME).is_file():
            return None
        stored = load_file(folder / WEIGHTS_NAME)
        return stored if stored.keys() == set(self._names) else None

    def _loads_as_stored(self, folder: Path, model) -> bool:
        """Whether loading `folder` left its stored tensors as they are (names, dtypes, values): then runs are
        read straight from their files, about 10x faster than building a model per run. Not so where
        transformers renames or converts tensors on load (ViT in transformers 5)."""
        stored = self._stored_state(folder)
        return stored is not None and all(
            stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor)
            for name, tensor in model.state_dict().items()
        )

    def run_state(self, index: int) -> dict[str, torch.Tensor]:
        """Run `index`'s state dict in the model's own key space, exactly as `load_classifier` gives it."""
        folder = self.model_folders[index]
        stored = self._stored_state(folder) if self._files_are_states else None
        return stored if stored is not None else load_classifier(folder, self.target.id2label).state_dict()

    def _run_file(self, index: int) -> Path:
        """Run `index`'s weights in the model's key space: its own file, or (where loading converts tensors)
        the loaded state saved once to a scratch file that lives as long as this averager."""
        if self._files_are_states:
            return self.model_folders[index] / WEIGHTS_NAME
        if self._converted is None:
            self._converted = Path(tempfile.mkdtemp(prefix="ratatouille-runs-"))
            weakref.finalize(self, shutil.rmtree, self._converted, True)
        converted = self._converted / f"{index}.safetensors"
        if not converted.is_file():
            state = self.run_state(index)
            save_file({name: tensor.contiguous().clone() for name, tensor in state.items()}, converted)
        return converted

    def state(self, mixture: Mixture) -> dict[str, torch.Tensor]:
        """The mixture's weights: its method's rule over the members, run by the merge engine."""
        rule = mixture.tensor_rule
        runs = [
            SafetensorsSource([path], [read_safetensors_header(path)]) for path in map(self._run_file, mixture.members)
        ]
        base = None
        if rule.needs_base:
            if self._anchor_state is None:
                self._anchor_state = self._anchor()
            base = StateSource(self._anchor_state, "the base")
        try:
            return collect(rule, runs, self._names, mixture.weights, base)
        finally:
            for run in runs:
                run.close()

    def model(self, mixture: Mixture):
        self._model.load_state_dict(self.state(mixture))
        if self.bn_policy == "reestimate":
            self.reestimate(self._model)
        return self._model

    def reestimate(self, model) -> None:
        reestimate_batchnorm(model, self.target.data.pooled_train, self.target.data.normalize)

    def validation_accuracy(self, subset: list[int]) -> float:
        return validation_accuracy(
            self.model(Mixture(tuple(subset))),
            self.target.data.pooled_val,
            self.target.data.normalize,
            batch_size=self.inference_batch,
        )

    def diagnose_against(
        self, reference: int, others: list[int], plot: Path, names: Sequence[str] | None = None
    ) -> list[PairRecord]:
        """Diversity and averageability of `reference` with each other run (training-domain validation);
        the interpolation paths are drawn to `plot`. Raw weights: no BatchNorm policy on the paths. Holds the
        reference and one other run at a time."""
        if not others:
            return []
        validation = self.target.data.pooled_val
        reference_state = self.run_state(reference)

        def load(index: int) -> dict[str, torch.Tensor]:
            return reference_state if index == reference else self.run_state(index)

        def predict(state) -> torch.Tensor:
            self._model.load_state_dict(state)
            return predict_logits(
                self._model, validation, self.target.data.normalize, batch_size=self.inference_batch
            ).argmax(dim=1)

        names = list(names or (f"run {i}" for i in range(len(self.model_folders))))
        pairs = [(reference, i) for i in others]
        diagnosis = diagnose_loaded(names, load, predict, validation.labels, pairs=pairs)
        plot_paths(diagnosis, plot)
        return [
            PairRecord([pair.a, pair.b], pair.ratio_error, pair.barrier, list(pair.path_accuracies))
            for pair in diagnosis.pairs
        ]


def validation_inputs(model_folders: Sequence[Path], options, token=None) -> MergeInputs:
    """What a merge method that needs validation gets for existing checkpoints of the target's labels (the
    `merge --method greedy` path): candidates ranked by their own training-domain validation accuracy, as in
    `recycle`, on the split the target `options` (seed, holdout fraction, columns) define."""
    base = resolve_model(str(model_folders[0]), token=token)
    target = prepare_target(options, base, token)
    # on the CPU: greedy's choices decide the bytes, which `merge --config` replays on any machine
    averager = RunAverager(list(model_folders), target, options.bn_policy)
    ranking = rank_by_validation([averager.validation_accuracy([i]) for i in range(len(model_folders))])
    return MergeInputs(count=len(model_folders), ranking=ranking, score=averager.validation_accuracy)


def base_with_head(plan: RecipePlan, output: Path) -> dict[str, torch.Tensor]:
    """The point every run started from before its own init: the base's featurizer with the shared
    linear-probe head. What Model Stock and interpolation anchor at."""
    model = load_classifier(plan.base.path, plan.target.id2label)
    head = load_file(ProbeRecord(output / plan.lp.folder).head_file)
    set_head(model, head["weight"], head["bias"])
    return model.state_dict()


def write_state_folder(state: dict[str, torch.Tensor], template: Path, destination: Path, id2label) -> None:
    """A model folder holding `state`, with the config and image processor of the model folder `template`."""
    model = load_classifier(template, id2label)
    model.load_state_dict(state)
    model.save_pretrained(destination)
    match_umask(destination.glob("*.safetensors"))
    for name in COPIED_CONFIGS:
        if (template / name).is_file() and not (destination / name).is_file():
            shutil.copyfile(template / name, destination / name)


def is_plain_mean(config, mixture: Mixture) -> bool:
    """Whether the soup is the uniform mean of its members as stored (uniform, greedy's selection): only such
    a soup can be updated exactly."""
    return mixture.weights is None and mixture.anchored is None and config.bn_policy == "average"


def soup_record(plan: RecipePlan, output: Path, model_folders: Sequence[Path], soup: Path) -> SoupRecord:
    """The soup's ingredients (content hashes, in merge order) and the fingerprint of the recipe they share."""
    fingerprint = plan_fingerprint(plan, output)
    # sources relative to the soup folder: the same runs give the same soup bytes wherever the output lives
    return SoupRecord(
        tuple(SoupIngredient(file_sha256(f / WEIGHTS_NAME), relative_source(f, soup)) for f in model_folders),
        fingerprint,
    )


def run_names(runs: Sequence[RunRecord]) -> list[str]:
    """The plan's runs (in plan order) as every line and figure names them."""
    return [run_name(i, run.metrics["init"]) for i, run in enumerate(runs)]
