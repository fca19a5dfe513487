"""timm-wrapped backbones as a first-class architecture, `intertrain`, and the erm / fusing strategies.

A tiny timm EfficientNet (`test_efficientnet` at 1/4 width: ~12k parameters, 16 px) stands in for
EfficientNet-Lite0; the auxiliary dataset is the toy world's `stripes` task; the target is the tiny
`shapes` world. Every check is exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load, load_file
from transformers import AutoModelForImageClassification, ViTImageProcessorPil, pipeline

from ratatouille_hub import cli
from ratatouille_hub.config import IntertrainConfig, RecipeConfig
from ratatouille_hub.data import Normalization, label_names_of, normalization_of, resolution_of
from ratatouille_hub.intertraining import intertrain
from ratatouille_hub.merge_engine import average_state_dicts
from ratatouille_hub.models import head_parameter_names, load_classifier, load_processor, serving_processor
from ratatouille_hub.recipe import recycle
from ratatouille_hub.sources import load_dataset_source
from ratatouille_hub.testing import save_tiny_checkpoint, tiny_processor, tiny_resnet, tiny_timm, write_hub_dataset
from ratatouille_hub.toy import world as toyworld

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 16
SHAPES = list(toyworld.SHAPES)


def _timm_base(folder: Path) -> Path:
    cfg = {"input_size": [3, SIZE, SIZE], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
    return tiny_timm(folder, {**cfg, "crop_pct": 1.0, "crop_mode": "center"})


@pytest.fixture(scope="module")
def timm_world(tmp_path_factory, tiny_world) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("timm-world")
    stripes = write_hub_dataset(toyworld.aux_datasets(per_class=8, size=SIZE)["stripes"], root / "stripes", card=None)
    base = _timm_base(root / "base")
    aux_config = IntertrainConfig(
        base=str(base), dataset=str(stripes), steps=6, batch_size=8, output=str(root / "intertrain")
    )
    lines: list[str] = []
    (aux,) = intertrain(aux_config, echo=lines.append)
    return SimpleNamespace(
        root=root, base=base, stripes=stripes, aux=aux, aux_config=aux_config, lines=lines, target=tiny_world.target
    )


def test_timm_checkpoint_reheads_and_saves_its_own_label_names(timm_world, tmp_path):
    id2label = dict(enumerate(SHAPES))
    model = load_classifier(timm_world.base, id2label).eval()
    assert model.timm_model.get_classifier().out_features == len(SHAPES)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["label_names"] == SHAPES and saved["num_classes"] == len(SHAPES)  # not the 10 pretraining names
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.id2label == id2label
    x = torch.randn(3, 3, SIZE, SIZE)
    assert torch.equal(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_timm_processor_gives_normalisation_and_resolution(timm_world, tmp_path):
    processor = load_processor(timm_world.base)
    assert normalization_of(processor) == Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert resolution_of(processor, None) == SIZE
    model = load_classifier(timm_world.base, dict(enumerate(SHAPES)))
    assert serving_processor(model, 12, normalization_of(processor)) is None  # recorded in config.json
    model.save_pretrained(tmp_path)
    assert resolution_of(load_processor(tmp_path), None) == 12
    predictions = pipeline("image-classification", model=str(tmp_path))(Image.new("RGB", (40, 30), "red"))
    assert {p["label"] for p in predictions} <= set(SHAPES)


def test_intertrain_writes_a_community_checkpoint_with_last_step_weights(timm_world):
    folder = timm_world.aux
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "done",
        "model.safetensors",
        "results.json",
    ]
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets == ["stripes"] and card.data.base_model is None  # a local base has no Hub id to name
    config = json.loads((folder / "config.json").read_text())
    assert config["label_names"] == list(label_names_of(load_dataset_source(str(timm_world.stripes)), "label"))
    base, tuned = load_file(timm_world.base / "model.safetensors"), load_file(folder / "model.safetensors")
    heads = {"timm_model.classifier.weight", "timm_model.classifier.bias"}
    assert set(base) == set(tuned)
    moved = [k for k in base if k not in heads and base[k].is_floating_point() and not torch.equal(base[k], tuned[k])]
    assert moved, "the backbone did not train"
    for name in base:  # BatchNorm running statistics stay frozen during fine-tuning
        if "running_" in name or name.endswith("num_batches_tracked"):
            assert torch.equal(base[name], tuned[name]), name
    results = json.loads((folder / "results.json").read_text())
    assert results["steps"] == 6 and 0.0 <= results["train_accuracy"] <= 1.0


def test_intertrain_rerun_reuses_the_finished_fine_tune(timm_world):
    before = (timm_world.aux / "model.safetensors").read_bytes()
    lines: list[str] = []
    (again,) = intertrain(timm_world.aux_config, echo=lines.append)
    assert again == timm_world.aux and (again / "model.safetensors").read_bytes() == before
    assert any("done earlier" in line for line in lines)


def test_intertrain_retrains_when_the_base_feeds_its_model_other_pixels(timm_world, tmp_path):
    """A local base's revision is its weights' digest: a processor changed beside the same weights gives other
    pixels, so the finished fine-tune is not the one asked for."""
    base = save_tiny_checkpoint(tmp_path / "base", tiny_resnet(0), processor=tiny_processor())
    config = IntertrainConfig(
        base=str(base), dataset=str(timm_world.stripes), steps=2, batch_size=4, output=str(tmp_path / "out")
    )
    (first,) = intertrain(config, echo=lambda _: None)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.4] * 3, image_std=[0.5] * 3).save_pretrained(
        base
    )
    (second,) = intertrain(config, echo=lambda _: None)
    assert second != first and {p.name for p in (tmp_path / "out" / "runs").iterdir() if p.is_dir()} == {
        first.name,
        second.name,
    }
    assert json.loads((second / "preprocessor_config.json").read_text())["image_mean"] == [0.4] * 3


def test_intertrain_runs_draw_their_own_hyperparameters(timm_world, tmp_path):
    config = timm_world.aux_config.replace(runs=2, steps=2, output=str(tmp_path / "two"))
    first, second = intertrain(config, echo=lambda _: None)
    assert first != second
    hparams = [json.loads((f / "results.json").read_text())["hparams"] for f in (first, second)]
    assert hparams[0] == {"lr": 5e-5, "weight_decay": 0.0, "dropout": 0.0}  # run 0: the defaults
    assert load_file(first / "model.safetensors").keys() == load_file(second / "model.safetensors").keys()


def test_intertrain_trains_at_what_it_is_given_whatever_the_seed(timm_world, tmp_path, capsys):
    """`intertrain --seed 1 --lr 1e-3` trained at a drawn lr (5e-05, dropout 0.5) while recipe.yaml said 0.001."""
    out = tmp_path / "given"
    argv = ["intertrain", "--base", str(timm_world.base), "--dataset", str(timm_world.stripes), "--steps", "2"]
    argv += ["--batch-size", "8", "--seed", "1", "--lr", "1e-3", "--runs", "2", "--output", str(out)]
    assert cli.main(argv) == 0
    folders = [
        Path(line.split(": ", 1)[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("fine-tune")
    ]
    hparams = [json.loads((f / "results.json").read_text())["hparams"] for f in folders]
    assert hparams[0] == {"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0}  # run 0: the lr given, the defaults
    assert hparams[1]["lr"] == 1e-3  # every run at the lr given; what was not given is drawn
    assert yaml.safe_load((out / "recipe.yaml").read_text())["lr"] == 1e-3
    seedless = ["intertrain", "--base", str(timm_world.base), "--dataset", str(timm_world.stripes), "--steps", "2"]
    assert cli.main([*seedless, "--batch-size", "8", "--seed", "1", "--output", str(tmp_path / "defaults")]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fine-tune")]
    results = json.loads((Path(line.split(": ", 1)[1]) / "results.json").read_text())
    assert results["hparams"] == {"lr": 5e-5, "weight_decay": 0.0, "dropout": 0.0}  # run 0 of seed 1: the defaults


def test_intertrain_push_is_discoverable_as_a_finetune_of_the_hub_base(
    timm_world, local_hub, hub_namespace, tmp_path, capsys
):
    base_id = f"{hub_namespace}/tiny-effnet"
    local_hub.seed_model(base_id, timm_world.base)
    aux_id = f"{hub_namespace}/tiny-effnet-stripes"
    argv = [
        "intertrain",
        "--base",
        base_id,
        "--dataset",
        str(timm_world.stripes),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--output",
        str(tmp_path / "out"),
        "--push-to-hub",
        aux_id,
    ]
    assert cli.main(argv) == 0
    found = [m.id for m in HfApi().list_models(filter=f"base_model:finetune:{base_id}")]
    assert found == [aux_id]
    card = ModelCard.load(aux_id)
    assert card.data.base_model == base_id and card.data.base_model_relation == "finetune"
    assert card.data.datasets == ["stripes"]
    assert cli.main(argv) == 0  # a rerun trains nothing and commits nothing
    assert "no changes" in capsys.readouterr().out


def test_intertrain_bad_column_is_one_line(timm_world, tmp_path, capsys):
    code = cli.main(
        [
            "intertrain",
            "--base",
            str(timm_world.base),
            "--dataset",
            str(timm_world.stripes),
            "--label-column",
            "colour",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    *progress, error = capsys.readouterr().err.splitlines()
    assert error.startswith("error: ") and "colour" in error
    assert [line.split()[0] for line in progress] == ["[fetch]", "[data]"]  # the stages before it, nothing else
    assert not (tmp_path / "out").exists()


# -- the strategies, on the timm base ------------------------------------------------------------------


@pytest.fixture(scope="module")
def strategies(timm_world, tmp_path_factory) -> SimpleNamespace:
    """erm, soup, ratatouille and fusing, in this order, in one output folder (runs are shared)."""
    output = tmp_path_factory.mktemp("strategies") / "out"
    outcomes = {}
    for strategy in ("erm", "soup", "ratatouille", "fusing"):
        config = RecipeConfig(
            base=str(timm_world.base),
            target=str(timm_world.target),
            aux=(str(timm_world.aux),),
            strategy=strategy,
            runs=2,
            steps=3,
            eval_every=1,
            lp_steps=20,
            warmup_steps=2,
            batch_size=4,
            output=str(output),
        )
        lines: list[str] = []
        results = recycle(config, echo=lines.append)
        outcomes[strategy] = SimpleNamespace(
            results=results,
            lines=lines,
            weights=(output / "soup" / "model.safetensors").read_bytes(),
            card=ModelCard.load(output / "soup" / "README.md"),
        )
    return SimpleNamespace(output=output, **outcomes)


def _run_folder(output: Path, results: dict, index: int) -> Path:
    return output / results.runs[index].folder


def test_erm_keeps_the_best_run_by_validation(strategies):
    results = strategies.erm.results
    best = results.best_run.index
    assert results.soup.method == "best-run" and results.soup.members == [best]
    assert best == max(range(2), key=lambda i: (results.runs[i].val_accuracy, -i))
    run_weights = (_run_folder(strategies.output, results, best) / "model" / "model.safetensors").read_bytes()
    assert strategies.erm.weights == run_weights
    assert results.soup.test_accuracy == results.runs[best].test_accuracy
    assert "weight-averaging" not in strategies.erm.card.data.tags


def test_soup_reuses_the_erm_runs_and_averages_them(strategies):
    assert sum("done earlier" in line for line in strategies.soup.lines) == 2  # both runs came from erm
    results = strategies.soup.results
    states = [load_file(_run_folder(strategies.output, results, i) / "model" / "model.safetensors") for i in range(2)]
    soup = load(strategies.soup.weights)  # the soup folder now holds the last strategy's model
    expected = average_state_dicts(states)
    assert soup.keys() == expected.keys() and all(torch.equal(soup[k], expected[k]) for k in soup)
    assert results.soup.test_accuracy == results.averages["uniform"].test_accuracy


def test_ratatouille_starts_run_one_from_the_intertrained_checkpoint(strategies, timm_world):
    results = strategies.ratatouille.results
    assert results.runs[0].init == strategies.soup.results.runs[0].init  # run 0: the base, shared
    assert results.runs[1].init.startswith(str(timm_world.aux) + "@sha256:")
    assert [run.recycled for run in results.runs] == [False, True]
    # Inter-training is run 1 whichever run wins validation: the only one from a recycled init
    assert results.best_recycled_run.index == 1 and results.best_recycled_single == results.runs[1]
    assert results.best_recycled_run.test_accuracy == results.runs[1].test_accuracy
    assert strategies.soup.results.best_recycled_run is None  # no run of a soup is recycled
    assert any("run 0 of 2: done earlier" in line for line in strategies.ratatouille.lines)


def test_fusing_inits_are_convex_combinations_of_base_and_auxiliary(strategies, timm_world):
    results = strategies.fusing.results
    inits = sorted(p for p in (strategies.output / "inits").iterdir() if not p.name.startswith("."))  # no claims
    assert len(inits) == 2
    id2label = dict(enumerate(SHAPES))
    base = load_classifier(timm_world.base, id2label)
    head = head_parameter_names(base)
    base_state = base.state_dict()
    aux_state = load_classifier(timm_world.aux, id2label).state_dict()
    for folder in inits:
        fusion = json.loads((folder / "fusion.json").read_text())
        weights = fusion["weights"]
        assert len(weights) == 2 and math.isclose(sum(weights), 1.0, rel_tol=1e-12)
        assert max(weights) / min(weights) <= math.exp(4)  # exp(4U) / sum with U in [0, 1)
        fused = load_file(folder / "model.safetensors")
        expected = average_state_dicts([base_state, aux_state], weights)
        for name, tensor in expected.items():
            if name not in head:
                assert torch.equal(fused[name], tensor), name
    assert all(run.init.startswith("fusion:") for run in results.runs)
    assert results.soup.method == "best-run"
    assert [i.source for i in results.ingredients] == [str(timm_world.base), str(timm_world.aux)]


def test_fusing_without_recycled_checkpoints_is_refused(timm_world, tmp_path):
    config = RecipeConfig(
        base=str(timm_world.base),
        target=str(timm_world.target),
        strategy="fusing",
        runs=1,
        steps=1,
        lp_steps=1,
        output=str(tmp_path / "out"),
    )
    with pytest.raises(ValueError, match="fusing needs recycled fine-tunes"):
        recycle(config, echo=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_timm_soup_loads_with_auto_classes_and_pipeline(strategies):
    soup = strategies.output / "soup"
    strategies_soup = AutoModelForImageClassification.from_pretrained(soup).eval()
    assert strategies_soup.config.id2label == dict(enumerate(SHAPES))
    predictions = pipeline("image-classification", model=str(soup))(Image.new("RGB", (SIZE, SIZE), "blue"))
    assert {p["label"] for p in predictions} <= set(SHAPES)


def test_a_local_base_can_name_its_hub_id_in_the_card(tmp_path):
    from ratatouille_hub.config import ConfigError
    from ratatouille_hub.fetch import Ingredient
    from ratatouille_hub.intertraining import aux_card

    mirror = tmp_path / "resnet"
    mirror.mkdir()
    (mirror / "README.md").write_text("---\nlicense: apache-2.0\n---\n# resnet\n")
    base = Ingredient(str(mirror), "sha256:0123456789abcdef", mirror)
    config = IntertrainConfig(base=str(mirror), dataset="/data/cars", base_model="org/resnet", steps=3)
    results = {"hparams": {"lr": 5e-5, "weight_decay": 0.0, "dropout": 0.0}, "n_images": 9, "image_size": 16}
    card = aux_card(config, base, ["a", "b"], {**results, "train_accuracy": 0.5})
    assert (card.data.base_model, card.data.base_model_relation, card.data.datasets, card.data.license) == (
        "org/resnet",
        "finetune",
        ["cars"],
        "apache-2.0",  # the base's, as its card declares it
    )
    licensed = aux_card(config.replace(license="mit"), base, ["a", "b"], {**results, "train_accuracy": 0.5})
    assert licensed.data.license == "mit"
    with pytest.raises(ConfigError, match="base_model must be a Hub model id"):
        config.replace(base_model="not a hub id!")
