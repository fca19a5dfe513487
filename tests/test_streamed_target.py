"""Issue #23, item 2: a target too large to keep decoded (over --cache-budget-gb, the free disk, or half the
memory) is streamed: each batch decoded from the dataset's files by DataLoader workers, with the pixels the
cache would hold, so a run's bytes do not depend on which path prepared its target; planning decodes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ratatouille_hub import cli, recycle
from ratatouille_hub.data import (
    DataError,
    ImageSource,
    JoinedPixels,
    StreamedPixels,
    evenly_spaced,
    join_pixels,
    pixel_batches,
)
from ratatouille_hub.fetch import resolve_model
from ratatouille_hub.recipe import plan_recipe
from ratatouille_hub.target import TargetPreparation
from ratatouille_hub.testing import tiny_recipe
from ratatouille_hub.train import DomainBatches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def splits(target) -> list:
    data = target.data
    return [*data.train, *data.val, target.test, data.pooled_val, data.pooled_train]


@pytest.fixture(scope="module")
def targets(tiny_world, tmp_path_factory):
    """The tiny world's target cached (the default), and streamed (a budget of 0) with no cache written."""
    root = tmp_path_factory.mktemp("streamed")
    base = resolve_model(str(tiny_world.base))
    options = tiny_recipe(tiny_world, root / "out")
    cached = TargetPreparation(options, base).decode(cache=root / "cache")
    streamed = TargetPreparation(options.replace(cache_budget_gb=0), base).decode(cache=root / "no-cache")
    assert not (root / "no-cache").exists()
    return cached, streamed


def test_a_streamed_target_reads_the_cached_pixels_and_labels_however_it_is_indexed(targets):
    cached, streamed = targets
    for expected, got in zip(splits(cached), splits(streamed)):
        assert isinstance(expected.pixels, torch.Tensor | JoinedPixels) and isinstance(got.pixels, StreamedPixels)
        assert got.pixels.shape == expected.pixels.shape
        assert torch.equal(got.labels, expected.labels)
        assert torch.equal(got.pixels[:], expected.pixels[:])
        assert torch.equal(got.pixels[3:11:2], expected.pixels[3:11:2])
        rows = torch.tensor([len(got) - 1, 0, 5, 5])
        assert torch.equal(got.pixels[rows], expected.pixels[rows])
        sample = evenly_spaced(got, 7)
        assert isinstance(sample.pixels, StreamedPixels)
        assert torch.equal(sample.pixels[:], evenly_spaced(expected, 7).pixels)
        batches = list(pixel_batches(got, 8))  # decoded by DataLoader workers
        assert [len(b) for b in batches] == [len(b) for b in pixel_batches(expected, 8)]
        assert torch.equal(torch.cat(batches), expected.pixels[:])


def test_a_target_within_its_budget_is_kept_decoded_and_one_over_it_in_memory_is_streamed(tiny_world, tmp_path):
    base = resolve_model(str(tiny_world.base))
    options = tiny_recipe(tiny_world, tmp_path / "out")
    preparation = TargetPreparation(options.replace(cache_budget_gb=1), base)
    assert isinstance(preparation.decode(cache=tmp_path / "cache").test.pixels, torch.Tensor)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] != []
    in_memory = TargetPreparation(options, base).decode()
    # 1e-4 GB = 100 kB: under the tiny target's 144 images of 16 x 16 (and their labels) and the cache overhead
    streamed = TargetPreparation(options.replace(cache_budget_gb=1e-4), base).decode()
    for expected, got in zip(splits(in_memory), splits(streamed)):
        assert isinstance(got.pixels, StreamedPixels) and torch.equal(got.pixels[:], expected.pixels[:])


def test_joined_images_read_as_their_concatenation_would_without_copying_the_parts():
    parts = [torch.arange(n * 12, dtype=torch.uint8).view(n, 3, 2, 2) + 10 * i for i, n in enumerate((3, 0, 5, 1))]
    joined, concatenated = join_pixels(parts), torch.cat(parts)
    assert isinstance(joined, JoinedPixels) and joined.shape == concatenated.shape and len(joined) == 9
    for index in (slice(None), slice(2, 7), slice(1, 9, 3), slice(7, 100), slice(5, 5)):
        assert torch.equal(joined[index], concatenated[index]), index
    for rows in ([8, 0, 3, 3, 2], torch.tensor([-1, 4]), []):
        assert torch.equal(joined[rows], concatenated[torch.as_tensor(rows, dtype=torch.long)]), rows
    with pytest.raises(IndexError):
        joined[[9]]
    assert all(a is b for a, b in zip(joined.parts, parts))  # views kept as they are: nothing was copied
    assert join_pixels(parts[:1]) is parts[0]


def test_a_cached_targets_pooled_splits_are_views_of_its_memory_map(targets):
    cached, _ = targets
    mapped = cached.data.train[0].pixels.untyped_storage().data_ptr()
    for pooled in (cached.data.pooled_val, cached.data.pooled_train):
        assert isinstance(pooled.pixels, JoinedPixels)
        assert {part.untyped_storage().data_ptr() for part in pooled.pixels.parts} == {mapped}


def test_streamed_domains_give_the_cached_batches_and_resume_from_the_last_batch_taken(targets):
    cached, streamed = targets
    reference = DomainBatches(cached.data.train, 4, seed=3, pin_memory=False)
    batches = DomainBatches(streamed.data.train, 4, seed=3, pin_memory=False)
    expected = [next(reference) for _ in range(12)]  # past an epoch of every domain (about 29 images each)
    for step, (pixels, labels) in enumerate(expected[:5]):
        got = next(batches)
        assert torch.equal(got[0], pixels) and torch.equal(got[1], labels), step
    saved = batches.state_dict()  # the workers have drawn batches ahead: the position is the fifth's
    cached_after_five = DomainBatches(cached.data.train, 4, seed=3, pin_memory=False)
    for _ in range(5):
        next(cached_after_five)
    assert saved.keys() == cached_after_five.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in cached_after_five.state_dict().items())
    resumed = DomainBatches(streamed.data.train, 4, seed=99, pin_memory=False)
    resumed.load_state_dict(saved)
    for pixels, labels in expected[5:]:
        got = next(resumed)
        assert torch.equal(got[0], pixels) and torch.equal(got[1], labels)


def test_a_recipe_trains_the_same_bytes_from_a_streamed_target(tiny_world, tmp_path):
    outputs = {"cached": tmp_path / "cached", "streamed": tmp_path / "streamed"}
    for name, output in outputs.items():
        config = tiny_recipe(tiny_world, output).replace(runs=2)
        recycle(config.replace(cache_budget_gb=0) if name == "streamed" else config, echo=lambda line: None)
    assert [p.name for p in (outputs["streamed"] / "cache").rglob("*") if not p.name.endswith(".lock")] == []
    [plan] = plan_recipe(tiny_recipe(tiny_world, outputs["cached"]).replace(runs=2), echo=lambda line: None)
    files = [f"{spec.folder}/predictions.safetensors" for spec in plan.runs]
    files += [f"{spec.folder}/model/model.safetensors" for spec in plan.runs]
    for file in [*files, f"{plan.lp.folder}/head.safetensors", "soup/model.safetensors"]:
        cached, streamed = (load_file(outputs[name] / file) for name in ("cached", "streamed"))
        assert cached.keys() == streamed.keys() and all(torch.equal(cached[k], streamed[k]) for k in cached), file


@pytest.fixture
def undecodable(tmp_path):
    """A DomainBed folder whose every image file holds bytes no decoder reads."""
    root = tmp_path / "garbage"
    for domain in ("art", "photo", "sketch"):
        for label in ("cat", "dog"):
            for i in range(3):
                path = root / domain / label / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"not an image: {domain} {label} {i}".encode())
    return root


def test_planning_never_decodes_an_image(tiny_world, undecodable, tmp_path, monkeypatch, capsys):
    def no_decoding(*args):
        raise AssertionError("planning decoded an image")

    out = tmp_path / "out"
    argv = ["--base", str(tiny_world.base), "--aux", str(tiny_world.aux[0]), "--target", str(undecodable),
            "--image-size", "16", "--output", str(out)]  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(ImageSource, "decode_into", no_decoding)
        assert cli.main(["recycle", *argv, "--dry-run"]) == 0
        assert not out.exists()
        assert cli.main(["plan", *argv, "--test-domain", "all"]) == 0
    assert (out / "plan.json").is_file()
    capsys.readouterr()
    base = resolve_model(str(tiny_world.base))
    options = tiny_recipe(tiny_world, out).replace(target=str(undecodable), aux=())
    with pytest.raises(DataError, match="not an image Pillow can read"):  # the files are indeed undecodable
        TargetPreparation(options, base).decode()


def test_an_image_a_worker_cannot_decode_is_one_line_naming_its_row(tiny_world, undecodable, tmp_path):
    base = resolve_model(str(tiny_world.base))
    options = tiny_recipe(tiny_world, tmp_path / "out").replace(target=str(undecodable), aux=(), cache_budget_gb=0)
    target = TargetPreparation(options, base).decode(cache=tmp_path / "cache")  # streamed: nothing decoded yet
    with pytest.raises(DataError) as refused:
        next(pixel_batches(target.test, 4))
    assert str(refused.value) == (
        f"dataset {undecodable}: row 0 (domain 'art'), column 'image': the file {undecodable}/art/cat/0.jpg is not "
        "an image Pillow can read"
    )
    with pytest.raises(DataError, match=r"^dataset .*: row \d+ \(domain '(photo|sketch)'\), column 'image': .*$"):
        next(DomainBatches(target.data.train, 2, seed=0, pin_memory=False))


def test_the_target_benchmark_runs_in_its_smoke_mode(tmp_path):
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, str(root / "benchmarks" / "target.py"), "--smoke", "--scratch", str(tmp_path)]
    subprocess.run(command, env={**os.environ, "PYTHONPATH": str(root)}, check=True, capture_output=True)
    results = json.loads((tmp_path / "target-smoke.json").read_text())
    row = results["sizes"]["120"]
    assert row["plan"]["rows"] == row["cached"]["rows"] == row["streamed"]["rows"] == 120
    assert (row["cached"]["streamed"], row["streamed"]["streamed"]) == (False, True)
    assert row["cached"]["cache_bytes"] >= 120 * 3 * 16 * 16 and row["streamed"]["cache_bytes"] == 0
    assert results["train"]["cached"]["train_images_per_s"] > 0 and results["train"]["streamed"]["streamed"]
