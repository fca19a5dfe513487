"""The soup's model card, rendered from `model_card_template.md` with huggingface_hub's card tools.

Front matter carries the lineage the Hub indexes (`base_model` list + `base_model_relation: merge`)
and the held-out-domain accuracy as `model-index`. Text that comes from other people's repos is
escaped before it reaches the card.
"""

from __future__ import annotations

import re
import unicodedata
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .fetch import is_hub_id
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
    """Text safe inside a markdown table cell: no pipes, newlines, HTML or backticks."""
    cleaned = re.sub(r"[\r\n\t]+", " ", str(text))
    return cleaned.replace("|", "\\|").replace("`", "'").replace("<", "&lt;").replace(">", "&gt;")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def build_card(results: Results, *, repo_id: str | None = None, figure: str | None = None) -> ModelCard:
    """Render the card for the model described by `results`: a soup, or for the erm and fusing baselines
    the best run (lineage `finetune` when the base is its only parent)."""
    recipe = results.recipe
    hub_ids = [i.source for i in results.ingredients if i.is_hub]
    target = recipe["target"]
    test_domain = results.test_domain
    soup = results.soup
    averaged = results.is_average
    strategy = STRATEGIES[recipe["strategy"]]
    model_name = repo_id or "ratatouille-soup"
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation=("merge" if len(hub_ids) > 1 or averaged else "finetune") if hub_ids else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        datasets=[target] if is_hub_id(target) else None,
        tags=[
            "model-ratatouille",
            *(("weight-averaging", "merge") if averaged else ()),
            "domain-generalization",
            "ratatouille-hub",
        ],
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type="image-classification",
                dataset_type=target if is_hub_id(target) else "local",
                dataset_name=plain_text(f"{Path(target).name} (held-out domain {test_domain})"),
                dataset_split=plain_text(test_domain),
                metric_type="accuracy",
                metric_name=plain_text(f"held-out domain accuracy ({test_domain})"),
                metric_value=round(soup.test_accuracy, 4),
            )
        ],
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
        repo_id=repo_id or "path/to/soup",
        base_model=markdown_cell(recipe["base"]),
        dataset=markdown_cell(target),
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
    )
    if card.data.to_dict() != data.to_dict():  # the front matter must read back exactly as we wrote it
        raise ValueError("the model card's front matter does not read back as written: refusing to save it")
    return card
