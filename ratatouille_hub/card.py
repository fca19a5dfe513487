"""The soup's model card, rendered from `model_card_template.md` with huggingface_hub's card tools.

Front matter carries the lineage the Hub indexes (`base_model` list + `base_model_relation: merge`)
and the held-out-domain accuracy as `model-index`. Text that comes from other people's repos is
escaped before it reaches the card.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .fetch import is_hub_id, split_revision
from .results import Results
from .strategies import STRATEGIES

TEMPLATE_NAME = "model_card_template.md"


def template_path() -> Path:
    """The template ships inside the wheel; in a source checkout it sits at the repository root."""
    packaged = resources.files("ratatouille_hub") / TEMPLATE_NAME
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / TEMPLATE_NAME


def plain_text(text: object) -> str:
    """One line of printable text for a front-matter value: line breaks and control characters become spaces."""
    return "".join(" " if unicodedata.category(c)[0] in "CZ" and c != " " else c for c in str(text))


def markdown_cell(text: object) -> str:
    """Text safe inside a markdown table cell: no pipes, newlines, HTML, backticks or link brackets."""
    cleaned = re.sub(r"[\r\n\t]+", " ", str(text))
    for character, escaped in (("|", "\\|"), ("`", "'"), ("<", "&lt;"), (">", "&gt;"), ("[", "\\["), ("]", "\\]")):
        cleaned = cleaned.replace(character, escaped)
    return cleaned


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def pinned(source: str, results: Results) -> str:
    """`source` at the revision the recipe read it, for a Hub ingredient (a local folder has none)."""
    revision = next((i.revision for i in results.ingredients if i.source == source and i.is_hub), None)
    return f"{source}@{revision}" if revision else source


UNPUBLISHED_REPO_ID = "path/to/soup"  # the usage snippet's model before the card knows its repo
SOUP_NAME, MERGE_NAME = "ratatouille-soup", "merged-model"  # the name of a card written before its repo is known


def card_for_repo(text: str, repo_id: str) -> str:
    """A card as pushed to `repo_id`: the repo id instead of the name ratatouille-hub gives a card before anyone
    says where it goes (its title, its model-index name, the usage snippet's model). Any other title or name, one
    its author chose, is left as it is."""
    card = ModelCard(text)
    if card.data.eval_results and card.data.model_name in (SOUP_NAME, MERGE_NAME):
        card.data.model_name = repo_id
        text = card.content  # the metadata written again only when it changed
    metadata, body = text[: len(text) - len(card.text)], card.text
    title = re.search(r"^# (.*)$", body, flags=re.M)
    if title and title.group(1) in (SOUP_NAME, MERGE_NAME):
        body = f"{body[: title.start()]}# {markdown_cell(repo_id)}{body[title.end() :]}"
    return metadata + body.replace(f'"{UNPUBLISHED_REPO_ID}"', f'"{repo_id}"')


def declared_license(model_folder: Path | None) -> dict[str, str]:
    """The license fields the card in `model_folder` declares (`license`, and `license_name` and an https
    `license_link` for `other`), each only when it is a well-formed value: a downloaded card is not trusted."""
    from huggingface_hub.repocard import metadata_load

    from .config import LICENSE_ID

    card = None if model_folder is None else Path(model_folder) / "README.md"
    try:
        metadata = metadata_load(card) if card is not None and card.is_file() else None
    except (ValueError, UnicodeDecodeError, yaml.YAMLError):
        metadata = None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("license"), str):
        return {}
    declared = {"license": metadata["license"]}
    if not LICENSE_ID.fullmatch(declared["license"]):
        return {}
    name, link = metadata.get("license_name"), metadata.get("license_link")
    if declared["license"] == "other" and isinstance(name, str) and LICENSE_ID.fullmatch(name):
        declared["license_name"] = name
    if declared["license"] == "other" and isinstance(link, str) and re.fullmatch(r"https://[^\s<>()\[\]`]+", link):
        declared["license_link"] = link
    return declared


def card_license(given: str | None, base_folder: Path | None) -> dict[str, str]:
    """What a card declares as its license: the one given, else the base's when its card declares one, else
    nothing (a license is never invented)."""
    return {"license": given} if given else declared_license(base_folder)


def lineage_ids(results: Results) -> list[str]:
    """The Hub ids of a recycled model's parents, in the plan's order (base first); a local base copied from
    the Hub counts as the Hub id `--base-model` names."""
    base, base_model = split_revision(results.recipe["base"])[0], results.recipe.get("base_model")
    ids = []
    for ingredient in results.ingredients:
        if base_model and ingredient.source == base:
            ids.append(base_model)
        elif ingredient.is_hub:
            ids.append(ingredient.source)
    return list(dict.fromkeys(ids))


def _dataset_text(reference: str) -> str:
    """The target as the card's text names it: a Hub dataset with the revision the runs read, or a local one."""
    dataset, revision = split_revision(reference)
    if not is_hub_id(dataset):
        return f"the local dataset **{markdown_cell(Path(dataset).name)}**"
    return f"**{markdown_cell(dataset)}**" + (f" at revision `{markdown_cell(revision)}`" if revision else "")


def _eval_results(dataset: str, revision: str | None, **result) -> list[EvalResult] | None:
    """The model-index entry of a score on `dataset`. The model-index spec names a dataset by its Hub id, so a
    score on a local dataset has none (the card's text reports it, naming the dataset as local)."""
    if not is_hub_id(dataset):
        return None
    return [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_revision=plain_text(revision) if revision else None,
            metric_type="accuracy",
            **result,
        )
    ]


def build_card(
    results: Results,
    *,
    repo_id: str | None = None,
    figure: str | None = None,
    scores_figure: str | None = None,
    license: dict[str, str] | None = None,
) -> ModelCard:
    """Render the card for the model described by `results`: a soup, or for the erm and fusing baselines
    the best run (lineage `finetune` when the base is its only parent); `license`: card_license's fields."""
    recipe = results.recipe
    hub_ids = lineage_ids(results)
    target, target_revision = split_revision(results.target)  # the target at the revision the runs trained on
    test_domain = results.test_domain
    soup = results.soup
    averaged = results.is_average
    strategy = STRATEGIES[recipe["strategy"]]
    model_name = repo_id or SOUP_NAME
    scores = _eval_results(
        target,
        target_revision,
        dataset_name=plain_text(f"{Path(target).name} (held-out domain {test_domain})"),
        dataset_split=plain_text(test_domain),
        metric_name=plain_text(f"held-out domain accuracy ({test_domain})"),
        metric_value=round(soup.test_accuracy, 4),
    )
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation=("merge" if len(hub_ids) > 1 or averaged else "finetune") if hub_ids else None,
        **(license or {}),
        library_name="transformers",
        pipeline_tag="image-classification",
        datasets=[target] if is_hub_id(target) else None,
        tags=[
            "model-ratatouille",
            *(("weight-averaging", "merge") if averaged else ()),
            "domain-generalization",
            "ratatouille-hub",
        ],
        model_name=model_name if scores else None,  # it is the model-index's name: without one, no key of its own
        eval_results=scores,
    )
    base = pinned(recipe["base"], results)
    base_text = f"`{markdown_cell(base)}`" + (
        f" (a local copy of `{markdown_cell(recipe['base_model'])}`)"
        if recipe.get("base_model") and not is_hub_id(split_revision(base)[0])
        else ""
    )
    summary_rows = [
        {"name": markdown_cell(row.name), "val": _pct(row.val_accuracy), "test": _pct(row.test_accuracy)}
        for row in results.summary
    ]
    runs = [
        {
            "index": run.index,
            "init": markdown_cell(run.init),
            "lr": run.hparams["lr"],
            "weight_decay": run.hparams["weight_decay"],
            "dropout": run.hparams["dropout"],
            "step": run.best_step,
            "val": _pct(run.val_accuracy),
            "test": _pct(run.test_accuracy),
            "selected": "yes" if run.index in soup.members else "no",
        }
        for run in results.runs
    ]
    card = ModelCard.from_template(
        data,
        template_path=str(template_path()),
        model_name=markdown_cell(model_name),
        repo_id=repo_id or UNPUBLISHED_REPO_ID,
        base_model=base_text,
        dataset=_dataset_text(results.target),
        local_target=not is_hub_id(target),
        train_domains=", ".join(markdown_cell(d) for d in results.train_domains),
        test_domain=markdown_cell(test_domain),
        n_runs=len(results.runs),
        n_selected=len(soup.members),
        method=results.averages[soup.method].label(soup.method) if soup.method in results.averages else soup.method,
        strategy_sentence=strategy.card_sentence,
        baseline_name=strategy.card_title,
        averaged=averaged,
        summary_rows=summary_rows,
        runs=runs,
        lp_steps=recipe["lp_steps"],
        lp_lr=recipe["lp_lr"],
        warmup_steps=recipe["warmup_steps"],
        steps=recipe["steps"],
        batch_size=recipe["batch_size"],
        bn_policy=recipe["bn_policy"],
        figure=figure,
        scores_figure=scores_figure,
    )
    if card.data.to_dict() != data.to_dict():  # the front matter must read back exactly as we wrote it
        raise ValueError("the model card's front matter does not read back as written: refusing to save it")
    return card


LINEAGE_KEY = "ratatouille.lineage"  # a grown soup's weights metadata: its Lineage, carried across updates


@dataclass(frozen=True)
class Lineage:
    """Where a soup comes from beyond its runs: the recipe's base and target at the revisions the runs trained
    on, and the Hub checkpoints the runs started from. Cards name them (`base_model`, `datasets`); a soup
    assembled or updated carries them in its weights' metadata, so every later update keeps them."""

    base: str  # id@revision, or a local folder
    target: str  # id@revision, or a local dataset
    parents: tuple[str, ...] = ()  # Hub ids the runs started from: the base and the recycled fine-tunes

    @classmethod
    def of_recipe(cls, recipe: dict, inits: Sequence[str] = ()) -> Lineage:
        """From a contributed run's checked record: its recipe, and the inits of the runs."""
        return cls(recipe["base"], recipe["target"], _hub_ids([recipe["base"], *inits]))

    @classmethod
    def of_results(cls, results: Results) -> Lineage:
        """From a recycled soup's results: its base, its target and its Hub ingredients, each at its revision."""
        return cls(pinned(results.recipe["base"], results), results.target, tuple(lineage_ids(results)))

    def to_metadata(self) -> dict[str, str]:
        return {LINEAGE_KEY: json.dumps({"base": self.base, "target": self.target, "parents": list(self.parents)})}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Lineage | None:
        """The lineage a soup's weights carry (None when they carry none, or anything but one)."""
        try:
            plain = json.loads(metadata[LINEAGE_KEY])
            lineage = cls(plain["base"], plain["target"], tuple(plain["parents"]))
        except (KeyError, ValueError, TypeError, RecursionError):
            return None
        texts = (lineage.base, lineage.target, *lineage.parents)
        if not all(isinstance(t, str) for t in texts) or list(lineage.parents) != list(_hub_ids(lineage.parents)):
            return None
        return lineage

    def with_inits(self, inits: Sequence[str]) -> Lineage:
        return Lineage(self.base, self.target, _hub_ids([*self.parents, *inits]))


def _hub_ids(sources) -> tuple[str, ...]:
    """The Hub model ids among `sources` (revisions dropped), each once, in order."""
    ids = (source.split("@")[0] for source in sources)
    return tuple(dict.fromkeys(i for i in ids if is_hub_id(i)))


RUN_TAG = "ratatouille-run"  # every contributed run carries it; with the base's tag, assemble --from-hub finds them


def base_tag(base: str) -> str:
    """The tag naming the recipe's base (without revision): runs of every init of one base share it."""
    return f"ratatouille-base:{base.split('@')[0]}"


def run_card(provenance: dict, title: str) -> ModelCard:
    """A contributed run's card: its init as `base_model` (finetune), its validation accuracy, its recipe.
    Its target, when a Hub dataset, is listed under `datasets`: discovery then refuses the run as a fine-tune
    to recycle for that target (it was trained on the target's domains)."""
    recipe, run = provenance["recipe"], provenance["run"]
    init = run["init"].split("@")[0]
    target = recipe["target"].split("@")[0]
    data = ModelCardData(
        base_model=init if is_hub_id(init) else None,
        base_model_relation="finetune" if is_hub_id(init) else None,
        datasets=[target] if is_hub_id(target) else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=[
            "model-ratatouille",
            RUN_TAG,
            plain_text(base_tag(recipe["base"])),
            plain_text(f"ratatouille-recipe:{provenance['fingerprint']}"),
        ],
    )
    rows = "\n".join(f"| {markdown_cell(key)} | {markdown_cell(json.dumps(value))} |" for key, value in recipe.items())
    text = f"""# {markdown_cell(title)}

One fine-tune of a [Model Ratatouille](https://arxiv.org/abs/2212.10445) recipe, contributed with
ratatouille-hub so that anyone can average it with the recipe's other runs without the data:
`ratatouille-hub assemble SOUP --from-hub <this repo>`.

- init: `{markdown_cell(run["init"])}`; hyperparameters {markdown_cell(json.dumps(run["hparams"]))}
- training-domain validation accuracy: {_pct(run["val_accuracy"])}% (best step {run["best_step"]})
- recipe fingerprint: `{markdown_cell(provenance["fingerprint"])}`; runs with another fingerprint do not average with it

| recipe | value |
|---|---|
{rows}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def grown_soup_card(
    record,
    validation: float | None = None,
    dataset: str | None = None,
    lineage: Lineage | None = None,
    license: dict[str, str] | None = None,
) -> ModelCard:
    """The card of a soup assembled from contributed runs or updated: its lineage (base, target, the checkpoints
    its runs started from), its ingredients and, when a target was given, its training-domain validation
    accuracy (no held-out number: that needs the whole recipe); `license`: card_license's fields."""
    hub_ids = list(_hub_ids([*(lineage.parents if lineage else ()), *(i.source for i in record.ingredients)]))
    target_id, _, target_revision = (lineage.target if lineage else "").partition("@")
    scored_on = dataset.split("@")[0] if dataset else None
    scored_reference = lineage.target if lineage and scored_on == target_id else dataset or ""
    scores = (
        None
        if validation is None or scored_on is None
        else _eval_results(
            scored_on,
            target_revision if scored_on == target_id else None,
            dataset_name=plain_text(f"{Path(scored_on).name} (training-domain validation)"),
            metric_name="training-domain validation accuracy",
            metric_value=round(validation, 4),
        )
    )
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        **(license or {}),
        datasets=[target_id] if is_hub_id(target_id) else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["model-ratatouille", "weight-averaging", "merge", "ratatouille-hub"],
        eval_results=scores,
        model_name=SOUP_NAME if scores else None,
    )
    rows = "\n".join(
        f"| {k} | `{markdown_cell(i.source)}` | `{markdown_cell(i.sha256[:16])}` |"
        for k, i in enumerate(record.ingredients)
    )
    accuracy = (
        ""
        if validation is None
        else f"\nTraining-domain validation accuracy on {_dataset_text(scored_reference)}: {_pct(validation)}%.\n"
    )
    recipe = (
        ""
        if lineage is None
        else f"\nIts runs fine-tuned `{markdown_cell(lineage.base)}` on `{markdown_cell(lineage.target)}`.\n"
    )
    fingerprint = markdown_cell(record.fingerprint or "unknown")
    text = f"""# {SOUP_NAME}

A uniform **Model Ratatouille** soup ([Ramé et al., ICML 2023](https://arxiv.org/abs/2212.10445)) of
{len(record.ingredients)} runs of one recipe (fingerprint `{fingerprint}`), grown with
ratatouille-hub: `ratatouille-hub update SOUP --add RUN` adds a run exactly, without merging again.
{recipe}{accuracy}
| ingredient | source | sha256 |
|---|---|---|
{rows}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def merge_card(result, repo_id: str | None = None) -> ModelCard:
    """A merged model's card (`result`: a merging.MergeResult): its parents as `base_model` (the Hub members and
    the Hub base, `base_model_relation: merge`), the method with its parameters, every member at its revision,
    greedy's scores and, when a target was given, the merged model's validation accuracy (`model-index` for a
    Hub target); its license is --license, else the base's."""
    sources = [m.ingredient.source for m in result.members] + ([result.base.ingredient.source] if result.base else [])
    hub_ids = list(_hub_ids(sources))
    target, _, target_revision = (result.options.target or "").partition("@")
    base_folder = result.base.ingredient.path if result.base else None
    scores = (
        None
        if result.validation is None
        else _eval_results(
            target,
            target_revision,
            dataset_name=plain_text(f"{Path(target).name} (training-domain validation)"),
            metric_name="training-domain validation accuracy",
            metric_value=round(result.validation, 4),
        )
    )
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        **card_license(result.options.license, base_folder),
        datasets=[target] if is_hub_id(target) else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["merge", "weight-averaging", "ratatouille-hub", plain_text(f"merge-method:{result.method}")],
        model_name=(repo_id or MERGE_NAME) if scores else None,
        eval_results=scores,
    )
    parameters = ", ".join(f"{markdown_cell(k)} = {markdown_cell(json.dumps(v))}" for k, v in result.parameters)
    scores = {id(t.candidate): f"{_pct(t.validation)}%" for t in result.trials}  # greedy's, per candidate

    def row(candidate) -> str:
        status = "merged" if candidate in result.members else "left out"
        cells = [markdown_cell(candidate.name), f"`{markdown_cell(candidate.ingredient.revision)}`", status]
        return "| " + " | ".join(cells + ([scores.get(id(candidate), "-")] if scores else [])) + " |"

    header = "| input | revision | in the merge |" + (" validation with it added |" if scores else "")
    rows = "\n".join([header, "|---" * header.count(" |") + "|", *(row(c) for c in result.candidates)])
    base = "" if result.base is None else f"\nBase: `{markdown_cell(result.base.ingredient.reference)}`.\n"
    accuracy = (
        ""
        if result.validation is None
        else f"\nTraining-domain validation accuracy on {_dataset_text(result.options.target)}: "
        f"{_pct(result.validation)}%.\n"
    )
    text = f"""# {markdown_cell(repo_id or MERGE_NAME)}

A merge of {len(result.members)} of {len(result.candidates)} checkpoints made with ratatouille-hub, method
**{markdown_cell(result.method)}**{f" ({parameters})" if parameters else ""}. Every Hub input is pinned at the
commit it was read at; `ratatouille-hub merge --config merge.yaml` (beside this card) merges the same bytes again.
{base}{accuracy}
{rows}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
