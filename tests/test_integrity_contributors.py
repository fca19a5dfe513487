"""Contributed runs are strangers' repos (issue 19, cause 5): what `assemble --from-hub` lets into a soup, what
reaches a card from a run's record, and what discovery makes of contributed runs.

One recipe with a Hub base (three honest runs pushed by alice with `contribute`), and runs that carol pushes
by hand: each a copy of an honest run, poisoned one way, with a record that names its weights' sha256 (as
anyone can write), and the honest card, so that `assemble --from-hub` finds it by the base's tag.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import refusals
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ratatouille_hub import cli, recycle
from ratatouille_hub.card import RUN_TAG, base_tag, grown_soup_card, run_card
from ratatouille_hub.discovery import head_names_of, local_signature
from ratatouille_hub.fetch import Ingredient
from ratatouille_hub.provenance import RUN_FILE, SoupIngredient, SoupRecord, file_sha256, fingerprint_id
from ratatouille_hub.testing import tiny_recipe
from ratatouille_hub.vetting import distance_to_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALICE, CAROL = "tok-alice", "tok-carol"  # conftest.CONTRIBUTORS: each writes only into their own namespace
BASE = "alice/contrib-base"
HONEST = "alice/contrib-shapes"
FIRST_CONV = "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"
HOSTILE = "x`\n# Injected <script>alert(1)</script> [link](http://evil.example) ![img](http://evil.example/i.png)"


def push(folder: Path, repo_id: str, token: str) -> str:
    """`folder` as the Hub model `repo_id`; its commit sha."""
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id).oid


def copy_of(repo_id: str, folder: Path) -> Path:
    """Every file of a contributed run (weights, configs, record, card), as a folder to edit."""
    folder.mkdir(parents=True)
    for file in Path(snapshot_download(repo_id)).iterdir():
        shutil.copyfile(file, folder / file.name)
    return folder


def rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def contribute_by_hand(folder: Path, repo_id: str, token: str = CAROL) -> str:
    """Push `folder` after making its record name its weights, as anyone can; the commit sha."""
    edit_json(folder / RUN_FILE, lambda record: record.update(weights_sha256=file_sha256(folder / "model.safetensors")))
    return push(folder, repo_id, token)


def assembled(argv: list[str], capsys) -> list[str]:
    """What the command printed: its warnings and progress (stderr: runs refused, the yardstick), then its
    result (stdout: the soup's one line)."""
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and "Traceback" not in captured.err
    return captured.err.splitlines() + captured.out.splitlines()


def mean_of(runs: list[Path], folder: Path) -> dict[str, torch.Tensor]:
    """The plain `merge` of `runs` (in this order): the soup an honest assembly must equal exactly."""
    assert cli.main(["merge", *map(str, runs), "--output", str(folder)]) == 0
    return load_file(folder / "model.safetensors")


def assert_same_tensors(file: Path, expected: dict[str, torch.Tensor]) -> None:
    tensors = load_file(file)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[name], expected[name]) for name in tensors)


@pytest.fixture(scope="module")
def contributed(tiny_world, tiny_checkpoints, local_hub, tmp_path_factory):
    """Three honest runs of a recipe whose base is on the Hub, contributed by alice."""
    root = tmp_path_factory.mktemp("contributors")
    push(tiny_checkpoints["base"], BASE, ALICE)
    results = recycle(tiny_recipe(tiny_world, root / "out").replace(base=BASE), echo=lambda line: None)
    assert cli.main(["contribute", str(root / "out"), "--to", HONEST, "--token", ALICE]) == 0
    record = json.loads((Path(snapshot_download(f"{HONEST}-run0")) / RUN_FILE).read_text())
    runs = [root / "out" / run.folder / "model" for run in results.runs]
    return SimpleNamespace(root=root, runs=runs, fingerprint=record["fingerprint"])


def x50(tensors: dict) -> None:
    """Random weights 50x the scale of a unit normal, in every floating tensor."""
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 50


def one_nan(tensors: dict) -> None:
    tensors[FIRST_CONV].view(-1)[0] = torch.nan


def statistics_x50(tensors: dict) -> None:
    """BatchNorm running variances x50, every kernel left as it was."""
    for name, tensor in tensors.items():
        if name.endswith("running_var"):
            tensor.mul_(50)


def renamed(tensors: dict) -> None:
    tensors[FIRST_CONV + "_renamed"] = tensors.pop(FIRST_CONV)


def truncated(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def other_config(folder: Path) -> None:
    """Another activation, and a key that would clear a terminal."""
    edit_json(folder / "config.json", lambda config: config.update({"hidden_act": "gelu", "\x1b[2J": 1}))


POISONS = {  # repo name -> how carol poisons a copy of alice's run 0
    "x50": lambda folder: rewrite_weights(folder, x50),
    "nan": lambda folder: rewrite_weights(folder, one_nan),
    "statistics": lambda folder: rewrite_weights(folder, statistics_x50),
    "renamed": lambda folder: rewrite_weights(folder, renamed),
    "truncated": truncated,
    "config": other_config,
}


@pytest.fixture(scope="module")
def poisoned(contributed):
    """carol's poisoned runs: repo id -> (commit, folder)."""
    pushed = {}
    for name, poison in POISONS.items():
        folder = copy_of(f"{HONEST}-run0", contributed.root / "poisoned" / name)
        poison(folder)
        repo_id = f"carol/contrib-{name}-run0"
        pushed[repo_id] = (contribute_by_hand(folder, repo_id), folder)
    return pushed


def base_distance(folder: Path) -> float:
    """What vetting measures between a checkpoint and the base (kernels of the backbone)."""
    base = Ingredient(BASE, "", Path(snapshot_download(BASE)))
    head = head_names_of(base.path / "config.json")
    return distance_to_base(base, Ingredient("run", "", folder), local_signature(base.path), head)


def every_tensor_distance(folder: Path) -> float:
    """||w - w_base|| / ||w_base|| over every floating tensor of the backbone (the head has other labels)."""
    base = load_file(Path(snapshot_download(BASE)) / "model.safetensors")
    run = load_file(folder / "model.safetensors")
    head = head_names_of(Path(snapshot_download(BASE)) / "config.json")
    names = [name for name, tensor in base.items() if tensor.is_floating_point() and name not in head]
    difference = sum(float((run[name].double() - base[name].double()).pow(2).sum()) for name in names)
    return (difference / sum(float(base[name].double().pow(2).sum()) for name in names)) ** 0.5


def test_poisoned_runs_are_refused_one_by_one_and_the_honest_runs_make_the_soup(
    contributed, poisoned, tmp_path, capsys
):
    printed = assembled(["assemble", str(tmp_path / "soup"), "--from-hub", f"{HONEST}-run0"], capsys)

    sha = {repo_id: commit for repo_id, (commit, _) in poisoned.items()}
    size = (contributed.runs[0] / "model.safetensors").stat().st_size
    x50_distance = base_distance(poisoned["carol/contrib-x50-run0"][1])
    assert x50_distance > 100
    expected = [
        f"refused carol/contrib-x50-run0: its backbone weights are at relative distance {x50_distance:.2f} from "
        "the base alice/contrib-base's (runs of the recipe stay within 1)",
        f"refused carol/contrib-nan-run0: carol/contrib-nan-run0@{sha['carol/contrib-nan-run0']}/model.safetensors: "
        f"tensor '{FIRST_CONV}' contains NaN or Inf",
        "refused carol/contrib-renamed-run0: it cannot be averaged with the named run: missing backbone tensor "
        + FIRST_CONV,
        f"refused carol/contrib-truncated-run0: carol/contrib-truncated-run0@{sha['carol/contrib-truncated-run0']}"
        f"/model.safetensors: truncated file: tensor data ends at byte {size}, the file has {size // 2}",
        # the key carol added would clear the terminal: it is printed escaped
        "refused carol/contrib-config-run0: its config.json differs from the named run's in: \\x1b[2J, hidden_act",
    ]
    for line in expected:
        assert line in printed, "\n".join(printed)
    # BatchNorm statistics x50 leave the kernels alone: the distance over every backbone tensor sees them
    moved = every_tensor_distance(poisoned["carol/contrib-statistics-run0"][1])
    assert (
        "refused carol/contrib-statistics-run0: its backbone tensors (BatchNorm statistics and biases too) are at "
        f"relative distance {moved:.2f} from the base alice/contrib-base's (runs of the recipe stay within 1)"
    ) in printed
    assert sum(line.startswith("refused ") for line in printed) == len(POISONS)
    assert printed[-1] == f"[merge] 3 runs of recipe {contributed.fingerprint} -> {tmp_path / 'soup'}"
    assert_same_tensors(tmp_path / "soup" / "model.safetensors", mean_of(contributed.runs, tmp_path / "mean"))


def test_a_poisoned_named_run_is_refused_in_one_line_then_an_honest_one_assembles(
    contributed, poisoned, tmp_path, capsys
):
    distance = base_distance(poisoned["carol/contrib-x50-run0"][1])
    out = tmp_path / "soup"
    line = refusals.fails_cleanly(
        "contrib-poisoned-named-run",
        "assemble --from-hub naming a run of random weights x50 with an honest record",
        ["assemble", str(out), "--from-hub", "carol/contrib-x50-run0"],
        "carol/contrib-x50-run0",
        out,
        capsys,
        {"<tmp>": tmp_path},
    )
    assert line == (
        f"error: carol/contrib-x50-run0: its backbone weights are at relative distance {distance:.2f} from the base "
        "alice/contrib-base's (runs of the recipe stay within 1); name another run of the recipe"
    )
    printed = assembled(["assemble", str(out), "--from-hub", f"{HONEST}-run1"], capsys)
    assert printed[-1].startswith("[merge] 3 runs of recipe ")
    assert_same_tensors(out / "model.safetensors", mean_of(contributed.runs, tmp_path / "mean"))


def record_copy(name: str, folder: Path, change_record) -> str:
    """A copy of alice's run 0 whose record `change_record` edits, pushed by carol as `carol/contrib-<name>-run0`."""
    copy = copy_of(f"{HONEST}-run0", folder / name)
    edit_json(copy / RUN_FILE, change_record)
    contribute_by_hand(copy, f"carol/contrib-{name}-run0")
    return f"carol/contrib-{name}-run0"


def test_runs_whose_records_are_not_what_contribute_writes_are_refused_naming_the_repo(contributed, tmp_path, capsys):
    cases = {  # name -> (how the record is edited, the reason printed)
        "fingerprint": (
            lambda record: record.update(fingerprint=HOSTILE),
            "no valid ratatouille.json: fingerprint is not a 16-digit hex digest",
        ),
        "restated": (  # another recipe claimed under the honest fingerprint
            lambda record: record["recipe"].update(test_domain=HOSTILE),
            "no valid ratatouille.json: its fingerprint is not the hash of its recipe",
        ),
        "accuracy": (
            lambda record: record["run"].update(val_accuracy=float("nan")),
            "no valid ratatouille.json: run.val_accuracy is not an accuracy between 0 and 1",
        ),
        "init": (
            lambda record: record["run"].update(init=f"{HOSTILE}@{'a' * 40}"),
            "no valid ratatouille.json: run.init is not a Hub id@commit, a folder@sha256:digest or a fusion",
        ),
        "labels": (
            lambda record: record["recipe"].update(labels=[HOSTILE]),
            "no valid ratatouille.json: recipe.labels is not an id -> label mapping",
        ),
    }
    for name, (change, _) in cases.items():
        record_copy(name, tmp_path, change)

    printed = assembled(["assemble", str(tmp_path / "soup"), "--from-hub", f"{HONEST}-run0"], capsys)
    for name, (_, reason) in cases.items():
        assert f"refused carol/contrib-{name}-run0: {reason}" in printed, printed
    assert printed[-1].startswith("[merge] 3 runs of recipe ")
    assert_same_tensors(tmp_path / "soup" / "model.safetensors", mean_of(contributed.runs, tmp_path / "mean"))


def test_a_named_run_with_a_hostile_fingerprint_is_refused_before_it_reaches_a_card(contributed, tmp_path, capsys):
    repo_id = record_copy("hostile-named", tmp_path, lambda record: record.update(fingerprint=HOSTILE))
    out = tmp_path / "soup"
    line = refusals.fails_cleanly(
        "contrib-hostile-fingerprint",
        "assemble --from-hub naming a run whose record's fingerprint is markdown and HTML",
        ["assemble", str(out), "--from-hub", repo_id],
        repo_id,
        out,
        capsys,
        {"<tmp>": tmp_path},
    )
    assert line == f"error: {repo_id}: no valid ratatouille.json: fingerprint is not a 16-digit hex digest"


def test_runs_measured_against_the_named_run_when_the_recipe_base_is_not_on_the_hub(contributed, tmp_path, capsys):
    """A recipe whose base was a local folder: only the named run can stand in for it."""
    local_base = f"{tmp_path}/elsewhere/base@sha256:0123456789abcdef"

    def local_recipe(index: int):
        def change(record):
            record["recipe"]["base"] = local_base
            record["fingerprint"] = fingerprint_id(record["recipe"])
            record["run"]["index"] = index

        return change

    names = []
    for index in (0, 1):
        copy = copy_of(f"{HONEST}-run{index}", tmp_path / f"local-{index}")
        edit_json(copy / RUN_FILE, local_recipe(index))
        ModelCard(f"---\ntags: {json.dumps([RUN_TAG, base_tag(local_base)])}\n---\n# run\n").save(copy / "README.md")
        names.append(f"alice/contrib-local-run{index}")
        contribute_by_hand(copy, names[-1], ALICE)
    poison = copy_of(f"{HONEST}-run0", tmp_path / "local-x50")
    edit_json(poison / RUN_FILE, local_recipe(2))
    shutil.copyfile(tmp_path / "local-0" / "README.md", poison / "README.md")
    rewrite_weights(poison, x50)
    contribute_by_hand(poison, "carol/contrib-local-x50-run2")

    printed = assembled(["assemble", str(tmp_path / "soup"), "--from-hub", names[0]], capsys)
    named = Ingredient(names[0], "", tmp_path / "local-0")
    distance = distance_to_base(
        named, Ingredient("x50", "", poison), local_signature(named.path), head_names_of(named.path / "config.json")
    )
    assert printed[0] == (
        f"[verify] the recipe's base {local_base} is not on the Hub: runs are measured against the named run {names[0]}"
    )
    assert (
        f"refused carol/contrib-local-x50-run2: its backbone weights are at relative distance {distance:.2f} from the "
        f"named run {names[0]}'s (runs of the recipe stay within 1)"
    ) in printed
    assert printed[-1].startswith("[merge] 2 runs of recipe ")
    assert_same_tensors(tmp_path / "soup" / "model.safetensors", mean_of(contributed.runs[:2], tmp_path / "mean"))


def test_record_and_hub_strings_are_escaped_in_the_cards(tmp_path):
    record = SoupRecord((SoupIngredient(HOSTILE, HOSTILE), SoupIngredient("b" * 64, "alice/run@" + "c" * 40)), HOSTILE)
    provenance = {
        "fingerprint": HOSTILE,
        "recipe": {"target": "org/shapes@" + "d" * 40, "base": f"{HOSTILE}@sha256:0123456789abcdef", HOSTILE: HOSTILE},
        "run": {"index": 0, "init": HOSTILE, "hparams": {HOSTILE: 1}, "best_step": 2, "val_accuracy": 0.5},
    }
    for name, card in {"soup": grown_soup_card(record), "run": run_card(provenance, "alice/run")}.items():
        card.save(tmp_path / f"{name}.md")
        loaded = ModelCard.load(tmp_path / f"{name}.md")
        body = loaded.text
        assert [line for line in body.splitlines() if line.startswith("#")] == [
            "# ratatouille-soup" if name == "soup" else "# alice/run"
        ]
        assert "<script>" not in body and not re.search(r"(?<!\\)\[(link|img)\]", body), body
        assert not re.search(r"^(license|injected):", loaded.content, flags=re.M)
    soup_front = ModelCard.load(tmp_path / "soup.md").data.to_dict()
    assert soup_front["base_model"] == ["alice/run"]
    run_front = ModelCard.load(tmp_path / "run.md").data.to_dict()
    assert set(run_front) == {"datasets", "library_name", "pipeline_tag", "tags"}
    assert run_front["datasets"] == ["org/shapes"]  # discovery then refuses it for that target


def test_a_soup_whose_metadata_fingerprint_is_hostile_is_refused_by_update(contributed, tmp_path, capsys):
    """A soup's weights record its ingredients and fingerprint (anyone can publish such a soup): `update` reads
    the record back before any card. `merge` itself refuses inputs whose run record is not one."""
    runs = [tmp_path / "run0", tmp_path / "run1"]
    for run, honest in zip(runs, contributed.runs[:2], strict=True):
        shutil.copytree(honest, run)
    soup = tmp_path / "soup"
    assert cli.main(["merge", str(runs[0]), str(runs[1]), "--output", str(soup)]) == 0
    capsys.readouterr()
    weights = soup / "model.safetensors"
    with safe_open(weights, "pt") as handle:
        metadata = {**handle.metadata(), "ratatouille.fingerprint": HOSTILE}
    save_file(load_file(weights), weights, metadata=metadata)

    (runs[0] / RUN_FILE).write_text(json.dumps({"fingerprint": HOSTILE}))
    line = refusals.fails_cleanly(
        "merge-hostile-run-record",
        "merge of a run whose ratatouille.json declares a hostile fingerprint",
        ["merge", str(runs[0]), str(runs[1]), "--output", str(tmp_path / "again")],
        RUN_FILE,
        tmp_path / "again",
        capsys,
        {"<tmp>": tmp_path},
    )
    assert line == f"error: {runs[0]}: no valid {RUN_FILE}: fingerprint is not a 16-digit hex digest"
    line = refusals.fails_cleanly(
        "contrib-soup-hostile-fingerprint",
        "update of a soup whose weights' metadata names a fingerprint that is markdown and HTML",
        ["update", str(soup), "--add", str(contributed.runs[2])],
        "ratatouille.fingerprint",
        soup,
        capsys,
        {"<tmp>": tmp_path, "<out>": soup},
    )
    assert line == f"error: {soup}: malformed ratatouille.fingerprint metadata (not a recipe fingerprint)"


def test_discovery_refuses_contributed_runs_as_fine_tunes_to_recycle(contributed, tiny_world, capsys):
    assert cli.main(["discover", "--base", BASE, "--target", str(tiny_world.target)]) == 0
    rows = {re.split(r"\s{2,}", line)[0]: re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines()}
    sha = HfApi().model_info(f"{HONEST}-run0").sha
    row = rows[f"{HONEST}-run0"]  # id, revision, downloads (as many as the tests made), verdict, reason
    assert [row[1], *row[3:]] == [sha[:8], "refused", "a ratatouille run, not a community fine-tune"]


def test_contribute_checks_every_run_record_before_pushing_any(contributed, tmp_path, capsys):
    """A run's metrics.json lies in the output folder, which others may share: what `contribute` would
    publish is checked as `assemble --from-hub` checks it, for every run before the first push."""
    out = tmp_path / "out"
    shutil.copytree(contributed.root / "out", out)
    run = out / contributed.runs[1].parent.relative_to(contributed.root / "out")
    edit_json(run / "metrics.json", lambda metrics: metrics.update(val_accuracy=float("nan")))
    argv = ["contribute", str(out), "--to", "alice/contrib-tampered", "--token", ALICE]
    line = refusals.fails_cleanly(
        "contrib-tampered-metrics",
        "contribute a run whose metrics.json someone sharing the output folder edited (val_accuracy NaN)",
        argv,
        "metrics.json",
        out,
        capsys,
        {"<tmp>": tmp_path, "<run>": run},
    )
    assert line == (
        f"error: {run}/metrics.json: not the metrics of a finished run "
        "(run.val_accuracy is not an accuracy between 0 and 1)"
    )
    assert [model.id for model in HfApi().list_models(author="alice", search="contrib-tampered")] == []


def test_update_refuses_a_hub_run_whose_record_names_other_weights(contributed, tmp_path, capsys):
    """A Hub run offered to `update --add` carrying a copy of an honest record over other weights: the record
    must name the weights it sits beside (as assemble --from-hub demands)."""
    soup = tmp_path / "soup"
    assert cli.main(["merge", str(contributed.runs[0]), str(contributed.runs[1]), "--output", str(soup)]) == 0
    copy = shutil.copytree(Path(snapshot_download(f"{HONEST}-run2")), tmp_path / "forged", symlinks=False)
    tensors = load_file(copy / "model.safetensors")
    one_nan(tensors)
    tensors[FIRST_CONV].view(-1)[0] = 0.5  # finite, just not the recorded weights
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    sha = push(copy, "carol/contrib-forged", CAROL)
    capsys.readouterr()
    line = refusals.fails_cleanly(
        "contrib-update-record-of-other-weights",
        "update --add a Hub run whose ratatouille.json is an honest run's, over other weights",
        ["update", str(soup), "--add", "carol/contrib-forged", "--output", str(tmp_path / "grown")],
        "carol/contrib-forged",
        tmp_path / "grown",
        capsys,
        {"<tmp>": tmp_path, "<sha>": sha},
    )
    assert line == f"error: carol/contrib-forged@{sha}: its weights are not the ones its ratatouille.json names"
