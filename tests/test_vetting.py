"""What vetting reports on the fine-tunes it accepts: the distance to the base, whether BatchNorm statistics
were trained, and a distance far above the others' (a fine-tune made otherwise than the recipe assumes)."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ratatouille_hub import recycle
from ratatouille_hub.fetch import resolve_model
from ratatouille_hub.testing import tiny_recipe
from ratatouille_hub.vetting import vet_ingredients

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _variant(base_folder, folder, change):
    shutil.copytree(base_folder, folder)
    state = load_file(base_folder / "model.safetensors")
    save_file({name: change(name, tensor.clone()) for name, tensor in state.items()}, folder / "model.safetensors")
    return resolve_model(str(folder))


def _is_kernel(name, tensor):
    return tensor.is_floating_point() and tensor.dim() >= 2 and not name.startswith("classifier")


def _relative(base_state, other_state, keep) -> float:
    names = [n for n, t in base_state.items() if keep(n, t)]
    difference = torch.cat([(other_state[n].double() - base_state[n].double()).flatten() for n in names])
    reference = torch.cat([base_state[n].double().flatten() for n in names])
    return float(difference.norm() / reference.norm())


def test_vetting_measures_each_fine_tune_and_flags_trained_statistics_and_outliers(tiny_checkpoints, tmp_path):
    base_folder = tiny_checkpoints["base"]
    base = resolve_model(str(base_folder))
    noise = {
        n: torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
        for i, (n, t) in enumerate(load_file(base_folder / "model.safetensors").items())
    }

    def moved(scale, statistics=1.0):
        def change(name, tensor):
            if _is_kernel(name, tensor):
                return tensor + scale * 0.01 * noise[name]
            if name.endswith("running_var"):
                return tensor * statistics
            return tensor

        return change

    careful = [_variant(base_folder, tmp_path / f"careful{k}", moved(1.0 + 0.1 * k)) for k in range(3)]
    careless = _variant(base_folder, tmp_path / "careless", moved(8.0, statistics=1.5))
    report = vet_ingredients(base, [*careful, careless])

    base_state = load_file(base_folder / "model.safetensors")
    assert vet_ingredients(base, careful[:2] + [careless])[2].warnings == (  # 2 others: no median to speak of
        "its BatchNorm statistics were trained (the recipe freezes them)",
    )
    for vetted, ingredient in zip(report, [*careful, careless], strict=True):
        state = load_file(ingredient.path / "model.safetensors")
        assert vetted.source == ingredient.source
        assert vetted.distance == pytest.approx(_relative(base_state, state, _is_kernel), rel=1e-9)
    assert [v.batchnorm_shift for v in report[:3]] == [0.0] * 3
    assert [v.warnings for v in report[:3]] == [()] * 3
    statistics_names = lambda n, t: n.endswith(("running_mean", "running_var"))  # noqa: E731
    careless_state = load_file(careless.path / "model.safetensors")
    assert report[3].batchnorm_shift == pytest.approx(_relative(base_state, careless_state, statistics_names), rel=1e-9)
    assert report[3].batchnorm_shift > 0.1
    ratio = report[3].distance / report[1].distance  # the median of the three careful ones: the middle one
    assert report[3].warnings == (
        "its BatchNorm statistics were trained (the recipe freezes them)",
        f"it moved {ratio:.1f}x as far from the base as the median of the others",
    )
    assert "BatchNorm statistics unchanged" in report[0].describe()
    # The spread a learning-rate grid gives (distance grows about with the rate) is not flagged: 4.5x the
    # smallest and 2.25x the others' median here.
    spread = [_variant(base_folder, tmp_path / f"grid{k}", moved(scale)) for k, scale in enumerate((1, 2, 2.5, 4.5))]
    assert [v.warnings for v in vet_ingredients(base, spread)] == [()] * 4
    assert f"BatchNorm statistics moved {report[3].batchnorm_shift:.3f}" in report[3].describe()


def test_recycle_prints_vetting_greedy_choice_and_barriers(tiny_world, tmp_path):
    lines = []
    results = recycle(tiny_recipe(tiny_world, tmp_path / "out"), echo=lines.append)
    vetted = [line for line in lines if line.startswith("[vet]") and "distance to the base" in line]
    assert len(vetted) == 2  # the tiny world's two fine-tunes, whose statistics were perturbed
    assert all("BatchNorm statistics moved" in line for line in vetted)
    names = [f"run {r.index} from {Path(r.init.split('@')[0]).name}" for r in results.runs]
    largest = sorted(results.diagnostics, key=lambda p: -p.barrier)
    [barriers] = [line for line in lines if line.startswith("[diagnose] barrier")]
    assert barriers == (
        f"[diagnose] barrier on the weight path from the best run ({names[results.best_run.index]}): median "
        f"{100 * statistics.median(p.barrier for p in results.diagnostics):.1f} points; largest: "
        + ", ".join(f"{names[p.runs[1]]} {100 * p.barrier:.1f}" for p in largest)
    )
    greedy = results.averages["greedy"]
    left_out = [names[i] for i in results.greedy_order if i not in greedy.members]
    kept = [line for line in lines if line.startswith("[merge] greedy kept")]
    assert kept == (
        [
            f"[merge] greedy kept {len(greedy.members)} of 3 runs; left out (they lowered validation): {', '.join(left_out)}"
        ]
        if left_out
        else []
    )


@pytest.fixture(scope="module")
def headless_world(tmp_path_factory):
    """The Hub's usual ViT base is a ViTModel (with a pooler its classifiers lack); its fine-tunes are
    ViTForImageClassification, the same tensors under `vit.`. Here: a tiny ViT classifier, the same weights as
    a headless ViTModel, and two fine-tunes of it (backbone moved by 0.002 x N(0, 1), other heads)."""
    from types import SimpleNamespace

    from transformers import ViTModel

    from ratatouille_hub.testing import perturbed_backbone, save_tiny_checkpoint, tiny_processor, tiny_vit

    root = tmp_path_factory.mktemp("headless")
    classifier = tiny_vit(0, names=[f"digit-{i}" for i in range(10)])
    headless = ViTModel(classifier.config)  # add_pooling_layer: a pooler the classifiers do not have
    headless.load_state_dict(classifier.vit.state_dict(), strict=False)
    finetunes = []
    for k in (1, 2):
        tuned = tiny_vit(k, num_labels=4 + k)
        tuned.load_state_dict(perturbed_backbone(classifier.state_dict(), 6 + k, scale=0.002), strict=False)
        finetunes.append(save_tiny_checkpoint(root / f"ft{k}", tuned, processor=tiny_processor(16)))
    return SimpleNamespace(
        classifier=save_tiny_checkpoint(root / "classifier", classifier, processor=tiny_processor(16)),
        headless=save_tiny_checkpoint(root / "headless", headless, processor=tiny_processor(16)),
        finetunes=finetunes,
        larger=save_tiny_checkpoint(root / "larger", tiny_vit(3, hidden_size=32, intermediate_size=64)),
    )


def test_a_headless_base_is_read_as_its_classifier_fine_tunes_name_it(headless_world):
    """Vetting reads the headless base's tensors under its classifier's names (`vit.`, its pooler left out):
    each fine-tune measures exactly as against the classifier of the same weights; a larger ViT of the same
    names is still another model. (It was refused as 'missing backbone tensor ... (+21 more)'.)"""
    from ratatouille_hub.vetting import IngredientError

    w = headless_world
    finetunes = [resolve_model(str(f)) for f in w.finetunes]
    as_classifier = vet_ingredients(resolve_model(str(w.classifier)), finetunes)
    as_headless = vet_ingredients(resolve_model(str(w.headless)), finetunes)
    assert [(v.distance, v.batchnorm_shift != v.batchnorm_shift) for v in as_headless] == [
        (v.distance, True) for v in as_classifier
    ]  # the same distances; no BatchNorm in a ViT (nan)
    assert all(0 < v.distance < 1 for v in as_headless)
    with pytest.raises(IngredientError, match=r"cannot be averaged with .*headless: tensor vit\.\S+ has shape"):
        vet_ingredients(resolve_model(str(w.headless)), [resolve_model(str(w.larger))])


def test_recycling_and_anchored_merges_from_a_headless_base_give_the_classifier_bases_bytes(
    headless_world, tiny_world, tmp_path
):
    """A recipe (ratatouille: a run from the base and one from each fine-tune) and a task-arithmetic merge
    anchored at the base give the same tensors whether the base is the headless ViTModel or the classifier of
    the same weights: what from_pretrained loads from either is the same model."""
    from dataclasses import replace

    from ratatouille_hub import cli

    w = headless_world
    soups = {}
    for name in ("classifier", "headless"):
        config = replace(
            tiny_recipe(tiny_world, tmp_path / name), base=str(getattr(w, name)), aux=tuple(map(str, w.finetunes))
        )
        recycle(config, echo=lambda line: None)
        soups[name] = load_file(tmp_path / name / "soup" / "model.safetensors")
    assert soups["classifier"].keys() == soups["headless"].keys()
    assert all(torch.equal(soups["classifier"][k], soups["headless"][k]) for k in soups["classifier"])
    runs = sorted(str(p) for p in (tmp_path / "headless" / "runs").glob("*/model"))
    merged = {}
    for name in ("classifier", "headless"):
        out = tmp_path / f"merged-{name}"
        argv = ["merge", *runs, "--method", "task-arithmetic", "--base", str(getattr(w, name)), "--output", str(out)]
        assert cli.main(argv) == 0
        merged[name] = load_file(out / "model.safetensors")
    assert all(torch.equal(merged["classifier"][k], merged["headless"][k]) for k in merged["classifier"])


def _rewritten(folder: Path, to: Path, rename=lambda name: name, extra: dict | None = None) -> Path:
    """A copy of a model folder whose weights are renamed by `rename`, with `extra` tensors added."""
    shutil.copytree(folder, to)
    state = {rename(name): tensor for name, tensor in load_file(to / "model.safetensors").items()}
    save_file({**state, **(extra or {})}, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def test_a_timm_base_as_the_hub_stores_it_and_an_old_headless_base_are_read_as_before(headless_world, tmp_path):
    """A timm checkpoint on the Hub stores timm's own names (no `timm_model.`, which transformers adds in
    memory only): it is a classifier, read as stored (reading it as headless refused every fine-tune), its head
    `classifier.*` (a fine-tune with another head was refused as 'tensor classifier.bias has shape [5]').
    A tensor a headless base and its fine-tunes both persisted but the classifier no longer has (an old
    buffer) is compared on neither side."""

    from ratatouille_hub import cli
    from ratatouille_hub.discovery import classifier_names
    from ratatouille_hub.models import load_classifier
    from ratatouille_hub.testing import perturbed_backbone, save_tiny_checkpoint, tiny_timm

    saved = tiny_timm(tmp_path / "saved", {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3})
    hub_style = _rewritten(saved, tmp_path / "hub-style", lambda name: name.removeprefix("timm_model."))
    assert not any(name.startswith("timm_model.") for name in load_file(hub_style / "model.safetensors"))
    tuned = load_classifier(hub_style, {i: f"cat-{i}" for i in range(5)})  # another task: a head of 5 rows
    tuned.load_state_dict(perturbed_backbone(tuned.state_dict(), 3, scale=0.002, head=True))
    finetune = save_tiny_checkpoint(tmp_path / "finetune", tuned)
    stored = load_file(hub_style / "model.safetensors")
    assert classifier_names(hub_style / "config.json", stored) == ({name: name for name in stored}, frozenset())
    assert not any(name.startswith("timm_model.") for name in load_file(finetune / "model.safetensors"))
    prefixed = _rewritten(finetune, tmp_path / "finetune-prefixed", lambda name: f"timm_model.{name}")
    [as_stored] = vet_ingredients(resolve_model(str(hub_style)), [resolve_model(str(finetune))])
    [as_saved] = vet_ingredients(resolve_model(str(saved)), [resolve_model(str(prefixed))])
    assert 0 < as_stored.distance == as_saved.distance < 1  # its head (another size) left out, as it is there
    again = _rewritten(finetune, tmp_path / "finetune-again", lambda name: name)
    argv = ["merge", str(finetune), str(again), "--method", "task-arithmetic", "--base", str(hub_style)]
    assert cli.main([*argv, "--output", str(tmp_path / "merged")]) == 0

    buffer = {"encoder.layer.0.attention.relative_position_index": torch.arange(4)}
    old_base = _rewritten(headless_world.headless, tmp_path / "old-base", extra=buffer)
    old_finetune = _rewritten(
        headless_world.finetunes[0], tmp_path / "old-ft", extra={f"vit.{k}": v for k, v in buffer.items()}
    )
    [old] = vet_ingredients(resolve_model(str(old_base)), [resolve_model(str(old_finetune))])
    [new] = vet_ingredients(
        resolve_model(str(headless_world.headless)), [resolve_model(str(headless_world.finetunes[0]))]
    )
    assert old.distance == new.distance


def test_merge_anchors_a_model_that_is_no_image_classifier_as_it_did(tmp_path):
    """merge takes any transformers model: a base whose config builds no image classifier (BERT) is read as
    stored, not an internal error."""
    from transformers import BertConfig, BertForSequenceClassification

    from ratatouille_hub import cli
    from ratatouille_hub.testing import perturbed_backbone

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    base.save_pretrained(tmp_path / "base")
    folders = []
    for k in (1, 2):
        model = BertForSequenceClassification(config)
        model.load_state_dict(perturbed_backbone(base.state_dict(), k, scale=0.01, head=True))
        model.save_pretrained(tmp_path / f"ft{k}")
        folders.append(str(tmp_path / f"ft{k}"))
    argv = ["merge", *folders, "--method", "task-arithmetic", "--base", str(tmp_path / "base")]
    assert cli.main([*argv, "--output", str(tmp_path / "merged")]) == 0


def test_a_vit_config_that_does_not_match_its_weights_is_refused_at_planning(headless_world, tmp_path):
    """transformers 5 names a ViT's modules otherwise in memory than on disk, so the planning check compared no
    tensor of a ViT and a wrong intermediate_size surfaced only when a run loaded it: it compares the names the
    classifier is saved under."""
    import json

    from ratatouille_hub.models import ArchitectureError, refuse_unbuildable

    refuse_unbuildable(headless_world.classifier, "classifier")  # a consistent one passes
    wrong = tmp_path / "wrong"
    shutil.copytree(headless_world.classifier, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ArchitectureError) as refused:
        refuse_unbuildable(wrong, "wrong")
    assert str(refused.value) == (
        "wrong: config.json does not match its weights: it builds tensor 'vit.encoder.layer.0.intermediate.dense.bias' "
        "as [64], the weights hold [32] (2 more tensors like it)"
    )  # the intermediate layer's weight and the output layer's weight
