"""Issue #10: `--test-domain all` (one linear probe, runs and soup per held-out domain, and the DomainBed
table) and the target decoded once into a memory-mapped cache shared by every held-out domain."""

from __future__ import annotations

import json

import jsondoc
import pytest
import torch
from safetensors.torch import load_file

from ratatouille_hub import ResultsOptions, cli, read_results, recycle
from ratatouille_hub.artifacts import TargetCache, replaced_builder
from ratatouille_hub.fetch import resolve_model
from ratatouille_hub.merge_engine import read_safetensors_metadata
from ratatouille_hub.provenance import INGREDIENTS_KEY
from ratatouille_hub.recipe import plan_recipe
from ratatouille_hub.target import TargetPreparation
from ratatouille_hub.testing import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DOMAINS = ["cartoon", "painting", "photo", "sketch"]  # the tiny world's


def test_the_cache_holds_the_same_pixels_decoded_once_for_every_held_out_domain(tiny_world, tmp_path):
    base = resolve_model(str(tiny_world.base))
    cache = tmp_path / "cache"
    for domain in ("cartoon", "sketch"):
        options = tiny_recipe(tiny_world, tmp_path / "out", test_domain=domain)
        preparation = TargetPreparation(options, base)
        fresh, mapped = preparation.decode(), preparation.decode(cache=cache)
        pairs = [
            (fresh.test, mapped.test),
            *zip(fresh.data.train, mapped.data.train),
            *zip(fresh.data.val, mapped.data.val),
        ]
        for expected, got in pairs:
            assert torch.equal(got.pixels, expected.pixels) and torch.equal(got.labels, expected.labels)
    assert len(list(cache.iterdir())) == 2  # one decoded copy (and its claim), whichever domain is held out

    def no_decoding(*args):
        raise AssertionError("decoded again")

    with replaced_builder(TargetCache, no_decoding):
        again = TargetPreparation(tiny_recipe(tiny_world, tmp_path / "out", test_domain="photo"), base).decode(
            cache=cache
        )
    assert len(again.test) == len(fresh.data.train[1]) + len(fresh.data.val[1])  # photo, read from the cache


def test_every_domain_held_out_in_turn_gives_one_soup_each_and_the_domainbed_table(tiny_world, tmp_path, capsys):
    out = tmp_path / "all"
    config = tiny_recipe(tiny_world, out, test_domain="all").replace(runs=2)
    plans = plan_recipe(config, echo=lambda line: None)
    assert [plan.target.test_domain for plan in plans] == DOMAINS
    assert len({plan.lp.key for plan in plans}) == 4  # one linear probe per held-out domain

    table = recycle(config, echo=lambda line: None)
    assert list(table.per_domain) == DOMAINS
    saved = json.loads((out / "results.json").read_text())
    assert saved["test_domains"] == DOMAINS
    for cells in saved["test_accuracy"].values():
        per_domain = [cells[d] for d in DOMAINS]
        assert cells["average"] == pytest.approx(sum(per_domain) / 4)
    for domain in DOMAINS:
        results = json.loads((out / "soups" / domain / "results.json").read_text())
        assert results["test_domain"] == domain
        assert saved["test_accuracy"]["soup, uniform"][domain] == results["soup_uniform"]["test_accuracy"]
        assert saved["test_accuracy"]["ensemble (reference)"][domain] == results["ensemble"]["test_accuracy"]
    assert len(list((out / "lp").glob("[!.]*"))) == 4 and len(list((out / "runs").glob("[!.]*"))) == 8
    assert read_results(ResultsOptions(output=str(out))) == table  # every domain's record, read back
    assert cli.main(["results", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == saved
    assert jsondoc.undocumented(saved, "results, every domain held out") == []

    alone = tmp_path / "sketch"
    recycle(tiny_recipe(tiny_world, alone, test_domain="sketch").replace(runs=2), echo=lambda line: None)
    ours, theirs = out / "soups" / "sketch" / "model.safetensors", alone / "soup" / "model.safetensors"
    mine, single = load_file(ours), load_file(theirs)
    assert mine.keys() == single.keys() and all(torch.equal(mine[k], v) for k, v in single.items())
    # the same ingredients by content; their sources are seen from each soup folder (../../runs vs ../runs)
    hashes = [[e["sha256"] for e in json.loads(read_safetensors_metadata(f)[INGREDIENTS_KEY])] for f in (ours, theirs)]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2
