"""benchmarks/demo_criteria.py: its design overrides, each `--set` value parsed as its field's type, and the
pairs its diversity bands read."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ratatouille_hub.toy.design import DESIGN


@pytest.fixture
def criteria(monkeypatch):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "demo_criteria.py"
    spec = importlib.util.spec_from_file_location("demo_criteria_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_a_boolean_field_reads_true_and_false_and_refuses_anything_else(criteria):
    """bool("false") is True: the override must not take a field's type as its parser."""
    assert criteria.parse_design(["pretrain_photo_shapes=false"]).pretrain_photo_shapes is False
    assert criteria.parse_design(["pretrain_photo_shapes=true"]).pretrain_photo_shapes is True
    with pytest.raises(SystemExit, match="pretrain_photo_shapes is true or false"):
        criteria.parse_design(["pretrain_photo_shapes=no"])


def test_tuples_numbers_and_unknown_fields(criteria):
    design = criteria.parse_design(["lr_choices=1e-4,3e-4", "steps=500", "community_lr=3e-4"])
    assert design.lr_choices == (1e-4, 3e-4) and design.steps == 500 and design.community_lr == 3e-4
    assert design.widths == DESIGN.widths and design.pretrain_photo_shapes == DESIGN.pretrain_photo_shapes
    with pytest.raises(SystemExit, match="no such field"):
        criteria.parse_design(["depth=3"])


def _recipe(name: str, vals: list[float]) -> dict:
    pairs = [{"runs": [0, 1]}, {"runs": [0, 2]}, {"runs": [1, 2]}]
    return {"name": name, "runs": [{"val": val} for val in vals], "pairs": pairs}


def test_the_diversity_bands_read_the_pairs_from_each_recipes_best_run_and_all_pairs(criteria):
    """Runs wrong on 1100, 1010 and 1111: ratio-errors 2 for runs 0 and 1, 1 for the two pairs with run 2. The
    best run is the most accurate on validation, the lower index on a tie (the demo's rule)."""
    wrong = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    correct = {"soup": ~wrong, "ratatouille-vetted": ~wrong}
    vetted = _recipe("ratatouille-vetted", [0.97, 0.90, 0.90])  # best run 0: pairs 2 and 1, median 1.5
    bands = criteria.diversity_bands([_recipe("soup", [0.90, 0.90, 0.95]), vetted], correct)  # soup's best: 2
    assert bands["from_best_run"]["estimate"] == 0.5 and bands["all_pairs"]["estimate"] == 0.0
    bands = criteria.diversity_bands([_recipe("soup", [0.90, 0.95, 0.95]), vetted], correct)  # tie: run 1
    assert bands["from_best_run"]["estimate"] == 0.0
    assert criteria.diversity_bands([vetted], correct) == {}  # the soup not measured: no band


def test_only_the_default_design_on_the_cpus_own_kernels_replaces_the_committed_record(criteria, tmp_path):
    import dataclasses

    record = {"design": dataclasses.asdict(DESIGN), "seed": 0, "probe_domain": None, "kernel_overrides": {}}
    assert criteria.record_path(tmp_path, record, complete=True) == criteria.RESULTS
    variant = tmp_path / "demo_criteria.json"
    assert criteria.record_path(tmp_path, record, complete=False) == variant
    for change in ({"kernel_overrides": {"ATEN_CPU_CAPABILITY": "avx2"}}, {"seed": 1}, {"probe_domain": "cartoon"}):
        assert criteria.record_path(tmp_path, {**record, **change}, complete=True) == variant
    design = dataclasses.asdict(criteria.parse_design(["steps=300"]))
    assert criteria.record_path(tmp_path, {**record, "design": design}, complete=True) == variant
