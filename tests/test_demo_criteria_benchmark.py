"""benchmarks/demo_criteria.py's design overrides: each `--set` value parsed as its field's type."""

import importlib.util
import sys
from pathlib import Path

import pytest

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
