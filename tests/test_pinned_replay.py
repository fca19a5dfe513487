"""Issue 20, item 2: the plan pins everything it reads, and a saved recipe replays exactly what was planned.

A tiny world on the session's local Hub (a base, a fine-tune naming it, a target dataset) is recycled with
discovery; then the Hub changes under it (a new fine-tune of the base, new commits on the base and on the
target). The same command into the same folder must say what changed instead of following it; the saved
recipe must replay the same runs and the same soup bytes, in that folder and in a fresh one; and
re-discovering is a flag the user passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ratatouille_hub import cli, intertraining
from ratatouille_hub.data import decode_images
from ratatouille_hub.testing import finetune_of, save_tiny_checkpoint, tiny_processor, tiny_resnet, write_hub_dataset
from ratatouille_hub.toy.world import target_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--runs", "2", "--steps", "2", "--eval-every", "2", "--lp-steps", "2", "--warmup-steps", "1"]
TINY += ["--batch-size", "2", "--image-size", "16", "--test-domain", "sketch"]


def seed_model(local_hub, repo_id: str, folder: Path, downloads: int, base: str | None = None) -> str:
    copy = folder.parent / f"{folder.name}-{repo_id.replace('/', '--')}-{downloads}"
    shutil.copytree(folder, copy)
    card = {"library_name": "transformers", **({"base_model": base} if base else {})}
    (copy / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n# {folder.name}\n")
    return local_hub.seed_model(repo_id, copy, downloads)


def finetune(root: Path, base_folder: Path, name: str, seed: int) -> Path:
    from transformers import ResNetForImageClassification

    base = ResNetForImageClassification.from_pretrained(base_folder)
    model = finetune_of(base, tiny_resnet(seed, num_labels=4), seed, integer_value=seed)
    return save_tiny_checkpoint(root / name, model, processor=tiny_processor(16))


def snapshot(out: Path) -> tuple[bytes, list[str], list[str]]:
    """The soup's bytes, the runs it was made of, and every finished run in the folder."""
    runs = [run["folder"] for run in json.loads((out / "soup" / "results.json").read_text())["runs"]]
    finished = sorted(p.parent.name for p in (out / "runs").glob("*/done"))
    return (out / "soup" / "model.safetensors").read_bytes(), runs, finished


def test_a_saved_recipe_replays_what_was_planned_whatever_the_hub_holds_now(
    local_hub, hub_namespace, tiny_checkpoints, tiny_world, tmp_path, capsys
):
    ns = hub_namespace
    base_id, first, second, target_id = f"{ns}/base", f"{ns}/ft-first", f"{ns}/ft-second", f"{ns}/shapes"
    base_sha = seed_model(local_hub, base_id, tiny_checkpoints["base"], 100)
    first_sha = seed_model(local_hub, first, finetune(tmp_path, tiny_checkpoints["base"], "first", 2001), 10, base_id)
    target_sha = local_hub.seed_dataset(target_id, tiny_world.target)
    out = tmp_path / "out"
    command = ["recycle", "--base", base_id, "--target", target_id, *TINY, "--output", str(out)]
    assert cli.main([*command, "--strategy", "erm"]) == 0  # recycles nothing: discovers nothing
    assert yaml.safe_load((out / "recipe.yaml").read_text())["discovered"] == []
    assert cli.main(command) == 0  # another strategy into the same folder: its runs from the base are shared
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (saved["base"], saved["target"]) == (f"{base_id}@{base_sha}", f"{target_id}@{target_sha}")
    assert saved["discovered"] == [f"{first}@{first_sha}"] and saved["aux"] == [] and saved["rediscover"] is False
    soup_recipe = yaml.safe_load((out / "soup" / "recipe.yaml").read_text())
    assert {k: soup_recipe[k] for k in ("base", "target", "discovered")} == {
        k: saved[k] for k in ("base", "target", "discovered")
    }
    planned = snapshot(out)

    # someone publishes another fine-tune of the base: the same command says so instead of planning it
    second_sha = seed_model(
        local_hub, second, finetune(tmp_path, tiny_checkpoints["base"], "second", 2002), 50, base_id
    )
    capsys.readouterr()
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert f"differs in: discovered fine-tunes: + {second}@{second_sha}; - none" in error
    assert f"replay it exactly with --config {out / 'recipe.yaml'}" in error and "--rediscover" in error

    # ... and the base and the target get new commits: a replay still reads what the plan read
    seed_model(local_hub, base_id, tiny_checkpoints["aux1"], 100)
    new_rows = write_hub_dataset(
        target_dataset(per_class_per_domain=2, size=16),
        tmp_path / "shapes-v2",
        card="---\nlicense: apache-2.0\n---\n# shapes v2\n",
    )
    local_hub.seed_dataset(target_id, new_rows)
    capsys.readouterr()
    assert cli.main(command) == 2
    assert "base: " in capsys.readouterr().err  # the base moved: another recipe, said with its revisions

    assert cli.main(["recycle", "--config", str(out / "recipe.yaml")]) == 0
    assert snapshot(out) == planned  # nothing trained again, the soup rewritten with the same bytes
    elsewhere = tmp_path / "elsewhere"
    assert cli.main(["recycle", "--config", str(out / "recipe.yaml"), "--output", str(elsewhere)]) == 0
    assert snapshot(elsewhere)[:2] == planned[:2]  # whoever replays it, wherever: the same runs, the same soup

    # re-discovering is the user's explicit choice; the pinned base and target stay pinned
    assert cli.main(["recycle", "--config", str(out / "recipe.yaml"), "--rediscover"]) == 0
    rediscovered = yaml.safe_load((out / "recipe.yaml").read_text())
    assert rediscovered["discovered"] == [f"{second}@{second_sha}", f"{first}@{first_sha}"]  # most downloaded first
    assert (rediscovered["base"], rediscovered["target"]) == (saved["base"], saved["target"])


def test_intertrain_pins_what_it_read_and_spreads_over_array_tasks(
    local_hub, hub_namespace, tiny_checkpoints, tmp_path, capsys, monkeypatch
):
    """`intertrain --config recipe.yaml` replays the same fine-tunes after the base and the dataset moved on, and
    `--index I` makes fine-tune I alone (one array task each), which the command without it then reuses, with
    no decoding of the dataset."""
    from ratatouille_hub.toy.world import aux_datasets

    ns = hub_namespace
    base_id, data_id = f"{ns}/base", f"{ns}/stripes"
    base_sha = seed_model(local_hub, base_id, tiny_checkpoints["base"], 1)
    stripes = aux_datasets(per_class=4, size=16)["stripes"]
    data_sha = local_hub.seed_dataset(data_id, write_hub_dataset(stripes, tmp_path / "stripes", card=None))
    out = tmp_path / "intertrain"
    command = ["intertrain", "--base", base_id, "--dataset", data_id, "--runs", "2", "--steps", "2"]
    command += ["--batch-size", "4", "--image-size", "16", "--output", str(out)]

    def made(argv: list[str]) -> dict[int, Path]:
        assert cli.main(argv) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        return {
            int(line.split()[1][:-1]): Path(line.split(": ", 1)[1])
            for line in printed.splitlines()
            if line.startswith("fine-tune ")
        }

    decoded = []  # the dataset is decoded only when a fine-tune is left to train
    monkeypatch.setattr(intertraining, "decode_images", lambda *a, **k: decoded.append(1) or decode_images(*a, **k))
    second = made([*command, "--index", "1"])
    assert list(second) == [1] and [p.parent for p in (out / "runs").glob("*/done")] == [second[1]]
    first = made([*command, "--index", "0"])
    assert len(decoded) == 2
    assert made([*command, "--index", "0"]) == first and len(decoded) == 2
    both = made(command)
    assert both == {0: first[0], 1: second[1]} and len(decoded) == 2  # both reused, nothing decoded
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (saved["base"], saved["dataset"]) == (f"{base_id}@{base_sha}", f"{data_id}@{data_sha}")

    seed_model(local_hub, base_id, tiny_checkpoints["aux1"], 1)  # the base and the dataset move on
    local_hub.seed_dataset(
        data_id, write_hub_dataset(aux_datasets(per_class=2, size=16)["dots"], tmp_path / "dots", card=None)
    )
    replayed = made(["intertrain", "--config", str(out / "recipe.yaml"), "--output", str(tmp_path / "replay")])
    assert len(decoded) == 3  # two fine-tunes trained from one decoding
    for run in (0, 1):
        assert replayed[run].name == both[run].name  # the same keys: the same base, data and hparams
        assert (replayed[run] / "model.safetensors").read_bytes() == (both[run] / "model.safetensors").read_bytes()
    assert cli.main([*command, "--index", "2"]) == 2
    assert "--index 2: this intertrain makes fine-tunes 0 to 1" in capsys.readouterr().err
