"""Discovery of recyclable fine-tunes and pinned fetching, through the local Hub and the unmodified clients.

The seeded world: a tiny ResNet base and its community "fine-tunes", one for each way a candidate
can be refused, one good one with a head of another size, and a declared merge that must not be
listed at all.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jsondoc
import pytest
import yaml
from huggingface_hub import HfApi

from ratatouille_hub.discovery import ACCEPTED, DiscoverError, discover_finetunes, format_candidates
from ratatouille_hub.fetch import FetchError, resolve_dataset, resolve_model
from ratatouille_hub.testing import save_tiny_checkpoint, tiny_resnet

TARGET_ON_HUB = "flwrlabs/pacs"
WIDE_TENSOR = "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"  # first to differ, in name order


def model_folder(root: Path, model, *, pickle: bool = False, config_extra: dict | None = None, **card) -> Path:
    """A repo folder: safetensors (or only a torch pickle), config.json, and a card with `card` as metadata."""
    root.mkdir(parents=True)
    save_tiny_checkpoint(root, model, pickle=pickle)
    if config_extra:
        config = json.loads((root / "config.json").read_text())
        (root / "config.json").write_text(json.dumps({**config, **config_extra}))
    (root / "README.md").write_text(f"---\n{yaml.safe_dump({'library_name': 'transformers', **card})}---\n# model\n")
    return root


@dataclass
class World:
    ns: str
    base: str
    shas: dict[str, str]  # repo id -> seeded commit
    candidates: list
    requests: list  # every request about this world's repos, made by discovery alone


@pytest.fixture(scope="module")
def world(local_hub, new_hub_namespace, tmp_path_factory) -> World:
    ns, root = new_hub_namespace(), tmp_path_factory.mktemp("discover-world")
    base = f"{ns}/base"
    lineage = {"base_model": base}
    repos = {  # name -> (folder, downloads)
        "base": (model_folder(root / "base", tiny_resnet(100)), 1000),
        "good": (model_folder(root / "good", tiny_resnet(101, num_labels=7), **lineage), 50),
        "wide": (model_folder(root / "wide", tiny_resnet(102, hidden_sizes=(8, 32)), **lineage), 40),
        "pickled": (model_folder(root / "pickled", tiny_resnet(103), pickle=True, **lineage), 30),
        "leaky": (model_folder(root / "leaky", tiny_resnet(104), datasets=[TARGET_ON_HUB], **lineage), 20),
        "remote-code": (
            model_folder(root / "remote", tiny_resnet(105), config_extra={"auto_map": {"AutoModel": "m.M"}}, **lineage),
            10,
        ),
        "merged": (model_folder(root / "merged", tiny_resnet(106), base_model_relation="merge", **lineage), 500),
    }
    shas = {
        f"{ns}/{name}": local_hub.seed_model(f"{ns}/{name}", folder, downloads)
        for name, (folder, downloads) in repos.items()
    }
    candidates = discover_finetunes(base, target="PACS")
    requests = [r for r in local_hub.requests if f"/{ns}/" in r.path or f"base_model%3Afinetune%3A{ns}" in r.path]
    return World(ns, base, shas, candidates, requests)


def test_discovery_gives_each_finetune_a_verdict_and_reason(world):
    ns = world.ns
    verdicts = [(c.repo_id, c.downloads, c.accepted, c.reason) for c in world.candidates]
    assert verdicts == [
        (f"{ns}/good", 50, True, ACCEPTED),  # 7 labels against the base's 3: only the head differs
        (f"{ns}/wide", 40, False, f"tensor {WIDE_TENSOR} has shape [32, 8, 3, 3], base has [16, 8, 3, 3]"),
        (f"{ns}/pickled", 30, False, "pickle weights only (pytorch_model.bin): never unpickled; needs safetensors"),
        (f"{ns}/leaky", 20, False, f"trained on the target dataset (card lists {TARGET_ON_HUB}): leakage"),
        (f"{ns}/remote-code", 10, False, "needs remote code (auto_map in config.json), which is never run"),
    ]
    assert all(c.revision == world.shas[c.repo_id] for c in world.candidates)


def test_discovery_downloads_no_weights(world):
    resolves = [r for r in world.requests if "/resolve/" in r.path]
    weight_gets = [r for r in resolves if r.method == "GET" and r.path.endswith((".safetensors", ".bin"))]
    assert weight_gets and all(r.status == 206 for r in weight_gets)  # ranged reads of headers only
    assert {r.path.split("/resolve/")[0] for r in weight_gets} == {f"/{world.ns}/{n}" for n in ("base", "good", "wide")}
    assert not any(r.path.endswith(".bin") for r in resolves)
    cached = Path(os.environ["HF_HOME"], "hub").glob(f"models--{world.ns}--*/snapshots/*/*")
    assert {p.name for p in cached} == {"config.json"}


def test_format_candidates_is_one_row_per_candidate(world):
    table = format_candidates(world.candidates).splitlines()
    assert table[0].split() == ["id", "revision", "downloads", "verdict", "reason"]
    good = world.candidates[0]
    assert table[1].split()[:4] == [good.repo_id, good.revision[:8], "50", "accepted"]
    assert table[3].split()[3] == "refused" and table[3].endswith("needs safetensors")


def test_discovery_without_target_keeps_a_finetune_trained_on_it(world):
    leaky = [c for c in discover_finetunes(world.base, limit=4) if c.repo_id.endswith("/leaky")]
    assert [(c.accepted, c.reason) for c in leaky] == [(True, ACCEPTED)]


def test_discovery_of_an_unknown_base_says_so(world):
    with pytest.raises(DiscoverError, match=f"base {world.ns}/nothing"):
        discover_finetunes(f"{world.ns}/nothing")


def test_fetch_pins_the_vetted_commit(local_hub, hub_namespace, tmp_path):
    repo_id = f"{hub_namespace}/evolving"
    first = local_hub.seed_model(repo_id, model_folder(tmp_path / "v1", tiny_resnet(110)))
    old_weights = (tmp_path / "v1/model.safetensors").read_bytes()
    tiny_resnet(111).save_pretrained(tmp_path / "v2")
    new_weights = (tmp_path / "v2/model.safetensors").read_bytes()
    second = HfApi().upload_file(path_or_fileobj=new_weights, path_in_repo="model.safetensors", repo_id=repo_id).oid

    pinned = resolve_model(repo_id, revision=first)
    assert pinned.revision == first and (pinned.path / "model.safetensors").read_bytes() == old_weights
    latest = resolve_model(repo_id)
    assert latest.revision == second and (latest.path / "model.safetensors").read_bytes() == new_weights


def test_fetch_refuses_a_pickle_only_repo(world):
    with pytest.raises(FetchError, match="no safetensors weights"):
        resolve_model(f"{world.ns}/pickled")


def test_resolve_dataset_maps_aliases_and_says_when_none_is_known(tmp_path):
    assert resolve_dataset("PACS") == ("flwrlabs/pacs", "domain", "label")
    assert resolve_dataset("office_home") == ("flwrlabs/office-home", "domain", "label")
    assert resolve_dataset("me/vlcs", "site", "y") == ("me/vlcs", "site", "y")
    (tmp_path / "pacs").mkdir()
    assert resolve_dataset(str(tmp_path / "pacs")) == (str(tmp_path / "pacs"), "domain", "label")
    for name in ("VLCS", "TerraIncognita", "DomainNet"):
        with pytest.raises(FetchError, match=f"^{name}: no Hub copy with a domain column is known"):
            resolve_dataset(name)


def test_discover_json_holds_every_verdict_and_the_api_returns_the_same_record(world, capsys):
    from ratatouille_hub import DiscoverOptions, cli, discover
    from ratatouille_hub.records import to_jsonable

    def downloads() -> dict[str, int]:  # the Hub's count now: every config.json vetting reads counts one
        return {m.id: m.downloads for m in HfApi().list_models(filter=f"base_model:finetune:{world.base}")}

    listed = downloads()
    assert cli.main(["discover", "--base", world.base, "--target", "PACS", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ns, shas = world.ns, world.shas
    verdicts = {
        "good": (True, ACCEPTED),  # 7 labels against the base's 3: only the head differs
        "wide": (False, f"tensor {WIDE_TENSOR} has shape [32, 8, 3, 3], base has [16, 8, 3, 3]"),
        "pickled": (False, "pickle weights only (pytorch_model.bin): never unpickled; needs safetensors"),
        "leaky": (False, f"trained on the target dataset (card lists {TARGET_ON_HUB}): leakage"),
        "remote-code": (False, "needs remote code (auto_map in config.json), which is never run"),
    }
    assert printed == {
        "base": world.base,
        "target": TARGET_ON_HUB,  # the alias PACS, resolved
        "candidates": [
            {
                "repo_id": f"{ns}/{name}",
                "revision": shas[f"{ns}/{name}"],
                "downloads": listed[f"{ns}/{name}"],
                "accepted": accepted,
                "reason": reason,
                "readable": True,
            }
            for name, (accepted, reason) in verdicts.items()
        ],
    }
    listed = downloads()
    again = to_jsonable(discover(DiscoverOptions(base=world.base, target="PACS")))
    assert [c.pop("downloads") for c in again["candidates"]] == [listed[c["repo_id"]] for c in again["candidates"]]
    assert again == {
        **printed,
        "candidates": [{k: v for k, v in c.items() if k != "downloads"} for c in printed["candidates"]],
    }
    assert jsondoc.undocumented(printed, "discover") == []


def test_discover_quiet_prints_nothing_and_its_exit_code_says_whether_it_worked(world, capsys):
    from ratatouille_hub import cli

    assert cli.main(["discover", "--base", world.base, "--format", "quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert cli.main(["discover", "--base", f"{world.ns}/nothing", "--format", "quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: base {world.ns}/nothing")


def test_a_headless_base_on_the_hub_is_read_as_its_classifier_fine_tunes_name_it(
    local_hub, new_hub_namespace, tmp_path
):
    """The Hub's usual ViT base is a ViTModel; its fine-tunes are ViTForImageClassification (`vit.` before
    its tensor names, no pooler): accepted, where they were refused as 'the base is headless'. A classifier
    of the same names in other shapes (a larger ViT) is still refused, naming the tensor."""
    from transformers import ViTModel

    from ratatouille_hub.testing import perturbed_backbone, tiny_vit

    ns = new_hub_namespace()
    classifier = tiny_vit(0)
    headless = ViTModel(classifier.config)
    headless.load_state_dict(classifier.vit.state_dict(), strict=False)
    tuned = tiny_vit(1, num_labels=5)
    tuned.load_state_dict(perturbed_backbone(classifier.state_dict(), 7, scale=0.002), strict=False)
    lineage = {"base_model": f"{ns}/vit-base"}
    repos = {
        "vit-base": (model_folder(tmp_path / "base", headless), 100),
        "vit-finetune": (model_folder(tmp_path / "finetune", tuned, **lineage), 20),
        "vit-larger": (model_folder(tmp_path / "larger", tiny_vit(2, hidden_size=32), **lineage), 10),
    }
    for name, (folder, downloads) in repos.items():
        local_hub.seed_model(f"{ns}/{name}", folder, downloads)
    verdicts = [(c.repo_id, c.accepted, c.reason) for c in discover_finetunes(f"{ns}/vit-base")]
    assert verdicts == [
        (f"{ns}/vit-finetune", True, ACCEPTED),
        (
            f"{ns}/vit-larger",
            False,
            "tensor vit.embeddings.cls_token has shape [1, 1, 32], base has [1, 1, 16]",
        ),
    ]
