"""Bad input and security, through both commands (`merge` and `recycle`) on one tiny world.

Every bad input is one `error: ...` line on stderr that names the culprit, exit code 2, no traceback,
and nothing written to the output folder. Each case's line (temporary paths replaced by <world> and
<out>) must appear in docs/errors.md; `RATATOUILLE_WRITE_ERRORS_MD=1 pytest tests/test_errors.py`
rewrites that table from the lines the tests see.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import refusals
import torch
import yaml
from datasets import ClassLabel, Value
from huggingface_hub import ModelCard, constants, hf_hub_download
from safetensors.torch import load_file, save_file
from transformers import ResNetForImageClassification

from ratatouille_hub import cli
from ratatouille_hub.card import build_card, markdown_cell
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.testing import make_results, tiny_resnet, tiny_vit
from ratatouille_hub.toy import world as toyworld
from ratatouille_hub.vetting import IngredientError

ENTRY_POINT = Path(sys.executable).with_name("ratatouille-hub")
TINY = [
    "--runs",
    "1",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--lp-steps",
    "2",
    "--warmup-steps",
    "1",
    "--batch-size",
    "2",
    "--image-size",
    "16",
]
SECRET = "hf_ratatouilleSecretToken0123456789"
HOSTILE_DOMAIN = "cartoon | evil\n---\nlicense: evil-license\n# Injected <script>x</script>"


# -- the tiny world -----------------------------------------------------------------------------------


def _read(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write(file: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


class _Evil:
    """Unpickling it creates the marker file: proof that a pickle was (or was never) loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def _copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def _with_domains(dataset, domains: list[str]):
    return dataset.remove_columns("domain").add_column("domain", domains, feature=Value("string"))


def _dataset_folder(dataset, folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoints) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("errors-world")
    markers = root / "markers"
    markers.mkdir()
    base, aux = tiny_checkpoints["base"], tiny_checkpoints["aux1"]
    w = SimpleNamespace(root=root, base=base, aux=aux, markers=markers)

    # A good fine-tune that also carries a booby-trapped pickle: only its safetensors may ever be read.
    w.aux_with_pickle = _copy(aux, root / "aux-with-pickle")
    (w.aux_with_pickle / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(markers / "pickle-beside-safetensors")))
    (w.aux_with_pickle / "README.md").write_text(
        "---\nlicense: evil-license\ndatasets:\n- 'x\n\n---\ninjected: true'\n---\n# Evil card <script>x</script>\n"
    )

    # Corrupt safetensors files (copies of aux1, so merge sees the same config).
    w.truncated = _copy(aux, root / "aux-truncated")
    raw = (aux / "model.safetensors").read_bytes()
    (w.truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    w.corrupt = _copy(aux, root / "aux-corrupt-header")
    (length,) = struct.unpack("<Q", raw[:8])
    (w.corrupt / "model.safetensors").write_bytes(raw[:8] + b"{not json" + b" " * (length - 9) + raw[8 + length :])
    w.absurd = _copy(aux, root / "aux-absurd-shape")
    header, data = _read(aux / "model.safetensors")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin = header[last]["data_offsets"][0]
    header[last] = {"dtype": "F32", "shape": [1 << 20, 1 << 20, 1 << 20], "data_offsets": [begin, begin + (1 << 62)]}
    _write(w.absurd / "model.safetensors", header, data)  # claims 4 EiB: must be refused, never allocated
    w.renamed = _copy(aux, root / "aux-renamed-tensor")
    header, data = _read(aux / "model.safetensors")
    header["resnet.embedder.embedder.conv.weight"] = header.pop("resnet.embedder.embedder.convolution.weight")
    _write(w.renamed / "model.safetensors", header, data)

    aux_labels = list(json.loads((aux / "config.json").read_text())["id2label"].values())
    w.other_shapes = root / "aux-other-shapes"
    tiny_resnet(3, names=aux_labels, hidden_sizes=(8, 32)).save_pretrained(w.other_shapes)
    w.half = root / "aux-float16"
    ResNetForImageClassification.from_pretrained(aux).half().save_pretrained(w.half)
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        folder = _copy(aux, root / f"aux-{name}")
        tensors = load_file(aux / "model.safetensors")
        tensors["resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"][0, 0, 0, 0] = value
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        setattr(w, name, folder)

    w.vit = root / "vit-tiny"
    tiny_vit(0, names=aux_labels, hidden_size=8, intermediate_size=16).save_pretrained(w.vit)
    w.other_base = root / "resnet-other-base"  # same shapes as the base, independently initialised
    base_labels = list(json.loads((base / "config.json").read_text())["id2label"].values())
    tiny_resnet(1234, names=base_labels).save_pretrained(w.other_base)

    w.pickle_only = root / "aux-pickle-only"
    w.pickle_only.mkdir()
    shutil.copyfile(aux / "config.json", w.pickle_only / "config.json")
    (w.pickle_only / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(markers / "pickle-only")))
    w.remote_code = _copy(aux, root / "aux-remote-code")
    config = json.loads((aux / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageClassification": "evil.EvilModel"}
    (w.remote_code / "config.json").write_text(json.dumps(config))
    (w.remote_code / "evil.py").write_text(_evil_code(markers / "remote-code"))

    # Targets: the good one, and one per kind of label-map / column trouble.
    shapes = toyworld.target_dataset(per_class_per_domain=3, size=16)
    w.target = _dataset_folder(shapes, root / "shapes")
    w.no_domain = _dataset_folder(shapes.remove_columns("domain"), root / "no-domain-column")
    w.no_label = _dataset_folder(shapes.remove_columns("label"), root / "no-label-column")
    w.no_image = _dataset_folder(shapes.remove_columns("image"), root / "no-image-column")
    domains = list(shapes["domain"])
    domains[5] = ""
    w.empty_value = _dataset_folder(_with_domains(shapes, domains), root / "blank-domain")
    names = sorted(set(shapes["domain"])) + ["clipart"]
    w.declared_empty = _dataset_folder(shapes.cast_column("domain", ClassLabel(names=names)), root / "clipart-declared")
    w.one_class = _dataset_folder(
        shapes.filter(lambda d, y: d != "photo" or y == 0, input_columns=["domain", "label"]), root / "photo-one-class"
    )
    w.no_processor = _copy(w.base, root / "base-no-processor")
    (w.no_processor / "preprocessor_config.json").unlink()
    w.stray_file = root / "domainbed-stray-file"  # ROOT/<domain>/<class>/<image>, and one file out of place
    for domain in ("photo", "sketch"):
        for label in ("circle", "square"):
            (w.stray_file / domain / label).mkdir(parents=True)
            shapes[0]["image"].save(w.stray_file / domain / label / "0.png")
    (w.stray_file / "photo" / "circle" / "notes.txt").write_text("not an image")
    w.script = _copy(w.target, root / "scripted")
    (w.script / "scripted.py").write_text(_evil_code(markers / "dataset-script"))
    hostile = [HOSTILE_DOMAIN if d == "cartoon" else d for d in shapes["domain"]]
    w.hostile_target = _dataset_folder(_with_domains(shapes, hostile), root / "hostile-domains")
    return w


# -- running a command and checking its failure ---------------------------------------------------------


def placeholders(world) -> dict:
    return {"<world>": world.root, "<ckpt>": world.base.parent, "<hf-cache>": constants.HF_HUB_CACHE}


@pytest.fixture
def refused(world, capsys):
    """refused(case, what, argv, culprit, out): run `argv` and demand a clean refusal (refusals.fails_cleanly)."""
    return lambda case, what, argv, culprit, out: fails_cleanly(case, what, argv, culprit, world, out, capsys)


def fails_cleanly(case: str, what: str, argv: list[str], culprit: str, world, out: Path, capsys) -> str:
    return refusals.fails_cleanly(case, what, argv, culprit, out, capsys, {**placeholders(world), "<tmp>": out.parent})


# -- merge: every input checked before anything is written ---------------------------------------------

MERGE_CASES = {  # case: (what, bad folder attribute, culprit in the line)
    "merge-truncated": ("safetensors file cut in half", "truncated", "aux-truncated/model.safetensors"),
    "merge-corrupt-header": ("header that is not JSON", "corrupt", "aux-corrupt-header/model.safetensors"),
    "merge-absurd-shape": ("header claiming a 4 EiB tensor", "absurd", "aux-absurd-shape/model.safetensors"),
    "merge-renamed-tensor": ("a tensor name that differs", "renamed", "resnet.embedder.embedder.convolution.weight"),
    "merge-other-shapes": ("same labels, other layer widths", "other_shapes", "aux-other-shapes"),
    "merge-dtype": ("float16 copy of a float32 model", "half", "aux-float16"),
    "merge-nan": ("a NaN weight", "nan", "aux-nan/model.safetensors"),
    "merge-inf": ("an Inf weight", "inf", "aux-inf/model.safetensors"),
    "merge-vit-into-resnet": ("a ViT merged with a ResNet", "vit", "vit-tiny"),
    "merge-id2label": ("two models whose id2label differ", "base", "id2label"),
    "merge-pickle-only": ("pytorch_model.bin only", "pickle_only", "aux-pickle-only"),
    "merge-remote-code": ("config.json with auto_map", "remote_code", "aux-remote-code"),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_refuses_bad_input(case, world, tmp_path, refused):
    what, attribute, culprit = MERGE_CASES[case]
    out = tmp_path / "out"
    refused(case, what, ["merge", str(world.aux), str(getattr(world, attribute)), "--output", str(out)], culprit, out)
    assert not list(world.markers.iterdir())  # no pickle loaded, no checkpoint code run


def test_merge_into_a_file_is_refused(world, tmp_path, refused):
    out = tmp_path / "out"
    out.write_text("not a folder")
    argv = ["merge", str(world.aux), str(world.aux), "--output", str(out)]
    refused("merge-output-is-a-file", "--output names a file", argv, str(out), out)
    assert out.read_text() == "not a folder"


def test_anchored_merges_need_the_model_they_anchor_at(world, tmp_path, refused):
    out = tmp_path / "out"
    argv = ["merge", str(world.aux), str(world.aux), "--output", str(out), "--method", "model-stock"]
    refused("merge-anchored-without-base", "--method model-stock without --base", argv, "needs --base", out)
    stranger = world.root / "stranger"  # named in the line: under the world, whose path the docs normalise
    stranger.mkdir(exist_ok=True)
    save_file({"other.weight": torch.zeros(2)}, stranger / "model.safetensors")
    what = "--base sharing no tensor with the inputs"
    refused("merge-base-of-another-model", what, [*argv, "--base", str(stranger)], "shares no tensor with", out)


def test_updates_refuse_what_would_not_be_the_mean_of_one_recipe(world, tmp_path, refused):
    soup = world.root / "one-run-soup"  # under the world: the docs normalise its path
    if not soup.exists():
        assert cli.main(["merge", str(world.aux), "--output", str(soup)]) == 0
    update = ["update", str(soup)]
    refused("update-nothing", "update without --add or --remove", update, "nothing to do", soup)
    refused("update-twice", "--add a run already in the soup", [*update, "--add", str(world.aux)], "already in", soup)
    what = "--add a run of other labels"
    refused("update-other-labels", what, [*update, "--add", str(world.base)], "does not match", soup)
    argv = [*update, "--remove", str(world.aux), str(world.aux)]
    refused("update-remove-twice", "--remove naming one run twice", argv, "named twice in --remove", soup)
    argv = [*update, "--add", str(world.base), "--output", str(soup)]
    refused("update-output-is-an-input", "--output naming the soup itself", argv, "is (or contains) the input", soup)
    weighted = world.root / "weighted-soup"
    if not weighted.exists():
        argv = ["merge", str(world.aux), str(world.aux), "--output", str(weighted), "--method", "weighted"]
        assert cli.main([*argv, "--weights", "1", "2"]) == 0
    what = "a soup whose weights record no ingredients (weighted)"
    argv = ["update", str(weighted), "--add", str(world.aux)]
    refused("update-no-record", what, argv, "record no ingredients", weighted)


def test_merge_never_unpickles_a_file_beside_the_safetensors(world, tmp_path, capsys):
    assert cli.main(["merge", str(world.aux), str(world.aux_with_pickle), "--output", str(tmp_path / "soup")]) == 0
    assert not list(world.markers.iterdir())


# -- recycle: ingredients, data and config checked before the output folder is touched --------------------


def recycle_argv(world, out: Path, *, base=None, aux=None, target=None, extra=()) -> list[str]:
    return [
        "recycle",
        "--base",
        str(base or world.base),
        "--aux",
        str(aux or world.aux),
        "--target",
        str(target or world.target),
        *TINY,
        "--output",
        str(out),
        *extra,
    ]


INGREDIENT_CASES = {  # case: (what, aux attribute, culprit)
    "recycle-truncated": ("recycled safetensors file cut in half", "truncated", "aux-truncated/model.safetensors"),
    "recycle-corrupt-header": ("recycled file's header is not JSON", "corrupt", "aux-corrupt-header/model.safetensors"),
    "recycle-absurd-shape": ("header claiming a 4 EiB tensor", "absurd", "aux-absurd-shape/model.safetensors"),
    "recycle-renamed-tensor": ("a backbone tensor renamed", "renamed", "aux-renamed-tensor"),
    "recycle-other-shapes": ("a ResNet with other layer widths", "other_shapes", "aux-other-shapes"),
    "recycle-dtype": ("float16 fine-tune of a float32 base", "half", "aux-float16"),
    "recycle-nan": ("a NaN in a backbone weight", "nan", "aux-nan/model.safetensors"),
    "recycle-inf": ("an Inf in a backbone weight", "inf", "aux-inf/model.safetensors"),
    "recycle-vit-into-resnet": ("a ViT offered to a ResNet soup", "vit", "vit-tiny"),
    "recycle-different-base": ("same shapes, independently initialised", "other_base", "resnet-other-base"),
    "recycle-pickle-only": ("pytorch_model.bin only", "pickle_only", "aux-pickle-only"),
    "recycle-remote-code": ("config.json with auto_map (and the code beside it)", "remote_code", "aux-remote-code"),
}


@pytest.mark.parametrize("case", list(INGREDIENT_CASES))
def test_recycle_refuses_bad_ingredients(case, world, tmp_path, refused):
    what, attribute, culprit = INGREDIENT_CASES[case]
    out = tmp_path / "out"
    refused(case, what, recycle_argv(world, out, aux=getattr(world, attribute)), culprit, out)
    assert not list(world.markers.iterdir())


def test_recycle_refuses_a_missing_base_folder(world, tmp_path, refused):
    out = tmp_path / "out"
    argv = recycle_argv(world, out, base=world.root / "bsae")
    refused("recycle-missing-base", "--base names a folder that does not exist", argv, "bsae", out)


DATA_CASES = {  # case: (what, target attribute, extra flags, culprit)
    "target-no-domain-column": ("target without the domain column", "no_domain", (), "'domain'"),
    "target-no-label-column": ("target without the label column", "no_label", (), "'label'"),
    "target-no-image-column": ("target without the image column", "no_image", (), "'image'"),
    "target-other-domain-column": (
        "--domain-column naming no column",
        "target",
        ("--domain-column", "style"),
        "'style'",
    ),
    "unknown-test-domain": ("--test-domain not in the data", "target", ("--test-domain", "sketchy"), "'sketchy'"),
    "empty-test-domain": (
        "--test-domain declared by the ClassLabel but without images",
        "declared_empty",
        ("--test-domain", "clipart"),
        "'clipart'",
    ),
    "blank-domain-value": ("a row whose domain is empty", "empty_value", (), "row 5"),
    "one-class-domain": ("a training domain holding one class", "one_class", (), "'photo'"),
    "dataset-script": ("a dataset folder with a loading script", "script", (), "scripted"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_recycle_refuses_bad_targets(case, world, tmp_path, refused):
    what, attribute, extra, culprit = DATA_CASES[case]
    out = tmp_path / "out"
    refused(case, what, recycle_argv(world, out, target=getattr(world, attribute), extra=extra), culprit, out)
    assert not list(world.markers.iterdir())


def test_recycle_config_trouble(world, tmp_path, refused):
    out = tmp_path / "out"
    good = RecipeConfig(base=str(world.base), target=str(world.target), aux=(str(world.aux),), output=str(out))
    argv = ["recycle", "--config", str(_yaml(tmp_path, {**good.to_dict(), "colour": "red"}))]
    refused("recipe-unknown-key", "recipe.yaml with an unknown key", argv, "colour", out)
    argv = ["recycle", "--config", str(_yaml(tmp_path, {**good.to_dict(), "batch_size": "many"}))]
    refused("recipe-wrong-type", "recipe.yaml with batch_size: many", argv, "batch_size", out)
    refused("negative-steps", "--steps -3", recycle_argv(world, out, extra=("--steps", "-3")), "steps", out)
    refused("zero-runs", "--runs 0", recycle_argv(world, out, extra=("--runs", "0")), "runs", out)
    out.write_text("not a folder")
    refused("recycle-output-is-a-file", "--output names a file", recycle_argv(world, out), str(out), out)
    assert out.read_text() == "not a folder"


def test_strategy_and_intertrain_trouble(world, tmp_path, refused):
    out = tmp_path / "out"
    argv = [
        "recycle",
        "--base",
        str(world.base),
        "--target",
        str(world.target),
        "--strategy",
        "fusing",
        *TINY,
        "--output",
        str(out),
    ]
    refused("fusing-without-aux", "--strategy fusing with no fine-tune to fuse", argv, "fusing", out)
    argv = [
        "intertrain",
        "--base",
        str(world.base),
        "--dataset",
        str(world.no_label),
        "--steps",
        "1",
        "--output",
        str(out),
    ]
    refused("intertrain-no-label-column", "intertrain on a dataset without the label column", argv, "'label'", out)
    argv = ["intertrain", "--base", str(world.base), "--dataset", str(world.root / "nowhere"), "--output", str(out)]
    refused("intertrain-missing-dataset", "intertrain --dataset naming no folder or Hub dataset", argv, "nowhere", out)
    argv = [
        "intertrain",
        "--base",
        str(world.base),
        "--dataset",
        str(world.target),
        "--runs",
        "0",
        "--output",
        str(out),
    ]
    refused("intertrain-zero-runs", "intertrain --runs 0", argv, "runs", out)


def test_serving_and_hub_trouble(world, tmp_path, refused, monkeypatch):
    out = tmp_path / "out"
    argv = recycle_argv(world, out, base=world.no_processor)
    refused("base-without-processor", "a base that ships no image processor", argv, "base-no-processor", out)
    argv = recycle_argv(world, out, target=world.stray_file)
    refused("domainbed-stray-file", "a DomainBed folder with a non-image file", argv, "notes.txt", out)
    argv = recycle_argv(world, out, base="org/resnet-50")
    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        refused("offline-not-cached", "HF_HUB_OFFLINE=1 and a Hub base never fetched", argv, "org/resnet-50", out)
    mistyped = recycle_argv(world, out, target="data/shapez")  # a local path mistyped, read as a Hub id
    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        offline.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        what = "HF_HUB_OFFLINE=1 and a target that is neither cached nor a local folder"
        refused("offline-target-not-found", what, mistyped, "data/shapez", out)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    line = refused("hub-unreachable", "a Hub that cannot be reached", argv, "org/resnet-50", out)
    assert all(hint in line for hint in ("http://127.0.0.1:9", "HF_ENDPOINT", "HF_HUB_OFFLINE", "local folder"))


def _yaml(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_recycle_refuses_an_output_folder_of_another_recipe(world, tmp_path, refused):
    out = tmp_path / "out"
    (out / "runs" / "0123456789ab").mkdir(parents=True)  # a finished run of that recipe
    (out / "runs" / "0123456789ab" / "done").touch()
    asked = cli.options_from_args(cli.build_parser().parse_args(recycle_argv(world, out)))
    asked.replace(steps=3).save_yaml(out / "recipe.yaml")
    refused(
        "output-of-another-recipe",
        "--output holding a recipe with other steps",
        recycle_argv(world, out),
        "differs in: steps",
        out,
    )


# -- scheduler commands on a saved plan ------------------------------------------------------------------


@pytest.fixture
def planned(world, tmp_path, capsys) -> Path:
    """An output folder holding a saved plan (3 runs) and nothing trained."""
    out = tmp_path / "planned"
    assert cli.main(["plan", *recycle_argv(world, out)[1:]]) == 0
    capsys.readouterr()
    return out


def test_assemble_names_the_runs_still_missing(planned, refused):
    refused(
        "assemble-missing-runs", "assemble before every run is done", ["assemble", str(planned)], "not done", planned
    )


def test_run_refuses_an_index_outside_the_plan(planned, refused):
    argv = ["run", str(planned), "--index", "7"]
    refused("run-index-outside-plan", "run --index past the plan's last run", argv, "--index 7", planned)


def test_run_refuses_a_folder_without_a_plan(tmp_path, refused):
    out = tmp_path / "unplanned"
    out.mkdir()
    argv = ["run", str(out), "--index", "0"]
    refused("run-without-plan", "run on a folder no `plan` wrote", argv, "holds no plan", out)


def test_run_needs_an_index(planned, refused):
    refused("run-without-index", "run with no --index", ["run", str(planned)], "--index", planned)


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(IngredientError, match="relative distance"):
        cli.main(["--debug", *recycle_argv(world, tmp_path / "out", aux=world.other_base)])
    assert not (tmp_path / "out").exists()


def test_bad_input_through_the_installed_command(world, tmp_path):
    """A real process: exit code 2 and, under -q, one error line after the warnings alone, even with the
    libraries' own logging in play (without -q, the progress lines before it are on stderr too)."""
    if not ENTRY_POINT.exists():
        pytest.skip(f"{ENTRY_POINT} is not installed")
    out = tmp_path / "out"
    result = subprocess.run(
        [str(ENTRY_POINT), *recycle_argv(world, out, target=world.one_class), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    *warnings, error = result.stderr.splitlines()
    assert error == "error: domain 'photo' holds a single class; it cannot train a classifier"
    assert all(line.startswith("[vet]   warning: ") for line in warnings)  # aux1's perturbed statistics: no progress
    assert "Traceback" not in result.stdout and not out.exists()


# -- security ----------------------------------------------------------------------------------------------


def test_a_token_never_reaches_files_logs_cards_recipes_or_errors(
    world, tmp_path, capsys, local_hub, hub_namespace, monkeypatch
):
    """A whole recycle with --token and --push-to-hub to a Hub that demands it; then failures with it."""
    monkeypatch.setattr(local_hub, "token", SECRET)
    out = tmp_path / "out"
    repo_id = f"{hub_namespace}/soup"
    argv = recycle_argv(
        world,
        out,
        aux=world.aux_with_pickle,
        target=world.hostile_target,
        extra=("--runs", "2", "--token", SECRET, "--push-to-hub", repo_id),
    )
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"README.md", "recipe.yaml", "results.json"} <= {p.name for p in files}
    assert all(SECRET.encode() not in p.read_bytes() for p in files)
    for name in ("README.md", "recipe.yaml", "results.json", "config.json"):
        assert SECRET.encode() not in Path(hf_hub_download(repo_id, name, token=SECRET)).read_bytes()
    assert not Path(constants.HF_TOKEN_PATH).exists()  # used, never saved
    assert not list(world.markers.iterdir())  # the pickle beside the recycled safetensors was never loaded

    # The community text that reached our card: a hostile domain name (the held-out one) and a hostile card.
    card = ModelCard.load(out / "soup" / "README.md")
    assert set(card.data.to_dict()) == {"library_name", "pipeline_tag", "tags"}  # no license; local: no model-index
    body = card.text
    assert f"held-out domain **{markdown_cell(HOSTILE_DOMAIN)}**" in body  # kept, but on one line
    assert not re.search(r"^#+ Injected", body, flags=re.M) and "<script>" not in body
    assert "injected" not in card.content and "Evil card" not in card.content

    # Failures with the token: each error line is free of it.
    for failing in (
        recycle_argv(world, tmp_path / "o1", base="nobody/no-such-model", extra=("--token", SECRET)),
        recycle_argv(world, tmp_path / "o2", aux=world.nan, extra=("--token", SECRET)),
        ["push", f"{hub_namespace}/again", str(out / "soup"), "--token", "hf_wrong" + SECRET],
    ):
        assert cli.main(failing) == 2
        captured = capsys.readouterr()
        assert captured.err.splitlines()[-1].startswith("error: "), captured.err  # after the progress lines
        assert SECRET not in captured.out + captured.err


def test_community_text_cannot_add_front_matter_keys_or_break_the_card(tmp_path):
    """Every string of results.json that can come from someone else, made hostile at once."""
    evil = "x | y\n---\nlicense: evil\ninjected: true\n---\n# Injected <b>bold</b> `code`\x85\u2028k: v"
    results = make_results(
        RecipeConfig(base=evil, target=evil, runs=2),
        ingredients=[("org/base", "a" * 40, True), ("alice/ft", "b" * 40, True)],
        run_inits=[evil, evil],
        soup=(0.5, 0.25),
        runs=[(0.5, 0.25)] * 2,
        hparams={"lr": 1e-3, "weight_decay": 0, "dropout": 0},
        summary_names=[evil],
        summary=(0.5, 0.25),
        test_domain=evil,
        train_domains=(evil, "photo"),
    )
    build_card(dataclasses.replace(results, target=f"org/pacs@{'e' * 40}")).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert set(data) == {
        *("base_model", "base_model_relation", "datasets", "library_name", "pipeline_tag", "tags", "model-index")
    }
    assert data["base_model"] == ["org/base", "alice/ft"]
    assert "\n" not in data["model-index"][0]["results"][0]["dataset"]["split"]
    body = card.text
    assert not re.search(r"^#+ Injected", body, flags=re.M) and "<b>" not in body and "`code`" not in body
    assert not re.search(r"^(license|injected|k):", card.content, flags=re.M)
