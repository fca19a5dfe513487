"""Acceptance test of issue #3: `recycle` against a Hub, end to end, through the installed command.

A local Hub of this module's own (with a token, so writes are authenticated as on the real Hub) is
seeded with a tiny ResNet base, four community fine-tunes that name it in their cards (one of each
kind discovery must refuse, and one good one), and a target dataset in the Hub layout. The unmodified
`ratatouille-hub` command then discovers, fetches, trains, merges and pushes in a subprocess (the HF
clients read their environment once, at import time), and a FRESH subprocess checks what a stranger
would see on the Hub. A second test proves that Hub errors reach the user as one clear line, and that
transient ones are retried into a single commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from transformers import ResNetForImageClassification

from ratatouille_hub.card import build_card
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.discovery import ACCEPTED
from ratatouille_hub.localhub.server import LocalHub, hub_environment
from ratatouille_hub.results import Results
from ratatouille_hub.testing import (
    finetune_of,
    save_tiny_checkpoint,
    tiny_processor,
    tiny_resnet,
    two_run_soup_results,
    write_hub_dataset,
)

ENTRY_POINT = Path(sys.executable).with_name("ratatouille-hub")
SECRET = "hf_acceptance_secret_7f3a9c"  # the hub's write token; must never be written anywhere
COMMIT_TITLE = "Upload Model Ratatouille soup (ratatouille-hub)"
NS = "acceptance"
BASE, WIDE, PICKLED, LEAKY, GOOD = (f"{NS}/{name}" for name in ("resnet-base", "wide", "pickled", "leaky", "good"))
TARGET = f"{NS}/toy-shapes"
SOUP = "me/soup"
WIDE_TENSOR = "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"  # first to differ, in name order
EXPECTED_REASONS = {  # exact wording of discover's verdicts
    WIDE: f"tensor {WIDE_TENSOR} has shape [32, 8, 3, 3], base has [16, 8, 3, 3]",
    PICKLED: "pickle weights only (pytorch_model.bin): never unpickled; needs safetensors",
    LEAKY: f"trained on the target dataset (card lists {TARGET}): leakage",
}


def write_card(folder: Path, **metadata) -> None:
    front = yaml.safe_dump({"library_name": "transformers", **metadata})
    (folder / "README.md").write_text(f"---\n{front}---\n# {folder.name}\n")


def model_folder(folder: Path, model, *, pickle: bool = False, **card) -> Path:
    folder.mkdir(parents=True)
    save_tiny_checkpoint(folder, model, processor=tiny_processor(16), pickle=pickle)
    write_card(folder, **card)
    return folder


def perturbed_finetune(base, seed: int, num_labels: int) -> ResNetForImageClassification:
    """Same architecture as `base`, a trained look (every backbone tensor moved), another head size."""
    return finetune_of(base, tiny_resnet(seed, num_labels=num_labels), seed, integer_value=7)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """This module's own Hub (free port), needing SECRET for writes like the real one needs a token."""
    with LocalHub(tmp_path_factory.mktemp("acceptance-hub"), token=SECRET) as local:
        yield local


def cli_env(hub: LocalHub, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh process pointed at `hub`: nothing of this session's HF settings leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_HUB_"))}
    return {**env, **hub_environment(hub.url, home), "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}


def run_cli(hub: LocalHub, home: Path, *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.exists():
        pytest.skip(f"{ENTRY_POINT} is not installed")
    return subprocess.run(
        [str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=cli_env(hub, home)
    )


def commit_titles(hub: LocalHub, repo_id: str) -> list[str]:
    repo = hub.store.get_repo("model", repo_id)
    return [commit.title for commit in repo.history(repo.resolve("main"))]


# -- the acceptance test ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(hub, tmp_path_factory) -> dict[str, str]:
    """Seed the base, four fine-tunes naming it, and the target dataset; returns repo id -> seeded sha."""
    from ratatouille_hub.toy.world import target_dataset

    root = tmp_path_factory.mktemp("acceptance-world")
    base = tiny_resnet(900, num_labels=10)
    lineage = {"base_model": BASE}
    folders = {  # repo id -> (folder, downloads)
        BASE: (model_folder(root / "base", base, license="mit"), 1000),
        GOOD: (model_folder(root / "good", perturbed_finetune(base, 904, num_labels=5), **lineage), 50),
        WIDE: (model_folder(root / "wide", tiny_resnet(901, num_labels=10, hidden_sizes=(8, 32)), **lineage), 40),
        PICKLED: (model_folder(root / "pickled", perturbed_finetune(base, 902, 10), pickle=True, **lineage), 30),
        LEAKY: (model_folder(root / "leaky", perturbed_finetune(base, 903, 6), datasets=[TARGET], **lineage), 20),
    }
    assert not list((root / "pickled").glob("*.safetensors"))
    shas = {repo_id: hub.seed_model(repo_id, folder, downloads) for repo_id, (folder, downloads) in folders.items()}

    card = "---\nlicense: mit\n---\n# Toy shapes in four domains\n"
    data = write_hub_dataset(target_dataset(per_class_per_domain=4, size=16), root / "toy-shapes", card)
    shas[TARGET] = hub.seed_dataset(TARGET, data)
    return shas


VERIFY = textwrap.dedent(
    """
    import json, sys
    import torch
    from huggingface_hub import HfApi, hf_hub_download
    from transformers import AutoModelForImageClassification

    soup_id, local_soup, good = sys.argv[1:4]
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(917))
    with torch.no_grad():
        remote = AutoModelForImageClassification.from_pretrained(soup_id).eval()(pixel_values=pixels).logits
        local = AutoModelForImageClassification.from_pretrained(local_soup).eval()(pixel_values=pixels).logits
    api = HfApi()
    info = api.model_info(soup_id)
    card = info.card_data
    text = lambda name: open(hf_hub_download(soup_id, name)).read()
    print(json.dumps({
        "equal": torch.equal(remote, local),
        "finite": bool(torch.isfinite(remote).all()),
        "shape": list(remote.shape),
        "merges_of_good": [m.id for m in api.list_models(filter=f"base_model:merge:{good}")],
        "base_model": card.base_model,
        "base_model_relation": card.to_dict().get("base_model_relation"),
        "eval_results": len(card.eval_results or []),
        "private": info.private,
        "files": sorted(s.rfilename for s in info.siblings),
        "readme": text("README.md"),
        "recipe": text("recipe.yaml"),
        "results": text("results.json"),
    }))
    """
)


def test_recycle_discovers_trains_merges_and_pushes_a_findable_soup(hub, world, tmp_path):
    out = tmp_path / "out"
    argv = [
        "recycle",
        "--base",
        BASE,
        "--target",
        TARGET,
        "--test-domain",
        "sketch",
        "--runs",
        "2",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--lp-steps",
        "3",
        "--warmup-steps",
        "1",
        "--batch-size",
        "2",
        "--image-size",
        "16",
        "--output",
        str(out),
        "--push-to-hub",
        SOUP,
        "--token",
        SECRET,
    ]
    result = run_cli(hub, tmp_path / "hf-home", *argv, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    # Discovery's table (progress in recycle: stderr): one row per fine-tune, each bad one refused with its
    # reason, the good one accepted.
    rows = {repo: [line for line in result.stderr.splitlines() if line.split()[:1] == [repo]] for repo in world}
    for repo, reason in EXPECTED_REASONS.items():
        assert len(rows[repo]) == 1, result.stderr
        assert " refused " in rows[repo][0] and rows[repo][0].endswith(reason), rows[repo]
        assert world[repo][:8] in rows[repo][0]  # judged at the seeded commit
    assert len(rows[GOOD]) == 1 and " accepted " in rows[GOOD][0] and rows[GOOD][0].endswith(ACCEPTED), rows[GOOD]
    assert not rows[BASE]  # the base is not its own fine-tune
    assert f"[fetch] recycled {GOOD}@{world[GOOD]}" in result.stderr
    assert not any(
        refused in line
        for line in result.stderr.splitlines()
        if line.startswith("[fetch]")
        for refused in EXPECTED_REASONS
    )
    assert not [r for r in hub.requests if r.method == "GET" and r.path.endswith(".bin")]  # no pickle fetched
    assert (out / "soup/model.safetensors").is_file()
    assert commit_titles(hub, SOUP) == [COMMIT_TITLE, "initial commit"]

    # What a stranger sees, from a fresh process with an empty cache and no token.
    verify = subprocess.run(
        [sys.executable, "-c", VERIFY, SOUP, str(out / "soup"), GOOD],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=cli_env(hub, tmp_path / "fresh-hf-home"),
    )
    assert verify.returncode == 0, verify.stderr[-3000:]
    seen = json.loads(verify.stdout.strip().splitlines()[-1])
    assert seen["equal"] and seen["finite"] and seen["shape"] == [3, 6]  # the six target shapes
    assert seen["merges_of_good"] == [SOUP]
    assert isinstance(seen["base_model"], list) and {BASE, GOOD} <= set(seen["base_model"])
    assert not {WIDE, PICKLED, LEAKY} & set(seen["base_model"])
    assert seen["base_model_relation"] == "merge"
    assert seen["eval_results"] >= 1 and "model-index:" in seen["readme"].split("\n---", 1)[0]
    assert f'model="{SOUP}"' in seen["readme"]
    assert seen["private"] is False
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "recipe.yaml",
        "results.json",
    } <= set(seen["files"])

    recipe, results = yaml.safe_load(seen["recipe"]), Results.from_dict(json.loads(seen["results"]))
    pinned = (f"{BASE}@{world[BASE]}", f"{TARGET}@{world[TARGET]}", [f"{GOOD}@{world[GOOD]}"])
    assert (recipe["base"], recipe["target"], recipe["discovered"]) == pinned and recipe["runs"] == 2
    assert results.test_domain == "sketch" and len(results.runs) == 2
    assert [i.source for i in results.ingredients] == [BASE, GOOD]
    assert not [key for key in recipe if "token" in key] and not [key for key in results.recipe if "token" in key]
    for name in ("recipe", "results", "readme"):
        assert SECRET not in seen[name], name
    for file in (out / "soup").iterdir():
        assert SECRET.encode() not in file.read_bytes(), file
    assert SECRET not in (out / "recipe.yaml").read_text()
    assert not (tmp_path / "hf-home/token").exists()  # the token was used, never saved


# -- Hub errors: one clear line each; transient ones retried into one commit ---------------------------


@pytest.fixture(scope="module")
def soup(tmp_path_factory) -> Path:
    """A small soup folder as the recipe writes it (no training: only what `push` reads)."""
    folder = tmp_path_factory.mktemp("acceptance-soup")
    save_tiny_checkpoint(folder, tiny_resnet(950, num_labels=3), processor=tiny_processor(16))
    config = RecipeConfig(base=BASE, target=TARGET, aux=(GOOD,), runs=2, steps=1, lp_steps=1)
    config.save_yaml(folder / "recipe.yaml")
    results = two_run_soup_results(config, BASE, GOOD, train_domains=("cartoon", "painting", "photo"))
    results.save(folder / "results.json")
    build_card(results).save(folder / "README.md")
    return folder


# case -> (command, token?, injected [(route, status)], expected exit, text the one error line must hold)
ERROR_CASES = {
    "push-without-token-401": ("push", False, [], 2, "401"),
    "push-forbidden-403": ("push", True, [("commit", 403)], 2, "403"),
    "discover-unknown-base": ("discover", True, [], 2, "does-not/exist"),
    "push-429-retried": ("push", True, [("preupload", 429), ("commit", 429)], 0, None),
    "push-500-retried": ("push", True, [("preupload", 500), ("commit", 500)], 0, None),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_hub_errors_are_one_clear_line_and_transient_ones_are_retried(case, hub, soup, tmp_path):
    command, with_token, faults, expected_exit, expected_text = ERROR_CASES[case]
    repo_id = f"errors/{case}"
    argv = ["push", repo_id, str(soup)] if command == "push" else ["discover", "--base", "does-not/exist"]
    if with_token:
        argv += ["--token", SECRET]
    for route, status in faults:  # each answers once, then the route works again
        hub.inject_failures(f"^/api/models/{repo_id}/{route}/", [status], method="POST")

    result = run_cli(hub, tmp_path / "hf-home", *argv, cwd=tmp_path)
    assert result.returncode == expected_exit, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert SECRET not in result.stderr + result.stdout
    if expected_exit:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected_text in lines[0], lines[0]
        if command == "push" and not faults:  # refused before anything was created
            assert repo_id not in {r.repo_id for r in hub.store.repos("model")}
        if faults:  # the repo was created, but no commit landed
            assert commit_titles(hub, repo_id) == ["initial commit"]
    else:
        assert f"pushed {soup} to " in result.stdout
        assert commit_titles(hub, repo_id) == [COMMIT_TITLE, "initial commit"]  # exactly one commit
        answers = {
            route: [r.status for r in hub.requests if r.path.startswith(f"/api/models/{repo_id}/{route}/")]
            for route, _ in faults
        }
        # The failed commit is retried whole (a preupload again, then the commit): one failure each, then success.
        assert answers == {route: [status, *[200] * (len(answers[route]) - 1)] for route, status in faults}
        assert answers["commit"] == [faults[-1][1], 200]
