"""The whole recipe end to end on a tiny world: a ~6k-parameter ResNet base, two perturbed community
copies with other heads, and the toy `shapes` target (4 domains x 6 classes x 6 images, 16 px) in Hub
layout. Three runs of four steps; every check is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from ratatouille_hub import recipe
from ratatouille_hub.artifacts import ProbeRecord, RunRecord, SoupFolder, replaced_builder
from ratatouille_hub.config import RecipeConfig, draw_hparams
from ratatouille_hub.data import ImageTensors
from ratatouille_hub.fetch import resolve_model
from ratatouille_hub.merge_engine import average_state_dicts
from ratatouille_hub.models import head_linear
from ratatouille_hub.recipe import assembly, executor
from ratatouille_hub.results import Results
from ratatouille_hub.target import prepare_target
from ratatouille_hub.testing import tiny_recipe
from ratatouille_hub.toy import world as toyworld

SOUP_FILES = {
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "README.md",
    "recipe.yaml",
    "results.json",
    "diagnostics.png",
    "accuracies.png",
}
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
CALLS = ["run 0 of 3", "run 1 of 3 head warm-up", "run 1 of 3", "run 2 of 3 head warm-up", "run 2 of 3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tiny_world) -> SimpleNamespace:
    return tiny_world


make_config = tiny_recipe


def quiet(line: str) -> None:
    pass


def recording_optimize(monkeypatch, calls: list, fail_on: str | None = None):
    """Record every call of the recipe's `optimize` (its head at entry); optionally die at one of them."""
    real = executor.optimize

    def recording(model, batches, **kwargs):
        head = head_linear(model)
        calls.append(
            {
                "desc": kwargs["desc"],
                "steps": kwargs["steps"],
                "weight": head.weight.detach().clone(),
                "bias": head.bias.detach().clone(),
            }
        )
        if kwargs["desc"] == fail_on:
            raise RuntimeError("power cut")
        return real(model, batches, **kwargs)

    monkeypatch.setattr(executor, "optimize", recording)


@pytest.fixture
def no_training():
    """The probe and every run are refused a build: a recipe that would train one fails."""

    def refuse(staging, *inputs):
        raise AssertionError("trained again")

    with replaced_builder(ProbeRecord, refuse), replaced_builder(RunRecord, refuse):
        yield


def probe_is_reused():
    """Building the linear probe again fails the test."""
    return replaced_builder(ProbeRecord, lambda *a: pytest.fail("the linear probe ran again"))


@pytest.fixture(scope="module")
def done(world, tmp_path_factory) -> SimpleNamespace:
    """One uninterrupted recycle, every optimize call recorded."""
    output = tmp_path_factory.mktemp("uninterrupted") / "out"
    config = make_config(world, output)
    calls: list = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        recording_optimize(monkeypatch, calls)
        results = recipe.recycle(config, echo=quiet)
    return SimpleNamespace(config=config, output=output, soup=output / "soup", results=results, calls=calls)


def run_folders(results: Results) -> list[Path]:
    """Run folders as results.json names them (relative to the output folder, or absolute)."""
    return [Path(results.recipe["output"]) / run.folder for run in results.runs]


def run_weights(results: Results) -> list[dict[str, torch.Tensor]]:
    return [load_file(folder / "model" / "model.safetensors") for folder in run_folders(results)]


def fixed_pixels() -> torch.Tensor:
    return torch.randn((5, 3, 16, 16), generator=torch.Generator().manual_seed(0))


def pooled_val(config: RecipeConfig):
    """The training domains' validation images, concatenated here (the recipe reads them joined in place)."""
    val = prepare_target(config, resolve_model(config.base)).data.val
    return ImageTensors(torch.cat([split.pixels for split in val]), torch.cat([split.labels for split in val]))


def correct(model, images) -> int:
    with torch.no_grad():
        logits = model(pixel_values=(images.pixels.float() / 255.0 - 0.5) / 0.5).logits
    return int((logits.argmax(dim=1) == images.labels).sum())


def copy_output(done, destination: Path) -> Path:
    shutil.copytree(done.output, destination)
    return destination


# -- the soup folder --------------------------------------------------------------------------------


def test_soup_folder_is_a_transformers_model_for_the_target_classes(done):
    assert {p.name for p in done.soup.iterdir()} == SOUP_FILES
    config = json.loads((done.soup / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(toyworld.SHAPES)}
    assert config["label2id"] == {name: i for i, name in enumerate(toyworld.SHAPES)}
    assert config["architectures"] == ["ResNetForImageClassification"]
    processor = json.loads((done.soup / "preprocessor_config.json").read_text())
    assert processor == json.loads((Path(done.config.base) / "preprocessor_config.json").read_text())


def test_soup_weights_are_the_mean_of_the_runs(done):
    runs, soup = run_weights(done.results), load_file(done.soup / "model.safetensors")
    assert len(runs) == 3 and soup.keys() == runs[0].keys()
    eps = torch.finfo(torch.float32).eps
    for name, tensor in soup.items():
        members = [run[name] for run in runs]
        assert tensor.dtype == members[0].dtype
        if tensor.is_floating_point():
            exact = torch.stack([m.double() for m in members]).mean(0)
            bound = 4 * eps * torch.stack([m.double().abs() for m in members]).amax(0) + 1e-30
            assert ((tensor.double() - exact).abs() <= bound).all(), name  # float32 accumulation: a few ulps
        else:
            assert torch.equal(tensor, members[0]), name  # integer buffers come from run 0, never averaged
    assert all(torch.equal(soup[k], v) for k, v in average_state_dicts(runs).items())  # same arithmetic in memory
    # the mean is not vacuous: the runs differ, in the head and in the backbone
    for name in ("classifier.1.weight", "resnet.embedder.embedder.convolution.weight"):
        assert not torch.equal(runs[0][name], runs[1][name]) and not torch.equal(runs[1][name], runs[2][name])
    tracked = "resnet.embedder.embedder.normalization.num_batches_tracked"
    assert [run[tracked].item() for run in runs] == [10, 100, 200] and soup[tracked].item() == 10


def test_each_run_keeps_the_batchnorm_statistics_of_its_init(done, world):
    inits = [world.base, *world.aux]
    for folder, init in zip(run_folders(done.results), inits):
        run, start = load_file(folder / "model" / "model.safetensors"), load_file(init / "model.safetensors")
        stats = [name for name in run if name.endswith(BN_STATS)]
        assert len(stats) >= 15
        for name in stats:
            assert torch.equal(run[name], start[name]), (folder.name, name)


def test_soup_loads_with_auto_model_and_equals_the_averaged_runs(done):
    soup = AutoModelForImageClassification.from_pretrained(done.soup).eval()
    rebuilt = AutoModelForImageClassification.from_pretrained(run_folders(done.results)[0] / "model").eval()
    states = [
        AutoModelForImageClassification.from_pretrained(f / "model").state_dict() for f in run_folders(done.results)
    ]
    rebuilt.load_state_dict(average_state_dicts(states))
    with torch.no_grad():
        logits = soup(pixel_values=fixed_pixels()).logits
        assert torch.equal(logits, rebuilt(pixel_values=fixed_pixels()).logits)
        run0 = AutoModelForImageClassification.from_pretrained(run_folders(done.results)[0] / "model").eval()
        assert not torch.equal(logits, run0(pixel_values=fixed_pixels()).logits)
    assert logits.shape == (5, len(toyworld.SHAPES))


def test_pipeline_and_processor_reproduce_the_reported_test_accuracy(done, world):
    """A user's path (AutoImageProcessor + model, or pipeline) scores the held-out domain as results.json says."""
    from datasets import load_dataset

    dataset = load_dataset("parquet", data_files=str(world.target / "data" / "train-00000-of-00001.parquet"))["train"]
    held_out = dataset.filter(lambda d: d == done.results.test_domain, input_columns="domain")
    processor = AutoImageProcessor.from_pretrained(done.soup)
    model = AutoModelForImageClassification.from_pretrained(done.soup).eval()
    with torch.no_grad():
        logits = model(**processor(images=list(held_out["image"]), return_tensors="pt")).logits
    predictions = logits.argmax(dim=1)
    accuracy = (predictions == torch.tensor(held_out["label"])).double().mean().item()
    assert accuracy == pytest.approx(done.results.soup.test_accuracy, abs=1e-12)
    classify = pipeline("image-classification", model=str(done.soup))
    first = classify(held_out[0]["image"], top_k=len(toyworld.SHAPES))
    assert [row["label"] for row in first][0] == toyworld.SHAPES[predictions[0]]
    assert sorted(row["label"] for row in first) == sorted(toyworld.SHAPES)
    assert sum(row["score"] for row in first) == pytest.approx(1.0, abs=1e-5)


# -- training as the recipe ran it ------------------------------------------------------------------


def test_every_run_starts_from_the_saved_linear_probe_head(done):
    lp_folders = [p for p in (done.output / "lp").iterdir() if not p.name.startswith(".")]
    assert len(lp_folders) == 1 and (lp_folders[0] / "done").exists()
    head = load_file(lp_folders[0] / "head.safetensors")
    assert head["weight"].shape == (len(toyworld.SHAPES), 16) and head["weight"].abs().sum() > 0
    assert [c["desc"] for c in done.calls] == CALLS
    assert [c["steps"] for c in done.calls] == [4, 2, 4, 2, 4]  # head warm-up only for the recycled inits
    for call in (done.calls[0], done.calls[1], done.calls[3]):  # the first call of each run
        assert torch.equal(call["weight"], head["weight"]) and torch.equal(call["bias"], head["bias"])


def test_results_record_splits_hparams_and_members(done):
    results, config = done.results, done.config
    assert results.test_domain == "cartoon"  # first in sorted order
    assert results.train_domains == ["painting", "photo", "sketch"]
    assert results.id2label == {str(i): name for i, name in enumerate(toyworld.SHAPES)}
    assert [run.hparams for run in results.runs] == [vars(draw_hparams(config, i)) for i in range(3)]
    assert [run.init.split("@")[0] for run in results.runs] == [config.base, *config.aux]
    for folder in run_folders(results):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert [step for step, _ in metrics["history"]] == [2, 4]
        assert [step for step, _ in metrics["loss_history"]] == [2, 4]  # recorded untracked (report_to none) too
        assert all(0 < loss < 10 for _, loss in metrics["loss_history"])
        assert (
            dict(metrics["history"])[metrics["best_step"]]
            == metrics["val_accuracy"]
            == max(dict(metrics["history"]).values())
        )
    assert results.soup.method == "uniform" and results.soup.members == [0, 1, 2]
    assert len(results.summary) == 6 and results.bn_policy == "average"  # best run, 4 methods, ensemble
    on_disk = json.loads((done.soup / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results.to_dict()))
    assert Results.from_dict(on_disk) == results  # the typed record round-trips through results.json


def test_recipe_yaml_replays_to_an_equal_config(done):
    assert RecipeConfig.load_yaml(done.output / "recipe.yaml") == done.config
    assert RecipeConfig.load_yaml(done.soup / "recipe.yaml") == done.config


def test_soup_card_front_matter(done):
    card = ModelCard.load(done.soup / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.base_model is None  # local folders are not Hub lineage
    assert data.eval_results is None  # a local target: model-index names a dataset by its Hub id
    soup_row = next(row for row in done.results.summary if row.name.endswith("this model"))
    assert f"| {soup_row.name} | {100 * soup_row.val_accuracy:.1f} | {100 * soup_row.test_accuracy:.1f} |" in card.text
    assert "Accuracy on the held-out domain **cartoon**" in card.text and "The target is a local dataset" in card.text
    assert "weight-averaging" in data.tags


# -- resume -----------------------------------------------------------------------------------------


def test_a_second_identical_call_trains_nothing_and_gives_the_same_soup(done, no_training):
    before = {name: (done.soup / name).read_bytes() for name in SOUP_FILES}
    again = recipe.recycle(done.config, echo=quiet)
    assert again == done.results
    assert {name: (done.soup / name).read_bytes() for name in SOUP_FILES} == before


def test_a_rerun_with_another_cache_budget_reuses_the_finished_soup(done, no_training):
    """Streamed (a budget of 0) or cached, the pixels are the same: nothing is merged or evaluated again."""
    before = {name: (done.soup / name).read_bytes() for name in SOUP_FILES}
    with replaced_builder(SoupFolder, lambda *a: pytest.fail("the soup was made again")):
        again = recipe.recycle(done.config.replace(cache_budget_gb=0.0), echo=quiet)
    assert again == done.results
    assert {name: (done.soup / name).read_bytes() for name in SOUP_FILES} == before


def test_another_recipe_in_the_same_output_is_refused(done):
    saved = (done.output / "recipe.yaml").read_text()
    with pytest.raises(recipe.RecipeError, match="differs in: steps: 4 -> 5"):
        recipe.recycle(done.config.replace(steps=5), echo=quiet)
    assert (done.output / "recipe.yaml").read_text() == saved


class ReachedTraining(Exception):
    pass


def _stop(*args):
    raise ReachedTraining


def test_a_typo_in_a_failed_first_attempt_does_not_lock_the_output_folder(world, tmp_path):
    good = make_config(world, tmp_path / "out")
    with pytest.raises(ValueError):
        recipe.recycle(good.replace(base=str(tmp_path / "bsae")), echo=quiet)
    assert not (tmp_path / "out" / "recipe.yaml").exists()  # a failed check writes nothing
    with replaced_builder(ProbeRecord, _stop), pytest.raises(ReachedTraining):  # it gets as far as training
        recipe.recycle(good, echo=quiet)


def test_a_missing_local_base_folder_is_reported_as_missing(world, tmp_path):
    from ratatouille_hub.fetch import FetchError

    with pytest.raises(FetchError, match=r"(?i)no such|does not exist|not found"):
        recipe.recycle(make_config(world, tmp_path / "out").replace(base=str(tmp_path / "bsae")), echo=quiet)


def test_reference_allocation_four_runs_from_the_base_and_one_per_auxiliary_featurizer(world, tmp_path):
    aux = []
    for k in range(16):
        shutil.copytree(world.aux[k % 2], tmp_path / f"aux{k:02d}")
        aux.append(str(tmp_path / f"aux{k:02d}"))
    [plan] = recipe.plan_recipe(make_config(world, tmp_path / "out").replace(runs=20, aux=tuple(aux)), echo=quiet)
    starts = [spec.init.source for spec in plan.runs]
    assert len(starts) == 20
    assert starts.count(str(world.base)) == 4
    assert sorted(s for s in starts if s != str(world.base)) == aux
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_more_runs_reuse_the_finished_ones(done, tmp_path, monkeypatch):
    output = copy_output(done, tmp_path / "more")
    calls: list = []
    recording_optimize(monkeypatch, calls)
    with probe_is_reused():
        results = recipe.recycle(done.config.replace(runs=4, output=str(output)), echo=quiet)
    assert [c["desc"] for c in calls] == ["run 3 of 4"]  # run 3 starts from the base again: no warm-up
    assert [Path(r.folder).name for r in results.runs[:3]] == [f.name for f in run_folders(done.results)]
    assert results.soup.members == [0, 1, 2, 3]


def test_an_interrupted_recycle_resumes_to_a_bit_identical_soup(done, world, tmp_path, monkeypatch):
    config = make_config(world, tmp_path / "out")
    interrupted: list = []
    with monkeypatch.context() as patch:
        recording_optimize(patch, interrupted, fail_on="run 1 of 3")  # dies in run 1, after its head warm-up
        with pytest.raises(RuntimeError, match="power cut"):
            recipe.recycle(config, echo=quiet)
    assert [c["desc"] for c in interrupted] == CALLS[:3]
    runs = tmp_path / "out" / "runs"
    left = [p for p in runs.iterdir() if not p.name.endswith(".lock")]  # claims stay (kernel locks, free)
    assert [(p.name.startswith("."), (p / "done").exists()) for p in left] == [(False, True)]
    assert not (tmp_path / "out" / "soup").exists()

    resumed: list = []
    recording_optimize(monkeypatch, resumed)
    with probe_is_reused():
        results = recipe.recycle(config, echo=quiet)
    assert [c["desc"] for c in resumed] == CALLS[1:]  # only the unfinished runs

    soup = tmp_path / "out" / "soup"
    assert (soup / "model.safetensors").read_bytes() == (done.soup / "model.safetensors").read_bytes()
    for mine, reference in zip(run_folders(results), run_folders(done.results)):
        assert mine.name == reference.name  # same run keys
        assert (mine / "model" / "model.safetensors").read_bytes() == (
            reference / "model" / "model.safetensors"
        ).read_bytes()

    def portable(r: dict) -> dict:
        text = json.dumps(r)
        return json.loads(text.replace(str(tmp_path / "out"), "OUT").replace(str(done.output), "OUT"))

    assert portable(results.to_dict()) == portable(done.results.to_dict())


# -- soup variants on the same runs -----------------------------------------------------------------


def test_greedy_soup_adds_runs_best_first_and_keeps_those_that_do_not_lower_validation(done, tmp_path, no_training):
    output = copy_output(done, tmp_path / "greedy")
    config = done.config.replace(method="greedy", output=str(output))
    # every run is reused (no_training): the method only changes the average
    results = recipe.recycle(config, echo=quiet)

    # replay the spec independently: own validation accuracy, best first, keep if pooled accuracy does not drop
    images = pooled_val(config)
    states = run_weights(results)
    model = AutoModelForImageClassification.from_pretrained(run_folders(results)[0] / "model").eval()

    def score(subset):
        model.load_state_dict(average_state_dicts([states[i] for i in subset]))
        return correct(model, images)

    own = [score([i]) for i in range(3)]
    assert [run.val_accuracy for run in results.runs] == pytest.approx([c / len(images) for c in own], abs=1e-12)
    order = sorted(range(3), key=lambda i: (-own[i], i))
    assert results.greedy_order == order
    selected, best = [order[0]], own[order[0]]
    for candidate in order[1:]:
        trial = score(selected + [candidate])
        if trial >= best:
            selected, best = selected + [candidate], trial
    assert (results.soup.method, results.soup.members) == ("greedy", sorted(selected))
    assert results.soup.val_accuracy == pytest.approx(best / len(images), abs=1e-12)
    assert results.soup.val_accuracy >= results.runs[order[0]].val_accuracy
    assert results.averages["uniform"].members == [0, 1, 2]

    soup = load_file(output / "soup" / "model.safetensors")
    expected = average_state_dicts([states[i] for i in sorted(selected)])
    assert all(torch.equal(soup[k], v) for k, v in expected.items())
    assert yaml.safe_load((output / "soup" / "recipe.yaml").read_text())["method"] == "greedy"


def test_a_run_that_lowers_validation_is_left_out_of_the_greedy_soup(done, tmp_path, monkeypatch, no_training):
    # Tiny runs sit near chance and rarely disagree, so script the pooled-validation score of each
    # candidate average: adding the second-best run lowers it, adding the third ties (and is kept).
    output = copy_output(done, tmp_path / "greedy-scripted")
    config = done.config.replace(method="greedy", output=str(output))
    own = [run.val_accuracy for run in done.results.runs]
    order = sorted(range(3), key=lambda i: (-own[i], i))
    asked = []

    def scripted(self, subset):
        asked.append(list(subset))
        return 0.4 if order[1] in subset else 0.5

    monkeypatch.setattr(assembly.RunAverager, "validation_accuracy", scripted)
    results = recipe.recycle(config, echo=quiet)
    assert asked == [[order[0]], [order[0], order[1]], [order[0], order[2]]]
    members = sorted([order[0], order[2]])
    assert results.soup.members == members and results.soup.method == "greedy"
    assert results.averages["uniform"].members == [0, 1, 2]
    soup, states = load_file(output / "soup" / "model.safetensors"), run_weights(results)
    assert all(torch.equal(soup[k], v) for k, v in average_state_dicts([states[i] for i in members]).items())
    provenance = [line for line in (output / "soup" / "README.md").read_text().splitlines() if line.startswith("| ")]
    in_soup = {int(line.split("|")[1]): line.rstrip(" |").rsplit("|", 1)[1].strip() for line in provenance[-3:]}
    assert in_soup == {i: "yes" if i in members else "no" for i in range(3)}


def test_reestimated_batchnorm_statistics_are_those_of_the_training_images(done, tmp_path, no_training):
    output = copy_output(done, tmp_path / "reestimate")
    config = done.config.replace(bn_policy="reestimate", output=str(output))
    recipe.recycle(config, echo=quiet)
    soup, averaged = load_file(output / "soup" / "model.safetensors"), load_file(done.soup / "model.safetensors")
    for name, tensor in averaged.items():  # only BatchNorm statistics differ from the plain average
        assert torch.equal(soup[name], tensor) != name.endswith(BN_STATS), name

    # The first BatchNorm sees the stem convolution's output; 87 training images fit one batch, so its
    # statistics are that batch's mean and unbiased variance.
    model = AutoModelForImageClassification.from_pretrained(output / "soup").eval()
    train_splits = prepare_target(config, resolve_model(config.base)).data.train
    train = ImageTensors(torch.cat([s.pixels for s in train_splits]), torch.cat([s.labels for s in train_splits]))
    assert len(train) == 87
    with torch.no_grad():
        features = model.resnet.embedder.embedder.convolution((train.pixels.float() / 255.0 - 0.5) / 0.5)
    prefix = "resnet.embedder.embedder.normalization."
    torch.testing.assert_close(soup[prefix + "running_mean"], features.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        soup[prefix + "running_var"], features.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6
    )
    assert soup[prefix + "num_batches_tracked"].item() == 1


def test_the_card_shows_both_figures(done):
    from PIL import Image

    card = (done.soup / "README.md").read_text()
    assert "](accuracies.png)" in card and "](diagnostics.png)" in card
    for name in ("accuracies.png", "diagnostics.png"):
        with Image.open(done.soup / name) as image:
            assert image.size[0] >= 800 and image.getcolors(1 << 16) and len(image.getcolors(1 << 16)) > 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_machine_the_runs_and_the_soups_are_scored_on_the_gpu(world, tmp_path, monkeypatch):
    """The runs, the soups, greedy's candidates and the diagnosis are scored where the runs train."""
    from ratatouille_hub import target as target_module
    from ratatouille_hub import train as train_module
    from ratatouille_hub.recipe import assembly as assembly_module

    devices = []
    real = target_module.predict_logits

    def on_device(model, *args, **kwargs):
        devices.append(next(model.parameters()).device.type)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(target_module, "predict_logits", on_device)
    monkeypatch.setattr(assembly_module, "predict_logits", on_device)
    monkeypatch.setattr(train_module, "predict_logits", on_device)  # validation: the runs', greedy's candidates
    recipe.recycle(make_config(world, tmp_path / "out"), echo=quiet)
    assert devices and set(devices) == {"cuda"}
