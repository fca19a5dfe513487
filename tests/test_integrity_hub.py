"""Issue 19, cause 5: Hub content is trusted too much. Each test seeds a tiny world on the session's local
Hub (a base and fine-tunes naming it in their cards) and runs the command a user would.

1. Bytes that differ from the sha256 the Hub lists are refused, and never stay in the cache.
2. A discovered fine-tune that fails fetching or vetting is refused in the log and the recipe goes on;
   file names that could escape the download folder are refused by discovery, before any download.
3. A transient Hub failure is retried; one that persists marks the candidate unreadable, with a warning.
4. Strings from the Hub reach the terminal escaped: no screen clearing, no forged table row.
5. Error lines name the repo: a gated repo says how to get access, a bad weight names `org/name@sha/file`,
   not a path inside the HF cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import refusals
import yaml
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

from ratatouille_hub import cli, fetch
from ratatouille_hub.discovery import ACCEPTED, head_names_of, local_signature, unsafe_file_name
from ratatouille_hub.fetch import resolve_model
from ratatouille_hub.localhub.store import FileEntry
from ratatouille_hub.testing import finetune_of, save_tiny_checkpoint, tiny_processor, tiny_resnet
from ratatouille_hub.vetting import distance_to_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--runs", "1", "--steps", "2", "--eval-every", "2", "--lp-steps", "2", "--warmup-steps", "1"]
TINY += ["--batch-size", "2", "--image-size", "16", "--test-domain", "sketch"]
CONV = "resnet.embedder.embedder.convolution.weight"  # a backbone kernel every tiny ResNet has
BAD_BYTES = "does not match the sha256 the Hub lists for it"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoints) -> SimpleNamespace:
    """Local model folders to seed: the base, fine-tunes of it with weights of their own (a corrupted blob
    must not be shared with any other repo), and a stranger of the same shapes."""
    from transformers import ResNetForImageClassification

    root = tmp_path_factory.mktemp("integrity-hub-models")
    base_model = ResNetForImageClassification.from_pretrained(tiny_checkpoints["base"])
    processor = tiny_processor(16)

    def finetune(name: str, seed: int) -> Path:
        model = finetune_of(base_model, tiny_resnet(seed, num_labels=4), seed, integer_value=seed)
        return save_tiny_checkpoint(root / name, model, processor=processor)

    found = SimpleNamespace(
        base=tiny_checkpoints["base"],
        good=finetune("good", 1901),
        other=finetune("other", 1902),
        fresh=finetune("fresh", 1905),  # corrupted on the Hub by one test each: weights no other repo has
        corrupt=finetune("corrupt", 1906),
        stranger=save_tiny_checkpoint(root / "stranger", tiny_resnet(1903, num_labels=10), processor=processor),
        nan=finetune("nan", 1904),
    )
    weights = load_file(found.nan / "model.safetensors")
    weights[CONV].view(-1)[0] = float("nan")
    save_file(weights, found.nan / "model.safetensors", metadata={"format": "pt"})
    return found


def seed(local_hub, repo_id: str, folder: Path, downloads: int, base: str | None = None, **config) -> str:
    """`folder` as a Hub repo (a card naming `base`, `config` merged into config.json); its commit sha."""
    copy = folder.parent / f"{folder.name}-{repo_id.replace('/', '--')}"
    shutil.copytree(folder, copy)
    if config:
        (copy / "config.json").write_text(json.dumps({**json.loads((copy / "config.json").read_text()), **config}))
    card = {"library_name": "transformers", **({"base_model": base} if base else {})}
    (copy / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n# {folder.name}\n")
    return local_hub.seed_model(repo_id, copy, downloads)


def weights_blob(local_hub, repo_id: str) -> tuple[Path, FileEntry]:
    entry = local_hub.store.get_repo("model", repo_id).resolve("main").files["model.safetensors"]
    return local_hub.store.blob_path(entry.sha256), entry


def corrupt(blob: Path) -> bytes:
    """Flip the lowest bit of the first float of CONV in place (same length, header intact, still finite);
    returns the original bytes."""
    original = blob.read_bytes()
    (length,) = struct.unpack("<Q", original[:8])
    start = 8 + length + json.loads(original[8 : 8 + length])[CONV]["data_offsets"][0]
    blob.write_bytes(original[:start] + bytes([original[start] ^ 1]) + original[start + 1 :])
    return original


def cached(repo_id: str) -> list[Path]:
    """Every file the HF cache holds for `repo_id` (snapshot links and blobs)."""
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def recycle_argv(base: str, target: Path, out: Path, *extra: str) -> list[str]:
    return ["recycle", "--base", base, "--target", str(target), *TINY, "--output", str(out), *extra]


def candidate_rows(stdout: str, ns: str) -> dict[str, list[str]]:
    """Discovery's table rows of this namespace's repos, as [id, revision, downloads, verdict, reason]."""
    rows = [line.split(None, 4) for line in stdout.splitlines() if line.startswith(f"{ns}/")]
    return {row[0]: row for row in rows}


def placeholders(ns: str, tiny_world, **more) -> dict:
    return {"<ns>": ns, "<world>": tiny_world.target.parent, "<hub>": constants.ENDPOINT, **more}


# -- 1. bytes that differ from the Hub's sha256 ---------------------------------------------------------


def test_a_download_that_differs_from_the_hubs_sha256_is_refused_and_not_kept(
    local_hub, hub_namespace, models, tiny_world, tmp_path, capsys
):
    ns = hub_namespace
    base, finetune = f"{ns}/base", f"{ns}/finetune"
    seed(local_hub, base, models.base, 100)
    sha = seed(local_hub, finetune, models.fresh, 10, base=base)
    blob, entry = weights_blob(local_hub, finetune)
    original = corrupt(blob)
    out = tmp_path / "out"
    argv = recycle_argv(base, tiny_world.target, out, "--aux", finetune)
    try:
        line = refusals.fails_cleanly(
            "hub-sha256-mismatch",
            "a weight file whose bytes differ from the sha256 the Hub lists (same length)",
            argv,
            f"{finetune}@{sha}: model.safetensors",
            out,
            capsys,
            placeholders(ns, tiny_world, **{"<sha>": sha}),
        )
    finally:
        blob.write_bytes(original)  # the Hub is healthy again
    assert line == (
        f"error: {finetune}@{sha}: model.safetensors {BAD_BYTES} (corrupted or altered on the way or in the "
        "cache); removed from the cache: run again to download it afresh"
    )
    assert not [p for p in cached(finetune) if p.name in ("model.safetensors", entry.sha256)]  # link and blob gone

    assert cli.main(argv) == 0  # the same command against the healthy Hub downloads the file afresh
    assert f"[fetch] recycled {finetune}@{sha}" in capsys.readouterr().err
    weights = Path(constants.HF_HUB_CACHE, f"models--{ns}--finetune", "snapshots", sha, "model.safetensors")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry.sha256
    assert (out / "soup" / "model.safetensors").is_file()

    # Offline, the cache is all there is: bytes altered in it since are refused just the same.
    corrupt(weights.resolve())
    with pytest.MonkeyPatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(fetch.FetchError, match=f"^{finetune}@{sha}: model.safetensors {BAD_BYTES}"):
            resolve_model(finetune, revision=sha)
    assert not weights.exists() and not weights.is_symlink()


# -- 2. one bad discovered fine-tune does not block the recipe -------------------------------------------


def test_a_discovered_finetune_that_fails_is_refused_and_the_recipe_goes_on(
    local_hub, hub_namespace, models, tiny_world, tmp_path, capsys
):
    ns = hub_namespace
    base = f"{ns}/base"
    shas = {
        base: seed(local_hub, base, models.base, 1000),
        f"{ns}/stranger": seed(local_hub, f"{ns}/stranger", models.stranger, 500, base=base),  # most downloaded
        f"{ns}/escaping": seed(local_hub, f"{ns}/escaping", models.other, 400, base=base),
        f"{ns}/corrupt": seed(local_hub, f"{ns}/corrupt", models.corrupt, 300, base=base),
        f"{ns}/nan": seed(local_hub, f"{ns}/nan", models.nan, 200, base=base),
        f"{ns}/good": seed(local_hub, f"{ns}/good", models.good, 100, base=base),
    }
    # A repo listing a file outside its folder (the local Hub refuses such commits; another Hub may not).
    files = local_hub.store.get_repo("model", f"{ns}/escaping").resolve("main").files
    files["../escape.safetensors"] = files["model.safetensors"]
    blob, _ = weights_blob(local_hub, f"{ns}/corrupt")
    original = corrupt(blob)
    out = tmp_path / "out"
    try:
        assert cli.main(recycle_argv(base, tiny_world.target, out, "--runs", "2")) == 0  # one from the base
    finally:
        blob.write_bytes(original)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    rows = candidate_rows(captured.err, ns)  # recycle's discovery is progress: stderr
    assert {repo: row[3:] for repo, row in rows.items()} == {
        f"{ns}/stranger": ["accepted", ACCEPTED],  # same shapes: only its weights tell
        f"{ns}/escaping": [
            "refused",
            "unsafe file name '../escape.safetensors' ('..' in it): nothing is downloaded from it",
        ],
        f"{ns}/corrupt": ["accepted", ACCEPTED],  # discovery reads headers, intact
        f"{ns}/nan": ["accepted", ACCEPTED],
        f"{ns}/good": ["accepted", ACCEPTED],
    }
    stranger = distance_to_base(
        resolve_model(str(models.base)),
        resolve_model(str(models.stranger)),
        local_signature(models.base),
        head_names_of(models.base / "config.json"),
    )
    nan_tensor = f"{ns}/nan@{shas[f'{ns}/nan']}/model.safetensors: tensor '{CONV}' contains NaN or Inf"
    refused = [line for line in captured.err.splitlines() if " refused: " in line]
    assert refused == [
        f"[fetch] refused: {ns}/corrupt@{shas[f'{ns}/corrupt']}: model.safetensors {BAD_BYTES} (corrupted or "
        "altered on the way or in the cache); removed from the cache: run again to download it afresh",
        f"[vet] refused: {ns}/stranger is not a fine-tune of {base}: its backbone weights are at relative distance "
        f"{stranger:.2f} from the base's (fine-tunes stay within 1)",
        f"[vet] refused: {nan_tensor}",
    ]
    assert stranger > 1.0
    assert not [r for r in local_hub.requests if r.path.startswith(f"/{ns}/escaping/resolve/")]  # nothing fetched
    assert not [p for p in cached(f"{ns}/corrupt") if p.name == "model.safetensors"]  # not kept for a rerun

    results = json.loads((out / "soup" / "results.json").read_text())
    assert [(i["source"], i["revision"]) for i in results["ingredients"]] == [
        (base, shas[base]),
        (f"{ns}/good", shas[f"{ns}/good"]),
    ]
    plan = json.loads((out / "plan.json").read_text())["plans"][0]
    assert plan["left_out"] == [  # the plan says which discovered fine-tunes it left out, and why
        [f"{ns}/escaping@{shas[f'{ns}/escaping']}", f"refused: {rows[f'{ns}/escaping'][4]}"],
        [f"{ns}/corrupt@{shas[f'{ns}/corrupt']}", refused[0].replace("[fetch] refused: ", "refused: ")],
        [f"{ns}/stranger@{shas[f'{ns}/stranger']}", refused[1].replace("[vet] refused: ", "refused: ")],
        [f"{ns}/nan@{shas[f'{ns}/nan']}", refused[2].replace("[vet] refused: ", "refused: ")],
    ]
    for file in (p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".md")):
        if file.name == "plan.json":
            continue
        text = file.read_text()
        assert not any(f"{ns}/{name}" in text for name in ("stranger", "escaping", "corrupt", "nan")), file

    # Named with --aux, the same stranger still fails the recipe loudly.
    out = tmp_path / "aux"
    line = refusals.fails_cleanly(
        "hub-aux-not-a-finetune",
        "--aux naming a Hub model of the base's shapes, independently initialised",
        recycle_argv(base, tiny_world.target, out, "--aux", f"{ns}/stranger"),
        f"{ns}/stranger is not a fine-tune",
        out,
        capsys,
        placeholders(ns, tiny_world),
    )
    assert line == f"error: {refused[1].removeprefix('[vet] refused: ')}"


@pytest.mark.parametrize(
    "name, why",
    [
        ("/etc/model.safetensors", "absolute"),
        ("C:/model.safetensors", "absolute"),
        ("weights\\..\\model.safetensors", "backslash"),
        ("weights/../../model.safetensors", "'..' in it"),
        ("model\x1b[2J.safetensors", "control character"),
        ("model\n.safetensors", "control character"),
        ("weights/model..safetensors", None),
        ("model.safetensors", None),
    ],
)
def test_discovery_names_why_a_file_name_is_unsafe(name, why):
    assert unsafe_file_name(name) == why


# -- 3. transient Hub failures ----------------------------------------------------------------------------


def test_a_transient_hub_failure_is_retried_and_a_lasting_one_is_said(
    local_hub, hub_namespace, models, tiny_world, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(fetch, "FIRST_WAIT_S", 0.0)
    ns = hub_namespace
    base = f"{ns}/base"
    seed(local_hub, base, models.base, 1000)
    good_sha = seed(local_hub, f"{ns}/good", models.good, 100, base=base)
    other_sha = seed(local_hub, f"{ns}/other", models.other, 50, base=base)
    local_hub.inject_failures(f"^/api/models/{ns}/good$", [500], method="GET")  # once: retried
    local_hub.inject_failures(f"^/api/models/{ns}/other$", [503] * fetch.TRIES, method="GET")  # every try
    out = tmp_path / "out"
    assert cli.main([*recycle_argv(base, tiny_world.target, out), "--dry-run"]) == 0
    captured = capsys.readouterr()
    rows = candidate_rows(captured.err, ns)
    assert rows[f"{ns}/good"] == [f"{ns}/good", good_sha[:8], "100", "accepted", ACCEPTED]
    assert rows[f"{ns}/other"] == [
        f"{ns}/other",
        other_sha[:8],
        "50",
        "unreadable",
        "503 Service Unavailable, still after 4 tries",
    ]
    assert (
        f"[discover] warning: {ns}/other could not be read (503 Service Unavailable, still after 4 tries); this "
        "recipe recycles the others only: rerun it to judge that one too"
    ) in captured.err.splitlines()
    assert f"[fetch] recycled {ns}/good@{good_sha}" in captured.err
    named = [line for line in captured.out.splitlines() if f"{ns}/other@" in line]  # never fetched: only the plan
    assert [line.split("@")[0] for line in named] == [f"left out: {ns}/other"]  # records it, and why
    assert named[0].endswith(" (unreadable: 503 Service Unavailable, still after 4 tries)")
    statuses = [r.status for r in local_hub.requests if r.path.split("?")[0] == f"/api/models/{ns}/good"]
    assert statuses == [500, 200]


# -- 4. Hub strings on the terminal ------------------------------------------------------------------------


def test_hub_strings_cannot_clear_the_screen_or_forge_a_row(local_hub, hub_namespace, models, capsys):
    ns = hub_namespace
    base = f"{ns}/base"
    seed(local_hub, base, models.base, 1000)
    good_sha = seed(local_hub, f"{ns}/good", models.good, 100, base=base)
    forged = f"\x1b[2J\x1b[Hx\n{ns}/forged  00000000  999  accepted  {ACCEPTED}"
    hostile_sha = seed(local_hub, f"{ns}/hostile", models.other, 50, base=base, model_type=forged)
    assert cli.main(["discover", "--base", base]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    assert (
        captured.out.splitlines()[1:]
        == [  # one row per candidate, and nothing else
            f"{ns}/good     {good_sha[:8]}        100  accepted  {ACCEPTED}",
            f"{ns}/hostile  {hostile_sha[:8]}         50  refused   architecture "
            f"\\x1b[2J\\x1b[Hx\\n{ns}/forged  00000000  999  accepted  {ACCEPTED}, base is resnet",
        ]
    )


# -- 5. error lines that name the repo ------------------------------------------------------------------


def test_a_gated_repo_says_how_to_get_access(
    local_hub, hub_namespace, models, tiny_world, tmp_path, capsys, monkeypatch
):
    """The local Hub has no gated repos: its downloads answer as the Hub does for an account that has not
    accepted the conditions (the clients' own GatedRepoError, from a 403 marked GatedRepo)."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    ns = hub_namespace
    gated = f"{ns}/gated"
    seed(local_hub, gated, models.good, 10)
    download = huggingface_hub.snapshot_download

    def without_access(repo_id, **kwargs):
        if kwargs.get("token"):  # the account that accepted the conditions
            return download(repo_id, **kwargs)
        url = f"{constants.ENDPOINT}/{repo_id}/resolve/{kwargs['revision']}/config.json"
        response = httpx2.Response(
            403,
            headers={"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {repo_id} is restricted."},
            request=httpx2.Request("GET", url),
        )
        hf_raise_for_status(response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", without_access)
    out = tmp_path / "out"
    argv = recycle_argv(str(models.base), tiny_world.target, out, "--aux", gated)
    line = refusals.fails_cleanly(
        "hub-gated",
        "--aux naming a gated Hub model, without access",
        argv,
        f"{gated} is gated",
        out,
        capsys,
        placeholders(ns, tiny_world, **{"<ckpt>": models.base.parent}),
    )
    assert line == (
        f"error: {gated} is gated: the Hub shares its files only with accounts that accepted its conditions; "
        f"accept them at {constants.ENDPOINT}/{gated}, then pass --token with a token of that account"
    )
    assert cli.main([*argv, "--token", "tok-alice", "--dry-run"]) == 0  # with access: fetched and planned
    assert f"[fetch] recycled {gated}@" in capsys.readouterr().err


def test_a_bad_hub_weight_is_named_by_repo_and_commit_not_by_cache_path(
    local_hub, hub_namespace, models, tiny_world, tmp_path, capsys
):
    ns = hub_namespace
    sha = seed(local_hub, f"{ns}/nan", models.nan, 10)
    out = tmp_path / "out"
    line = refusals.fails_cleanly(
        "hub-nan-weight",
        "--aux naming a Hub model with a NaN in a backbone weight",
        recycle_argv(str(models.base), tiny_world.target, out, "--aux", f"{ns}/nan"),
        f"{ns}/nan@{sha}/model.safetensors",
        out,
        capsys,
        placeholders(ns, tiny_world, **{"<sha>": sha, "<ckpt>": models.base.parent}),
    )
    assert line == f"error: {ns}/nan@{sha}/model.safetensors: tensor '{CONV}' contains NaN or Inf"
    assert constants.HF_HUB_CACHE not in line


# -- offline, what recycle itself fetched ----------------------------------------------------------------


def test_a_hub_base_recycle_fetched_resolves_offline(local_hub, hub_namespace, models, tiny_world, tmp_path, capsys):
    """Fetched online by its name, the base resolves offline by the same name, to the same commit; and the
    soup bytes are the same (HF_HUB_OFFLINE=1 as the README's offline journey sets it)."""
    base = f"{hub_namespace}/base"
    sha = seed(local_hub, base, models.base, 10)
    online = tmp_path / "online"
    assert cli.main(recycle_argv(base, tiny_world.target, online, "--strategy", "soup")) == 0
    with pytest.MonkeyPatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        assert cli.main(recycle_argv(base, tiny_world.target, tmp_path / "offline", "--strategy", "soup")) == 0
    capsys.readouterr()
    for folder in (online, tmp_path / "offline"):
        assert json.loads((folder / "plan.json").read_text())["plans"][0]["base"]["revision"] == sha
    assert (online / "soup" / "model.safetensors").read_bytes() == (
        tmp_path / "offline" / "soup" / "model.safetensors"
    ).read_bytes()


# -- what is measured is what is trained ------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoy(models) -> Path:
    """The stranger (independently initialised, same shapes), with two copies of the base's weights beside its
    model.safetensors: transformers loads model.safetensors only, so the copies must not make it look close."""
    folder = models.stranger.parent / "decoy"
    shutil.copytree(models.stranger, folder)
    for i in range(2):
        shutil.copyfile(models.base / "model.safetensors", folder / f"zz-decoy-{i}.safetensors")
    return folder


def stranger_line(name: str, models) -> str:
    """The refusal of the stranger, by `name`, at its own distance (measured on model.safetensors alone)."""
    from ratatouille_hub.vetting import read_config
    from ratatouille_hub.vetting import signature_of as signature

    base = fetch.Ingredient(str(models.base), "sha256:x", models.base)
    stranger = fetch.Ingredient(str(models.stranger), "sha256:y", models.stranger)
    heads = head_names_of(models.base / "config.json")
    distance = distance_to_base(base, stranger, signature(base), heads)
    assert distance > 1.0 and read_config(stranger)["model_type"] == "resnet"
    return (
        f"error: {name} is not a fine-tune of {models.base}: its backbone weights are at relative distance "
        f"{distance:.2f} from the base's (fine-tunes stay within 1)"
    )


def test_decoy_weights_beside_model_safetensors_do_not_pass_vetting(decoy, models, tiny_world, tmp_path, capsys):
    """Local: vetting, its finiteness check and the content digest read model.safetensors, as transformers does."""
    out = tmp_path / "out"
    line = refusals.fails_cleanly(
        "vet-decoy-safetensors",
        "--aux a stranger's folder with copies of the base's weights beside its model.safetensors",
        recycle_argv(str(models.base), tiny_world.target, out, "--aux", str(decoy)),
        str(decoy),
        out,
        capsys,
        {"<world>": tiny_world.target.parent, "<ckpt>": models.base.parent, "<tmp>": decoy.parent},
    )
    assert line == stranger_line(str(decoy), models)
    assert fetch.weights_digest(decoy) == fetch.weights_digest(models.stranger)  # the decoys are not hashed
    assert local_signature(decoy) == local_signature(models.stranger)


def test_decoy_weights_on_the_hub_are_never_downloaded(
    local_hub, hub_namespace, decoy, models, tiny_world, tmp_path, capsys
):
    ns = hub_namespace
    sha = seed(local_hub, f"{ns}/decoy", decoy, 10)
    out = tmp_path / "out"
    line = refusals.fails_cleanly(
        "fetch-hub-decoy-safetensors",
        "--aux a Hub model with copies of the base's weights beside its model.safetensors",
        recycle_argv(str(models.base), tiny_world.target, out, "--aux", f"{ns}/decoy"),
        f"{ns}/decoy",
        out,
        capsys,
        placeholders(ns, tiny_world, **{"<ckpt>": models.base.parent, "<sha>": sha}),
    )
    assert line == stranger_line(f"{ns}/decoy", models)
    assert not [p for p in cached(f"{ns}/decoy") if "decoy" in p.name]  # only what transformers loads


def test_a_sharded_hub_model_downloads_the_shards_its_index_names_and_no_other(local_hub, hub_namespace, models):
    from transformers import ResNetForImageClassification

    sharded = models.good.parent / "good-sharded"
    model = ResNetForImageClassification.from_pretrained(models.good)
    model.save_pretrained(sharded, max_shard_size="20KB")
    shutil.copyfile(models.good / "preprocessor_config.json", sharded / "preprocessor_config.json")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    shutil.copyfile(models.base / "model.safetensors", sharded / "zz-decoy.safetensors")
    seed(local_hub, f"{hub_namespace}/sharded", sharded, 10)
    ingredient = resolve_model(f"{hub_namespace}/sharded")
    assert sorted(p.name for p in ingredient.path.glob("*.safetensors")) == shards
    assert local_signature(ingredient.path) == local_signature(models.good)

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"][CONV] = ".."
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    sha = seed(local_hub, f"{hub_namespace}/sharded-dotdot", sharded, 10)
    with pytest.raises(fetch.FetchError) as refused:
        resolve_model(f"{hub_namespace}/sharded-dotdot")
    assert str(refused.value) == (
        f"{hub_namespace}/sharded-dotdot@{sha}/model.safetensors.index.json: weight_map must map tensor names to "
        ".safetensors files in the same folder"
    )


@pytest.mark.parametrize("command", ["recycle", "intertrain"])
def test_a_missing_hub_dataset_is_named(command, local_hub, hub_namespace, models, tiny_world, tmp_path, capsys):
    missing, out = f"{hub_namespace}/none", tmp_path / "out"
    argv = {
        "recycle": recycle_argv(str(models.base), missing, out),
        "intertrain": ["intertrain", "--base", str(models.base), "--dataset", missing, "--output", str(out)],
    }[command]
    line = refusals.fails_cleanly(
        f"fetch-{command}-missing-hub-dataset",
        f"{command} naming a Hub dataset that does not exist",
        argv,
        missing,
        out,
        capsys,
        placeholders(hub_namespace, tiny_world, **{"<ckpt>": models.base.parent}),
    )
    assert line == (
        f"error: {missing}: no such dataset folder or file, and no Hub dataset of that name is visible "
        "(a private one needs --token)"
    )


def test_base_and_target_pinned_by_revision_are_read_at_that_revision(local_hub, hub_namespace, models, tiny_world,
                                                                      tmp_path, capsys):  # fmt: skip
    """`--base id@sha` and `--target id@sha` work like `--aux id@sha`: after both moved on, the pinned recipe
    plans (and trains) on the commits named, the unpinned one on the new heads."""
    from ratatouille_hub import testing
    from ratatouille_hub.toy import world as toyworld

    base, target = f"{hub_namespace}/base", f"{hub_namespace}/shapes"
    first_base = seed(local_hub, base, models.base, 1)
    first_target = local_hub.seed_dataset(target, tiny_world.target)
    seed(local_hub, base, models.good, 1)  # both move on
    later = testing.write_hub_dataset(toyworld.target_dataset(per_class_per_domain=4, size=16), tmp_path / "later")
    local_hub.seed_dataset(target, later)
    heads = {repo: HfApi().repo_info(repo, repo_type=kind).sha for repo, kind in ((base, "model"), (target, "dataset"))}
    assert first_base != heads[base] and first_target != heads[target]

    def planned(out: Path, *pins: str) -> dict:
        argv = ["recycle", "--base", f"{base}{pins[0]}", "--target", f"{target}{pins[1]}", *TINY,
                "--strategy", "soup", "--output", str(out)]  # fmt: skip
        assert cli.main(argv) == 0
        return json.loads((out / "plan.json").read_text())["plans"][0]

    pinned = planned(tmp_path / "pinned", f"@{first_base}", f"@{first_target}")
    assert (pinned["base"]["source"], pinned["base"]["revision"]) == (base, first_base)
    assert pinned["target"]["reference"] == f"{target}@{first_target}"
    assert sum(pinned["target"]["train_sizes"]) + pinned["target"]["val_size"] + pinned["target"]["test_size"] == 144
    head = planned(tmp_path / "head", "", "")
    assert (head["base"]["revision"], head["target"]["reference"]) == (heads[base], f"{target}@{heads[target]}")
    assert sum(head["target"]["train_sizes"]) + head["target"]["val_size"] + head["target"]["test_size"] == 96
    capsys.readouterr()


def test_run_and_assemble_read_the_target_the_plan_pinned(local_hub, hub_namespace, models, tiny_world, tmp_path,
                                                           capsys):  # fmt: skip
    """A commit pushed to the target between `plan` and `run` changes nothing: every array task and the
    assembly read the revision the plan pinned (before, every task failed: 'not the one planned')."""
    from ratatouille_hub import testing
    from ratatouille_hub.toy import world as toyworld

    target = f"{hub_namespace}/shapes"
    planned_sha = local_hub.seed_dataset(target, tiny_world.target)
    out = tmp_path / "out"
    argv = ["plan", "--base", str(models.base), "--target", target, *TINY, "--runs", "2", "--strategy", "soup",
            "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    later = testing.write_hub_dataset(toyworld.target_dataset(per_class_per_domain=4, size=16), tmp_path / "later")
    assert local_hub.seed_dataset(target, later) != planned_sha
    for index in (0, 1):
        assert cli.main(["run", str(out), "--index", str(index)]) == 0
    assert cli.main(["assemble", str(out)]) == 0
    capsys.readouterr()
    results = json.loads((out / "soup" / "results.json").read_text())
    assert results["target"] == f"{target}@{planned_sha}"
