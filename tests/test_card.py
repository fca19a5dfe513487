"""The soup's model card: Hub lineage and model-index in the front matter, escaped tables in the body."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from huggingface_hub import ModelCard

from ratatouille_hub.card import build_card, card_for_repo, card_license, markdown_cell
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.localhub.store import derive_tags, parse_front_matter
from ratatouille_hub.results import Results
from ratatouille_hub.testing import make_results

HUB_INGREDIENTS = ["org/resnet-base", "alice/resnet-ft-stripes", "bob/resnet-ft-dots"]


def results_dict(
    *,
    base="org/resnet-base",
    target="org/pacs",
    ingredients=None,
    run_inits=None,
    summary_names=None,
    members=(0, 2),
    test_accuracy=0.81234,
    strategy="ratatouille",
    method="greedy",
) -> Results:
    """The results record of a 3-run soup, built through the record as assembly builds it."""
    if ingredients is None:
        ingredients = [(s, f"{i:040x}", True) for i, s in enumerate(HUB_INGREDIENTS)]
        ingredients.append(("/data/local-ft", "sha256:0123456789abcdef", False))
    run_inits = run_inits or [f"{s}@{i:040x}" for i, s in enumerate(HUB_INGREDIENTS)]
    summary_names = summary_names or [
        "best single run (#0, by validation)",
        "soup, greedy (2 runs) <- this model",
        "soup, uniform (3 runs)",
        "ensemble of the 3 runs (reference)",
    ]
    config = RecipeConfig(base=base, target=target, test_domain="sketch", runs=3, method="greedy", strategy=strategy)
    return make_results(
        config,
        ingredients=ingredients,
        run_inits=run_inits,
        members=members,
        method=method,
        soup=(0.91, test_accuracy),
        summary_names=summary_names,
    )


def saved_card(tmp_path, results: Results) -> ModelCard:
    path = tmp_path / "README.md"
    build_card(results).save(path)
    return ModelCard.load(path)


def test_front_matter_has_hub_lineage_and_the_held_out_accuracy(tmp_path):
    card = saved_card(tmp_path, results_dict())
    data = card.data
    assert data.base_model == HUB_INGREDIENTS  # Hub ingredients only, base first
    assert data.base_model_relation == "merge"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert data.datasets == ["org/pacs"]
    (result,) = data.eval_results
    assert result.metric_type == "accuracy" and result.metric_value == 0.8123  # rounded to 4 places
    assert result.task_type == "image-classification"
    assert (result.dataset_type, result.dataset_split) == ("org/pacs", "sketch")

    front = yaml.safe_load(card.content.split("---")[1])
    (entry,) = front["model-index"]
    assert entry["results"][0]["metrics"][0]["value"] == 0.8123
    assert entry["results"][0]["dataset"]["split"] == "sketch"


def test_the_hub_derives_merge_lineage_tags_from_the_card(tmp_path):
    card = saved_card(tmp_path, results_dict())
    tags = derive_tags("model", parse_front_matter(card.content))
    for base in HUB_INGREDIENTS:
        assert f"base_model:merge:{base}" in tags and f"base_model:{base}" in tags
    assert not any(tag.startswith("base_model:finetune:") for tag in tags)
    assert "dataset:org/pacs" in tags


def test_local_ingredients_and_target_are_not_claimed_as_hub_lineage(tmp_path):
    local = [(str(tmp_path / "base"), "sha256:00", False)]
    (tmp_path / "target").mkdir()
    card = saved_card(
        tmp_path,
        results_dict(
            base=str(tmp_path / "base"),
            target=str(tmp_path / "target"),
            ingredients=local,
            run_inits=[f"{tmp_path}/base@sha256:00"] * 3,
        ),
    )
    front = parse_front_matter(card.content)
    assert "base_model" not in front and "base_model_relation" not in front and "datasets" not in front
    # the model-index spec names a dataset by its Hub id: a local target's score is in the text, said to be local
    assert "model-index" not in front
    assert "on the local dataset **target** (art_painting, cartoon, photo)" in card.text
    assert "The target is a local dataset, so these scores are in this text only" in card.text
    assert "| soup, greedy (2 runs) &lt;- this model | 90.0 | 80.0 |" in card.text


def test_the_target_is_named_at_the_revision_the_runs_read(tmp_path):
    """recipe.yaml may name the target unpinned: the card takes the revision from what the runs read."""
    results = dataclasses.replace(results_dict(), target=f"org/pacs@{'e' * 40}")
    card = saved_card(tmp_path, results)
    assert card.data.eval_results[0].dataset_revision == "e" * 40
    assert f"on **org/pacs** at revision `{'e' * 40}` (" in card.text


def test_a_local_base_copied_from_the_hub_is_named_by_its_hub_id(tmp_path):
    base = tmp_path / "resnet-base-copy"
    base.mkdir()
    ingredients = [(str(base), "sha256:0123456789abcdef", False), ("alice/resnet-ft-stripes", "1" * 40, True)]
    results = results_dict(base=str(base), ingredients=ingredients, run_inits=[f"{base}@sha256:0123456789abcdef"] * 3)
    named = dataclasses.replace(results, recipe={**results.recipe, "base_model": "org/resnet-base"})
    card = saved_card(tmp_path, named)
    assert card.data.base_model == ["org/resnet-base", "alice/resnet-ft-stripes"]  # the base first, as always
    assert "base_model:merge:org/resnet-base" in derive_tags("model", parse_front_matter(card.content))
    assert f"`{base}` (a local copy of `org/resnet-base`) on **org/pacs**" in card.text
    assert saved_card(tmp_path, results).data.base_model == ["alice/resnet-ft-stripes"]  # without it: absent


@pytest.mark.parametrize(
    ("given", "base_card", "declared"),
    [
        ("mit", "---\nlicense: apache-2.0\n---\n", {"license": "mit"}),  # --license wins
        (None, "---\nlicense: apache-2.0\n---\n", {"license": "apache-2.0"}),  # else the base's
        (None, "# no metadata\n", {}),  # else none: never invented
        (None, None, {}),  # a base without a card
        (None, "---\nlicense: [apache-2.0]\n---\n", {}),  # not one license id
        (None, "---\nlicense: 'MIT\n<script>'\n---\n", {}),  # not a license id at all
        (None, "---\nlicense: [unclosed\n---\n", {}),  # not YAML
        (
            None,
            "---\nlicense: other\nlicense_name: acme-1.0\nlicense_link: https://acme.example/license\n---\n",
            {"license": "other", "license_name": "acme-1.0", "license_link": "https://acme.example/license"},
        ),
        (
            None,
            "---\nlicense: other\nlicense_name: acme-1.0\nlicense_link: LICENSE\n---\n",
            {"license": "other", "license_name": "acme-1.0"},
        ),
    ],
)
def test_the_license_is_the_given_one_else_the_bases_else_none(tmp_path, given, base_card, declared):
    base = tmp_path / "base"
    base.mkdir()
    if base_card is not None:
        (base / "README.md").write_text(base_card)
    assert card_license(given, base) == declared
    build_card(results_dict(), license=card_license(given, base)).save(tmp_path / "README.md")
    front = parse_front_matter((tmp_path / "README.md").read_text())
    assert {key: front[key] for key in ("license", "license_name", "license_link") if key in front} == declared


def test_the_card_pushed_to_a_repo_takes_its_id_as_title_and_model_index_name(tmp_path):
    card = saved_card(tmp_path, results_dict())
    assert card.text.lstrip().startswith("# ratatouille-soup\n") and card.data.model_name == "ratatouille-soup"
    pushed = ModelCard(card_for_repo(card.content, "me/shapes-soup"))
    assert pushed.text.lstrip().startswith("# me/shapes-soup\n")
    assert parse_front_matter(pushed.content)["model-index"][0]["name"] == "me/shapes-soup"
    assert 'pipeline("image-classification", model="me/shapes-soup")' in pushed.text
    assert pushed.data.eval_results == card.data.eval_results and pushed.data.base_model == card.data.base_model
    assert pushed.text.count("# me/shapes-soup") == 1 and "## Results" in pushed.text  # only the title changed
    authored = "---\nlicense: mit\n---\n# My own soup\n\n# ratatouille-soup\n"  # its author's title: kept
    assert card_for_repo(authored, "me/shapes-soup") == authored


@pytest.mark.parametrize(
    ("text", "cell"),
    [
        ("plain", "plain"),
        ("a|b", "a\\|b"),
        ("line one\nline two\r\n\tthree", "line one line two three"),
        ("`rm -rf`", "'rm -rf'"),
        ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert(1)&gt;"),
        (0.5, "0.5"),
    ],
)
def test_markdown_cell_escapes(text, cell):
    assert markdown_cell(text) == cell


def _table_shapes(markdown: str) -> list[list[int]]:
    """Cells per row of every table, as a GFM-style parser (markdown-it) sees them."""
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)
    tables = re.findall(r"<table>(.*?)</table>", html, flags=re.S)
    return [
        [len(re.findall(r"<t[hd][ >]", row)) for row in re.findall(r"<tr>(.*?)</tr>", t, flags=re.S)] for t in tables
    ]


def test_hostile_names_cannot_break_the_tables_or_add_sections(tmp_path):
    hostile = "evil | name\n## Injected `heading` <b>"
    card = saved_card(tmp_path, results_dict(run_inits=[hostile] * 3, summary_names=[hostile] * 4))
    body = card.content.split("---", 2)[2]
    assert _table_shapes(body) == [[3] * 5, [9] * 4]  # summary: header + 4 rows; provenance: header + 3 runs
    assert not re.search(r"^#+ Injected", body, flags=re.M)
    assert "<b>" not in body


def test_provenance_marks_the_members_of_the_soup(tmp_path):
    card = saved_card(tmp_path, results_dict(members=(0, 2)))
    rows = [line for line in card.content.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [row.rstrip(" |").rsplit("|", 1)[1].strip() for row in rows] == ["yes", "no", "yes"]
    assert "greedy average of 2 runs" in card.content


def test_erm_best_run_card_is_a_finetune_of_the_base(tmp_path):
    results = results_dict(
        ingredients=[("org/resnet-base", "0" * 40, True)],
        run_inits=[f"org/resnet-base@{'0' * 40}"] * 3,
        members=(1,),
        strategy="erm",
        method="best-run",
    )
    card = saved_card(tmp_path, results)
    assert card.data.base_model == ["org/resnet-base"] and card.data.base_model_relation == "finetune"
    assert "merge" not in card.data.tags and "weight-averaging" not in card.data.tags
    assert (
        "An **ERM** baseline of [Model Ratatouille]" in card.text
        and "the best, by training-domain validation, of 3 fine-tunes" in card.text
    )
    assert "averaged\nweight by weight" not in card.text


def test_fusing_best_run_card_names_every_parent_as_a_merge(tmp_path):
    results = results_dict(strategy="fusing", method="best-run", members=(0,))
    card = saved_card(tmp_path, results)
    assert card.data.base_model == HUB_INGREDIENTS and card.data.base_model_relation == "merge"
    assert "A **Fusing** baseline" in card.text
    assert "random convex combination of the base and one recycled fine-tune per auxiliary dataset" in card.text
