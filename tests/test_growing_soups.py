"""Soups that grow on the Hub, against the local Hub with the unmodified clients: two contributors push runs
of one recipe from two processes with their own tokens, a third assembles the soup from the Hub without the
data (the same weights as a local merge), a run of another recipe is refused, and an update adds a run in
one commit to a soup that `from_pretrained` and `pipeline` then load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, get_safetensors_metadata
from PIL import Image
from safetensors.torch import load_file

from ratatouille_hub import cli, recycle
from ratatouille_hub.merge_engine import read_safetensors_metadata
from ratatouille_hub.provenance import INGREDIENTS_KEY, RUN_FILE
from ratatouille_hub.results import Results
from ratatouille_hub.testing import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "carol": "tok-carol"}  # conftest.CONTRIBUTORS


def contribute(user: str, output, to: str, *indices: int) -> subprocess.Popen:
    """A contributor's own process, with that contributor's token."""
    argv = [sys.executable, "-m", "ratatouille_hub", "contribute", str(output), "--to", to]
    env = {**os.environ, "HF_TOKEN": TOKENS[user], "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*argv, "--index", *map(str, indices)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


def same_tensors(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def recipes(tiny_world, tmp_path_factory):
    """One recipe's three finished runs, and one run of another recipe (another split seed) on the same base."""
    root = tmp_path_factory.mktemp("growing")
    results = recycle(tiny_recipe(tiny_world, root / "out"), echo=lambda line: None)
    recycle(tiny_recipe(tiny_world, root / "other", seed=1).replace(runs=1), echo=lambda line: None)
    return root, results


def test_contributed_runs_grow_a_soup_on_the_hub(recipes, local_hub, tmp_path, capsys):
    root, results = recipes
    out = root / "out"
    runs = [out / run.folder / "model" for run in results.runs]

    # alice contributes runs 0 and 1 while carol contributes a run of another recipe, in two processes
    alice, carol = contribute("alice", out, "alice/shapes", 0, 1), contribute("carol", root / "other", "carol/other", 0)
    assert "[hub] run 1 ->" in finish(alice) and "[hub] run 0 ->" in finish(carol)
    api = HfApi()
    provenance = json.loads(open(api.hf_hub_download("alice/shapes-run1", RUN_FILE)).read())
    card = ModelCard.load("alice/shapes-run1")
    assert f"ratatouille-recipe:{provenance['fingerprint']}" in card.data.tags
    assert f"{100 * results.runs[1].val_accuracy:.1f}%" in card.text
    assert provenance["run"]["init"] == results.runs[1].init and provenance["recipe"]["test_domain"] == "cartoon"

    # anyone can tag a repo: one without valid provenance is refused, not fatal
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "config.json"):
        (broken / name).write_bytes((runs[0] / name).read_bytes())
    (broken / RUN_FILE).write_text("{}")
    tags = ["ratatouille-run", f"ratatouille-base:{provenance['recipe']['base'].split('@')[0]}"]
    ModelCard(f"---\ntags: {json.dumps(tags)}\n---\n# broken\n").save(broken / "README.md")
    assert cli.main(["push", "carol/broken-run0", str(broken), "--token", TOKENS["carol"]]) == 0

    # someone without the data assembles every run of alice's recipe: carol's is refused in one line
    assert cli.main(["assemble", str(tmp_path / "soup2"), "--from-hub", "alice/shapes-run0"]) == 0
    printed = capsys.readouterr().err  # warnings: the soup is made without them
    assert "refused carol/other-run0: a run of another recipe (differs in: head_sha256, split)" in printed
    assert "refused carol/broken-run0: no valid ratatouille.json" in printed
    assert cli.main(["merge", str(runs[0]), str(runs[1]), "--output", str(tmp_path / "local2")]) == 0
    assert same_tensors(tmp_path / "soup2" / "model.safetensors", tmp_path / "local2" / "model.safetensors")
    entries = json.loads(read_safetensors_metadata(tmp_path / "soup2" / "model.safetensors")[INGREDIENTS_KEY])
    assert [e["source"].split("@")[0] for e in entries] == ["alice/shapes-run0", "alice/shapes-run1"]

    # carol publishes the soup; bob contributes run 2 from his own process; bob may not write as alice
    env_token = {"token": TOKENS["carol"]}
    assert cli.main(["push", "carol/shapes-soup", str(tmp_path / "soup2"), "--token", env_token["token"]]) == 0
    assert "[hub] run 2 ->" in finish(contribute("bob", out, "bob/shapes", 2))
    refused = contribute("bob", out, "alice/shapes", 2)
    text, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "403" in text and "tok-bob" not in text

    # the update downloads only the soup and bob's run, and pushes one commit
    head = api.model_info("carol/shapes-soup").sha
    start = len(local_hub.requests)
    argv = ["update", "carol/shapes-soup", "--add", "bob/shapes-run2", "--token", TOKENS["carol"]]
    assert cli.main(argv) == 0
    requests = local_hub.requests[start:]
    downloads = {r.path for r in requests if r.route == "_resolve"}
    assert downloads and all("carol/shapes-soup" in p or "bob/shapes-run2" in p for p in downloads), downloads
    assert [r.path.split("/commit/")[0] for r in requests if r.route == "_commit"] == ["/api/models/carol/shapes-soup"]
    assert api.model_info("carol/shapes-soup").sha != head
    metadata = get_safetensors_metadata("carol/shapes-soup").files_metadata["model.safetensors"].metadata
    assert len(json.loads(metadata[INGREDIENTS_KEY])) == 3

    # it loads with the stock classes and equals recycle's own soup of the three runs within the bound
    from transformers import AutoModelForImageClassification, pipeline

    model = AutoModelForImageClassification.from_pretrained("carol/shapes-soup")
    merged = load_file(out / "soup" / "model.safetensors")
    eps = torch.finfo(torch.float32).eps
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert (tensor - merged[name]).abs().max() <= 5 * eps * max(merged[name].abs().max(), 1e-30), name
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    predictions = pipeline("image-classification", model="carol/shapes-soup")(image)
    assert {p["label"] for p in predictions} <= set(Results.load(out / "soup" / "results.json").id2label.values())
    assert "3 runs of one recipe" in ModelCard.load("carol/shapes-soup").text


def test_runs_of_a_headless_hub_base_are_contributed_and_assembled(local_hub, new_hub_namespace, tiny_world, tmp_path):
    """A recipe on the Hub's usual kind of ViT base (a headless ViTModel): its runs are measured against the
    base read under their own names (`vit.`), its config's architectures naming the base class, not the
    classifier; assembled from the Hub, they give the local soup's tensors. (Recycling such a base was refused;
    then assembling was, as 'config.json differs from the base's in: architectures'.)"""
    from transformers import ViTModel

    from ratatouille_hub.testing import perturbed_backbone, save_tiny_checkpoint, tiny_processor, tiny_vit

    ns = new_hub_namespace()
    classifier = tiny_vit(0)
    headless = ViTModel(classifier.config)
    headless.load_state_dict(classifier.vit.state_dict(), strict=False)
    base = f"{ns}/vit-base"
    local_hub.seed_model(base, save_tiny_checkpoint(tmp_path / "base", headless, processor=tiny_processor(16)))
    tuned = tiny_vit(1, num_labels=5)
    tuned.load_state_dict(perturbed_backbone(classifier.state_dict(), 7, scale=0.002), strict=False)
    finetune = save_tiny_checkpoint(tmp_path / "finetune", tuned, processor=tiny_processor(16))
    out = tmp_path / "out"
    recycle(tiny_recipe(tiny_world, out).replace(base=base, aux=(str(finetune),), runs=2), echo=print)
    repo = f"alice/{ns}-vit"
    assert cli.main(["contribute", str(out), "--to", repo, "--index", "0", "1", "--token", "tok-alice"]) == 0
    assert cli.main(["assemble", str(tmp_path / "assembled"), "--from-hub", f"{repo}-run0"]) == 0
    assert same_tensors(tmp_path / "assembled" / "model.safetensors", out / "soup" / "model.safetensors")
