"""Issue 21, item 4: `merge` as a mergekit peer, on tiny fine-tunes over the session's local Hub: Hub ids (and
id@rev) as inputs pinned at their commit, a card that reads back, a merge.yaml that replays to the same bytes
after the Hub moved on, a working --push-to-hub, greedy's one line per candidate, and `ratatouille_hub.merge`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import journeys
import pytest
import refusals
import torch
import yaml
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file

import ratatouille_hub
from ratatouille_hub import MergeOptions, cli
from ratatouille_hub.merge_engine import average_state_dicts, read_safetensors_metadata
from ratatouille_hub.provenance import INGREDIENTS_KEY
from ratatouille_hub.recipe.assembly import validation_inputs
from ratatouille_hub.testing import finetune_of, save_tiny_checkpoint, tiny_processor, tiny_resnet
from ratatouille_hub.toy.world import SHAPES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def finetune(folder: Path, base_folder: Path, seed: int) -> Path:
    """A fine-tune of the tiny base with a head for the tiny target's shapes (its own, drawn from `seed`)."""
    from transformers import ResNetForImageClassification

    base = ResNetForImageClassification.from_pretrained(base_folder)
    model = finetune_of(base, tiny_resnet(seed, names=SHAPES), seed, integer_value=seed)
    return save_tiny_checkpoint(folder, model, processor=tiny_processor(16))


def publish(local_hub, repo_id: str, folder: Path, base: str | None = None) -> str:
    """`folder` as a new commit of `repo_id` (a card naming `base`); returns the commit sha."""
    copy = folder.parent / f"{folder.name}-card-{repo_id.replace('/', '--')}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    card = {"library_name": "transformers", **({"base_model": base} if base else {})}
    (copy / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n# {folder.name}\n")
    return local_hub.seed_model(repo_id, copy)


@pytest.fixture(scope="module")
def local_finetunes(tiny_checkpoints, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("merge-command")
    return [finetune(root / f"ft-{seed}", tiny_checkpoints["base"], seed) for seed in (301, 302, 303, 304, 305)]


@pytest.fixture
def hub_world(local_hub, hub_namespace, tiny_checkpoints, local_finetunes):
    """On the Hub, the base and two fine-tunes naming it (this test's own repos); on disk, a third fine-tune."""
    base = f"{hub_namespace}/base"
    shas = {base: publish(local_hub, base, tiny_checkpoints["base"])}
    for k in (0, 1):
        repo = f"{hub_namespace}/ft-{k}"
        shas[repo] = publish(local_hub, repo, local_finetunes[k], base)
    return hub_namespace, shas, local_finetunes[2]


def mean_of(folders) -> dict:
    return average_state_dicts([load_file(Path(f) / "model.safetensors") for f in folders])


def same_tensors(merged: dict, expected: dict) -> bool:
    return merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)


def test_two_hub_ids_and_a_folder_merge_pinned_with_a_card_and_a_config(hub_world, local_finetunes, tmp_path):
    ns, shas, local = hub_world
    first, second = f"{ns}/ft-0", f"{ns}/ft-1"
    out = tmp_path / "merged"
    assert cli.main(["merge", first, f"{second}@{shas[second]}", str(local), "--output", str(out)]) == 0

    assert same_tensors(load_file(out / "model.safetensors"), mean_of(local_finetunes[:3]))
    saved = yaml.safe_load((out / "merge.yaml").read_text())
    assert saved["models"] == [f"{first}@{shas[first]}", f"{second}@{shas[second]}", str(local)]
    record = json.loads(read_safetensors_metadata(out / "model.safetensors")[INGREDIENTS_KEY])
    assert [i["source"] for i in record] == [f"{first}@{shas[first]}", f"{second}@{shas[second]}", str(local)]

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [first, second] and card.data.base_model_relation == "merge"
    assert card.data.eval_results is None and "model-index" not in card.content  # no target: no score
    assert "method\n**uniform**" in card.text
    for name, revision in ((f"{first}@{shas[first][:8]}", shas[first]), (f"{second}@{shas[second][:8]}", shas[second])):
        assert f"| {name} | `{revision}` | merged |" in card.text
    assert f"| {local.name} | `sha256:" in card.text


def test_merge_yaml_replays_the_same_bytes_after_the_hub_moved_on(local_hub, hub_world, local_finetunes, tmp_path):
    ns, shas, local = hub_world
    first, second = f"{ns}/ft-0", f"{ns}/ft-1"
    out, again, moved = tmp_path / "merged", tmp_path / "again", tmp_path / "moved"
    assert cli.main(["merge", first, second, str(local), "--output", str(out)]) == 0
    for k, repo in enumerate((first, second)):  # both repos get a new commit with other weights
        assert publish(local_hub, repo, local_finetunes[3 + k], f"{ns}/base") != shas[repo]

    assert cli.main(["merge", "--config", str(out / "merge.yaml"), "--output", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "README.md").read_bytes() == (out / "README.md").read_bytes()
    assert cli.main(["merge", first, second, str(local), "--output", str(moved)]) == 0  # unpinned: follows the Hub
    assert same_tensors(load_file(moved / "model.safetensors"), mean_of([*local_finetunes[3:], local]))


def test_push_to_hub_pushes_the_card_and_its_command_replays_the_merge(hub_world, tmp_path, monkeypatch):
    ns, shas, local = hub_world
    first, second, repo = f"{ns}/ft-0", f"{ns}/ft-1", f"{ns}/merged"
    monkeypatch.chdir(tmp_path)
    assert cli.main(["merge", first, second, str(local), "--output", "merged", "--push-to-hub", repo]) == 0

    card = ModelCard.load(repo)
    assert card.data.base_model == [first, second] and card.data.base_model_relation == "merge"
    assert f"# {repo}" in card.text
    downloaded = Path(snapshot_download(repo, local_dir=tmp_path / "downloaded"))
    assert (downloaded / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()
    (command,) = journeys.card_commands(card.text)
    assert command == "ratatouille-hub merge --config merge.yaml"
    monkeypatch.chdir(downloaded)  # typed as the card says, where the card was downloaded
    assert cli.main(command.split()[1:]) == 0
    assert (downloaded / "merged" / "model.safetensors").read_bytes() == (downloaded / "model.safetensors").read_bytes()


def test_greedy_prints_each_candidate_by_name_with_its_score(hub_world, local_finetunes, tiny_world, tmp_path, capsys):
    """One line per candidate, in the order greedy tries them: its name (Hub id@short sha, a recipe's run as
    `run i from <init>`, a folder by its name), the validation accuracy of the average with it, kept or not."""
    ns, shas, _ = hub_world
    hub_input = f"{ns}/ft-0"
    run = tmp_path / "a-run"
    shutil.copytree(local_finetunes[2], run)
    (run / "ratatouille.json").write_text(
        json.dumps({"fingerprint": "0123456789abcdef", "index": 1, "init": "org/aux@1"})
    )
    plain = local_finetunes[3]
    out = tmp_path / "greedy"
    target = ["--target", str(tiny_world.target), "--image-size", "16"]
    capsys.readouterr()
    assert (
        cli.main(["merge", hub_input, str(run), str(plain), "--method", "greedy", *target, "--output", str(out)]) == 0
    )
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("greedy: ")]

    # by hand: the same inputs (the Hub copy holds local_finetunes[0]'s weights), greedy's rule step by step
    folders = [local_finetunes[0], run, plain]
    names = [f"{hub_input}@{shas[hub_input][:8]}", "run 1 from aux", plain.name]
    options = MergeOptions(
        models=tuple(map(str, folders)), output=str(out), method="greedy", target=str(tiny_world.target), image_size=16
    )
    inputs = validation_inputs(folders, options)
    selected, best = [inputs.ranking[0]], inputs.score([inputs.ranking[0]])
    expected = [f"greedy: {names[selected[0]]}: validation {100 * best:.1f}% kept"]
    tried = {names[selected[0]]: (best, True)}
    for candidate in inputs.ranking[1:]:
        trial = inputs.score([*selected, candidate])
        kept = trial >= best
        tried[names[candidate]] = (trial, kept)
        expected.append(
            f"greedy: {names[candidate]}: validation {100 * trial:.1f}% "
            + ("kept" if kept else "left out (the average lost accuracy)")
        )
        selected, best = ([*selected, candidate], trial) if kept else (selected, best)
    assert printed == expected
    assert same_tensors(load_file(out / "model.safetensors"), mean_of([folders[i] for i in sorted(selected)]))
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None  # a local target: its score is in the text, model-index names Hub datasets
    assert (
        f"Training-domain validation accuracy on the local dataset **{tiny_world.target.name}**: "
        f"{100 * best:.1f}%." in card.text
    )
    assert card.data.base_model == ([hub_input] if 0 in selected else None)
    rows = [line for line in card.text.splitlines() if line.startswith("| ") and "`" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == names  # every input, in the order given
    for row in rows:
        score, kept = tried[row.split(" | ")[0][2:]]
        assert row.endswith(f" | {'merged' if kept else 'left out'} | {100 * score:.1f}% |")


def test_the_python_api_writes_the_bytes_the_command_writes(hub_world, tmp_path):
    ns, shas, local = hub_world
    first = f"{ns}/ft-0"
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    printed: list[str] = []
    # the package's `merge`, called after the engine's submodule of the same name was imported (at the top)
    result = ratatouille_hub.merge(MergeOptions(models=(first, str(local)), output=str(api_out)), echo=printed.append)
    assert ratatouille_hub.merge_engine.WEIGHTS_NAME == "model.safetensors"  # ... which it still reaches
    assert cli.main(["merge", first, str(local), "--output", str(cli_out)]) == 0
    for name in ("model.safetensors", "README.md", "config.json"):
        assert (api_out / name).read_bytes() == (cli_out / name).read_bytes()
    assert result.options.models == (f"{first}@{shas[first]}", str(local))
    assert [m.name for m in result.members] == [f"{first}@{shas[first][:8]}", local.name]
    assert printed == [f"merged 2 models into {api_out}"]


def test_refusals_of_hub_inputs(hub_world, tmp_path, capsys):
    ns, shas, local = hub_world
    out = tmp_path / "o"
    placeholders = {"<ns>": ns, "<folder>": local}
    refusals.fails_cleanly(
        "merge-unknown-hub-id",
        "merge of a Hub id nobody published",
        ["merge", f"{ns}/nobody", str(local), "--output", str(out)],
        f"{ns}/nobody",
        out,
        capsys,
        placeholders,
    )
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"models": [f"{ns}/ft-0@{'0' * 40}", str(local)], "output": str(out)}))
    refusals.fails_cleanly(
        "merge-config-revision-gone",
        "merge --config pinning a commit the repo does not have",
        ["merge", "--config", str(config)],
        f"{ns}/ft-0",
        out,
        capsys,
        {**placeholders, "<config>": config},
    )


def test_a_hub_base_is_pinned_and_named_with_the_method_parameters(hub_world, tiny_checkpoints, tmp_path):
    ns, shas, local = hub_world
    base, first = f"{ns}/base", f"{ns}/ft-0"
    hub_base, folder_base = tmp_path / "hub-base", tmp_path / "folder-base"
    method = ["--method", "interpolate", "--alpha", "0.25"]
    assert cli.main(["merge", first, str(local), *method, "--base", base, "--output", str(hub_base)]) == 0
    assert (
        cli.main(
            ["merge", first, str(local), *method, "--base", str(tiny_checkpoints["base"]), "--output", str(folder_base)]
        )
        == 0
    )
    # the same tensors and record (safetensors' save_file orders an anchored merge's metadata at random, so
    # not the same header bytes: the engine rewrite writes its own header, as the streaming merge does)
    assert same_tensors(load_file(hub_base / "model.safetensors"), load_file(folder_base / "model.safetensors"))
    metadata = [read_safetensors_metadata(out / "model.safetensors") for out in (hub_base, folder_base)]
    assert metadata[0] == metadata[1] and metadata[0]["ratatouille.merge"] == "interpolate"
    assert yaml.safe_load((hub_base / "merge.yaml").read_text())["base"] == f"{base}@{shas[base]}"
    card = ModelCard.load(hub_base / "README.md")
    assert card.data.base_model == [first, base] and card.data.base_model_relation == "merge"
    assert "**interpolate** (alpha = 0.25)" in card.text and f"Base: `{base}@{shas[base]}`" in card.text


def test_ties_takes_its_parameters_from_the_command_and_is_not_recorded_as_a_plain_mean(
    hub_world, tiny_checkpoints, local_finetunes, tmp_path, capsys
):
    """`--parameters density=1 scaling=0.5`: with every entry kept, TIES is base + 0.5 x the mean of the task
    vectors that agree with the elected sign (the sign of their sum), computed here by hand per entry."""
    base = load_file(tiny_checkpoints["base"] / "model.safetensors")
    models = [load_file(folder / "model.safetensors") for folder in local_finetunes[:2]]
    out = tmp_path / "ties"
    argv = ["merge", *map(str, local_finetunes[:2]), "--method", "ties", "--base", str(tiny_checkpoints["base"])]
    assert cli.main([*argv, "--parameters", "density=1", "scaling=0.5", "--output", str(out)]) == 0
    merged = load_file(out / "model.safetensors")
    name = "resnet.embedder.embedder.convolution.weight"
    a, b = (m[name].double() - base[name].double() for m in models)
    sign = torch.sign(a + b)
    agree_a, agree_b = (torch.sign(a) == sign), (torch.sign(b) == sign)
    count = (agree_a.double() + agree_b.double()).clamp(min=1)
    expected = base[name].double() + 0.5 * (a * agree_a + b * agree_b) / count
    assert torch.allclose(merged[name].double(), expected, atol=1e-6)
    assert INGREDIENTS_KEY not in read_safetensors_metadata(out / "model.safetensors")  # `update` cannot grow it
    assert "density = 1" in ModelCard.load(out / "README.md").text.replace("density = 1.0", "density = 1")
    capsys.readouterr()
    assert cli.main([*argv, "--parameters", "density=2", "--output", str(tmp_path / "bad")]) == 2
    assert "density must be" in capsys.readouterr().err
    assert cli.main([*argv, "--parameters", "alpha=2", "--output", str(tmp_path / "bad")]) == 2
    assert "--method ties takes density=VALUE, scaling=VALUE" in capsys.readouterr().err
