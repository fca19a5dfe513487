"""Every soup keeps its lineage (issue 20, item 4): the soups of recycle, merge, assemble --from-hub and update
name the true base and their ingredients (`base_model`), the target (`datasets`, and at its revision in the
text), and their scores where there are any (`model-index`), as huggingface_hub's ModelCard reads them back;
every run folder carries its recipe fingerprint, so update checks a local run as it checks a Hub run; a
contributed run names its target in `datasets:`, and discovery refuses it as an ingredient for that target."""

from __future__ import annotations

import json
from pathlib import Path

import journeys
import pytest
from huggingface_hub import ModelCard, snapshot_download

from ratatouille_hub import cli
from ratatouille_hub.discovery import ACCEPTED, discover_finetunes
from ratatouille_hub.merge_engine import read_safetensors_metadata
from ratatouille_hub.provenance import FINGERPRINT_KEY, INGREDIENTS_KEY, RUN_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(local_hub, new_hub_namespace, tiny_world, tiny_checkpoints, tmp_path_factory) -> journeys.World:
    return journeys.build_world(local_hub, new_hub_namespace(), tiny_world, tiny_checkpoints, tmp_path_factory)


def ok(*argv) -> None:
    assert cli.main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def hub_recipe(world, tmp_path_factory):
    """A recipe on the Hub base, its discovered fine-tunes and the Hub PACS, held out on sketch; and one run of
    another recipe (another split seed)."""
    root = tmp_path_factory.mktemp("lineage")
    recipe = ["recycle", "--base", f"{world.ns}-org/base", "--target", f"{world.ns}-data/pacs"]
    ok(*recipe, "--test-domain", "sketch", "--output", root / "out", *journeys.BUDGET["recycle"])
    ok(*recipe, "--test-domain", "sketch", "--seed", "1", "--output", root / "other", *journeys.BUDGET["recycle"])
    return root


def lineage(card: ModelCard) -> dict:
    data = card.data.to_dict()
    return {key: data.get(key) for key in ("base_model", "base_model_relation", "datasets")}


def test_a_recycled_soup_names_base_ingredients_target_at_its_revision_and_scores(world, hub_recipe):
    ns, pacs = world.ns, f"{world.ns}-data/pacs"
    card = ModelCard.load(hub_recipe / "out" / "soup" / "README.md")
    assert lineage(card) == {
        "base_model": [f"{ns}-org/base", f"{ns}-community/finetune-2", f"{ns}-community/finetune-1"],
        "base_model_relation": "merge",
        "datasets": [pacs],
    }
    results = json.loads((hub_recipe / "out" / "soup" / "results.json").read_text())
    (score,) = card.data.eval_results
    assert (score.dataset_type, score.metric_value) == (pacs, round(results["soup"]["test_accuracy"], 4))
    assert score.dataset_revision == world.shas[pacs]
    assert f"**{pacs}** at revision `{world.shas[pacs]}`" in card.text


def test_every_run_folder_carries_its_recipe_fingerprint(hub_recipe):
    soup = read_safetensors_metadata(hub_recipe / "out" / "soup" / "model.safetensors")
    results = json.loads((hub_recipe / "out" / "soup" / "results.json").read_text())
    assert len(results["runs"]) == journeys.BUDGET_RUNS
    for run in results["runs"]:  # the recipe's fingerprint, and the run's place in it and its start
        declared = json.loads((hub_recipe / "out" / run["folder"] / "model" / RUN_FILE).read_text())
        assert declared == {"fingerprint": soup[FINGERPRINT_KEY], "index": run["index"], "init": run["init"]}


def test_merge_keeps_the_runs_fingerprint_and_sources(hub_recipe, tmp_path):
    runs = sorted((hub_recipe / "out" / "runs").glob("*/model"))
    ok("merge", *runs, "--output", tmp_path / "merged")
    merged = read_safetensors_metadata(tmp_path / "merged" / "model.safetensors")
    soup = read_safetensors_metadata(hub_recipe / "out" / "soup" / "model.safetensors")
    assert merged[FINGERPRINT_KEY] == soup[FINGERPRINT_KEY]
    assert len(json.loads(merged[INGREDIENTS_KEY])) == len(runs)


def test_a_local_run_of_another_recipe_is_refused_by_update_as_a_hub_run_is(hub_recipe, tmp_path, capsys):
    other = sorted((hub_recipe / "other" / "runs").glob("*/model"))[0]
    assert (
        cli.main(["update", str(hub_recipe / "out" / "soup"), "--add", str(other), "--output", str(tmp_path / "s")])
        == 2
    )
    assert "a run of another recipe" in capsys.readouterr().err


@pytest.fixture(scope="module")
def contributed(world, hub_recipe):
    """Runs 0-2 of the recipe contributed, the soup assembled from the Hub and pushed; run 3 contributed later."""
    ns = world.ns
    ok("contribute", hub_recipe / "out", "--to", f"{ns}-alice/pacs-sketch", "--index", 0, 1, 2)
    ok("assemble", hub_recipe / "assembled", "--from-hub", f"{ns}-alice/pacs-sketch-run0")
    ok("push", f"{ns}-me/pacs-soup", hub_recipe / "assembled")
    ok("contribute", hub_recipe / "out", "--to", f"{ns}-bob/pacs-sketch", "--index", 3)
    return hub_recipe


def inits(world) -> list[str]:
    """The checkpoints the recipe's runs started from, in run order: the base and the discovered fine-tunes."""
    return [f"{world.ns}-org/base", f"{world.ns}-community/finetune-2", f"{world.ns}-community/finetune-1"]


def test_contributed_runs_name_the_target_and_discovery_refuses_them_for_it(world, contributed, local_hub, tmp_path):
    """Refused as runs by their tag; and by the target their card lists, when a copy drops the tag, whether the
    target is named by id or at a revision."""
    ns, pacs = world.ns, f"{world.ns}-data/pacs"
    run = f"{ns}-alice/pacs-sketch-run0"
    assert lineage(ModelCard.load(run)) == {
        "base_model": f"{ns}-org/base",
        "base_model_relation": "finetune",
        "datasets": [pacs],
    }
    copy = Path(snapshot_download(run, local_dir=tmp_path / "copy"))
    card = ModelCard.load(copy / "README.md")
    card.data.tags = []
    card.save(copy / "README.md")
    local_hub.seed_model(f"{ns}-carol/copied-run", copy)
    for target in (pacs, f"{pacs}@{world.shas[pacs]}"):
        verdicts = {c.repo_id: (c.accepted, c.reason) for c in discover_finetunes(f"{ns}-org/base", target=target)}
        assert verdicts[run] == (False, "a ratatouille run, not a community fine-tune")
        assert verdicts[f"{ns}-carol/copied-run"] == (
            False,
            f"trained on the target dataset (card lists {pacs}): leakage",
        )
        assert verdicts[f"{ns}-community/finetune-1"] == (True, ACCEPTED)


def test_a_soup_assembled_from_the_hub_names_base_inits_runs_and_target(world, contributed):
    ns, pacs = world.ns, f"{world.ns}-data/pacs"
    card = ModelCard.load(contributed / "assembled" / "README.md")
    runs = [f"{ns}-alice/pacs-sketch-run{k}" for k in range(3)]
    assert lineage(card) == {"base_model": [*inits(world), *runs], "base_model_relation": "merge", "datasets": [pacs]}
    assert f"{pacs}@{world.shas[pacs]}" in card.text and f"{ns}-org/base@{world.shas[f'{ns}-org/base']}" in card.text


def test_an_updated_hub_soup_keeps_its_lineage_and_scores_on_the_pinned_target(world, contributed):
    ns, pacs = world.ns, f"{world.ns}-data/pacs"
    ok(
        "update",
        f"{ns}-me/pacs-soup",
        "--add",
        f"{ns}-bob/pacs-sketch-run3",
        "--target",
        pacs,
        "--test-domain",
        "sketch",
    )
    card = ModelCard.load(f"{ns}-me/pacs-soup")
    runs = [*(f"{ns}-alice/pacs-sketch-run{k}" for k in range(3)), f"{ns}-bob/pacs-sketch-run3"]
    assert lineage(card) == {"base_model": [*inits(world), *runs], "base_model_relation": "merge", "datasets": [pacs]}
    (score,) = card.data.eval_results
    assert (score.dataset_type, score.dataset_revision) == (pacs, world.shas[pacs])
    assert f"{pacs}@{world.shas[pacs]}" in card.text


def test_an_updated_recycled_soup_keeps_its_lineage(world, hub_recipe, tmp_path):
    pacs = f"{world.ns}-data/pacs"
    (run,) = sorted((hub_recipe / "out" / "runs").glob("*/model"))[:1]
    ok("update", hub_recipe / "out" / "soup", "--remove", run, "--output", tmp_path / "smaller")
    card = ModelCard.load(tmp_path / "smaller" / "README.md")
    assert lineage(card) == {"base_model": inits(world), "base_model_relation": "merge", "datasets": [pacs]}
    assert f"{pacs}@{world.shas[pacs]}" in card.text
