"""diagnose: the three criteria of docs/method.md, as pure functions and through the CLI on real runs."""

import json
import re

import jsondoc
import pytest
import torch

from ratatouille_hub import cli
from ratatouille_hub.config import RecipeConfig
from ratatouille_hub.diagnostics import (
    ALPHAS,
    barrier,
    diagnose_states,
    interpolate,
    ratio_error,
)
from ratatouille_hub.recipe import recycle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ratio_error_counts_different_over_simultaneous_errors():
    labels = torch.tensor([0, 0, 0, 0, 0, 0])
    a = torch.tensor([1, 1, 1, 0, 0, 0])  # wrong on 0, 1, 2
    b = torch.tensor([1, 2, 0, 1, 0, 0])  # wrong on 0, 1, 3
    # both wrong on 0 and 1 (even with different answers): 2 simultaneous; exactly one wrong on 2, 3: 2 different
    assert ratio_error(a, b, labels) == 1.0
    assert ratio_error(a, a, labels) == 0.0
    assert ratio_error(torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([0, 0])) == float("inf")


def test_barrier_is_the_largest_dip_below_the_chord():
    assert barrier([0.8, 0.8, 0.5, 0.8, 0.9]) == pytest.approx(0.35)  # chord at 0.5 is 0.85
    assert barrier([0.8, 0.9, 0.95, 0.9, 0.8]) == 0.0  # above the chord everywhere: no barrier
    assert barrier([0.8, 0.5, 0.9]) == pytest.approx(0.35)  # three points: t = 0, .5, 1, as a record of any length


def test_interpolate_is_exact_and_keeps_integer_buffers_from_the_first():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([8.0, 0.0]), "n": torch.tensor(9)}
    mid = interpolate(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([2.0, 3.0]))
    assert mid["n"].item() == 3 and mid["n"].dtype == torch.int64


def test_diagnose_states_evaluates_every_pair_along_the_path():
    labels = torch.tensor([0, 1, 1, 0])
    states = [{"t": torch.tensor(0.0)}, {"t": torch.tensor(1.0)}, {"t": torch.tensor(0.5)}]

    def predict(state):  # a model whose predictions depend on its one weight
        t = float(state["t"])
        return torch.tensor([0, 1, 1, 0]) if t <= 0.5 else torch.tensor([1, 1, 0, 0])

    diagnosis = diagnose_states(["a", "b", "c"], states, predict, labels)
    assert diagnosis.accuracies == (1.0, 0.5, 1.0)
    assert [(p.a, p.b) for p in diagnosis.pairs] == [(0, 1), (0, 2), (1, 2)]
    first = diagnosis.pairs[0]
    assert ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert first.path_accuracies == (1.0,) * 6 + (0.5,) * 5  # t <= .5 answers as a, t > .5 as b
    assert first.ratio_error == float("inf")  # a never errs, so no simultaneous errors
    assert first.barrier == pytest.approx(0.2)  # at t = .6 the chord is .7, the path .5


@pytest.fixture(scope="module")
def two_runs(tiny_world, tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    target = tiny_world.target
    config = RecipeConfig(
        base=str(tiny_checkpoints["base"]),
        target=str(target),
        aux=(str(tiny_checkpoints["aux1"]),),
        runs=2,
        steps=3,
        eval_every=3,
        lp_steps=3,
        lp_lr=1e-2,
        warmup_steps=1,
        batch_size=2,
        lr=1e-3,
        image_size=16,
        output=str(root / "out"),
    )
    results = recycle(config, echo=lambda line: None)
    return target, [root / "out" / run.folder / "model" for run in results.runs]


def test_cli_diagnose_reports_runs_and_writes_a_png(two_runs, capsys, tmp_path):
    target, models = two_runs
    plot = tmp_path / "paths.png"
    given = [str(m) for m in reversed(models)]  # as a glob of out/runs/*/model may list them: not in plan order
    code = cli.main(["diagnose", *given, "--target", str(target), "--image-size", "16", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    listed = [line.split("%  ", 1)[1] for line in out.splitlines() if re.match(r"  \[\d+\] ", line)]
    assert listed == ["run 0 from base", "run 1 from aux1"]  # named and numbered as planned
    assert "[0]-[1]" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_models_scores_each_model_as_itself(two_runs, tmp_path):
    """Each model's accuracy is its own, whatever order the models are evaluated in."""
    from ratatouille_hub.diagnostics import diagnose_models
    from ratatouille_hub.evaluation import predict_logits
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.models import head_linear, load_classifier
    from ratatouille_hub.target import prepare_target

    target, runs = two_runs
    id2label = {int(k): v for k, v in json.loads((runs[1] / "config.json").read_text())["id2label"].items()}
    always_first = load_classifier(runs[1], id2label)
    with torch.no_grad():  # a run that always answers class 0: surely another accuracy than run 0's
        head_linear(always_first).weight.zero_()
        head_linear(always_first).bias.copy_(torch.arange(len(head_linear(always_first).bias)) == 0)
    always_first.save_pretrained(tmp_path / "always-first")
    (tmp_path / "always-first" / "preprocessor_config.json").write_bytes(
        (runs[1] / "preprocessor_config.json").read_bytes()
    )
    models = [runs[0], tmp_path / "always-first"]
    config = RecipeConfig(base=str(models[0]), target=str(target), image_size=16)
    prepared = prepare_target(config, resolve_model(str(models[0])))
    validation = prepared.data.pooled_val
    own = [
        int(
            (
                predict_logits(load_classifier(m, prepared.id2label), validation, prepared.data.normalize).argmax(1)
                == validation.labels
            ).sum()
        )
        for m in models
    ]
    assert own[0] != own[1]  # the two runs are told apart by their accuracy
    for order in (models, models[::-1]):
        diagnosis = diagnose_models([str(m) for m in order], config)
        correct = [round(a * len(validation)) for a in diagnosis.accuracies]
        assert correct == (own if order == models else own[::-1])


def test_cli_diagnose_refuses_a_model_of_other_labels(two_runs, tiny_checkpoints, capsys):
    target, models = two_runs
    code = cli.main(
        ["diagnose", str(models[0]), str(tiny_checkpoints["aux2"]), "--target", str(target), "--image-size", "16"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and str(tiny_checkpoints["aux2"]) in err[0] and "labels" in err[0]


def test_cli_merge_greedy_selects_on_validation_and_merges_the_kept_models(two_runs, tmp_path, capsys):
    from safetensors.torch import load_file

    from ratatouille_hub.config import RecipeConfig
    from ratatouille_hub.merge_engine import average_state_dicts
    from ratatouille_hub.merge_methods import MERGE_METHODS
    from ratatouille_hub.recipe.assembly import validation_inputs

    target, models = two_runs
    out = tmp_path / "greedy"
    code = cli.main(
        [
            "merge",
            *map(str, models),
            "--output",
            str(out),
            "--method",
            "greedy",
            "--target",
            str(target),
            "--image-size",
            "16",
        ]
    )
    assert code == 0, capsys.readouterr().err
    options = RecipeConfig(base=str(models[0]), target=str(target), image_size=16)
    kept = list(MERGE_METHODS["greedy"].mix(validation_inputs(models, options)).members)
    expected = average_state_dicts([load_file(models[i] / "model.safetensors") for i in kept])
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], expected[name]) for name in merged)


def test_cli_merge_greedy_without_target_is_refused(two_runs, tmp_path, capsys):
    _, models = two_runs
    code = cli.main(["merge", *map(str, models), "--output", str(tmp_path / "o"), "--method", "greedy"])
    assert code == 2 and "--method greedy needs --target" in capsys.readouterr().err


def test_diagnose_json_holds_each_models_accuracy_and_the_api_returns_the_same_record(two_runs, capsys):
    import ratatouille_hub
    from ratatouille_hub.config import DiagnoseOptions
    from ratatouille_hub.evaluation import predict_logits
    from ratatouille_hub.fetch import resolve_model
    from ratatouille_hub.models import load_classifier
    from ratatouille_hub.records import to_jsonable
    from ratatouille_hub.target import prepare_target

    target, models = two_runs
    argv = ["diagnose", *map(str, models), "--target", str(target), "--image-size", "16", "--format", "json"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    options = DiagnoseOptions(models=tuple(map(str, models)), target=str(target), image_size=16)
    assert to_jsonable(ratatouille_hub.diagnose(options)) == printed

    prepared = prepare_target(options, resolve_model(str(models[0])))
    validation = prepared.data.pooled_val
    predictions = [
        predict_logits(load_classifier(m, prepared.id2label), validation, prepared.data.normalize).argmax(1)
        for m in models
    ]
    accuracies = [float((p == validation.labels).float().mean()) for p in predictions]
    wrong = [p != validation.labels for p in predictions]
    both, one = int((wrong[0] & wrong[1]).sum()), int((wrong[0] ^ wrong[1]).sum())
    assert jsondoc.undocumented(printed, "diagnose") == []
    assert printed["names"] == ["run 0 from base", "run 1 from aux1"]
    assert printed["accuracies"] == accuracies
    assert printed["alphas"] == [k / 10 for k in range(11)]  # 11 points along each path
    [pair] = printed["pairs"]
    path = pair["path_accuracies"]
    assert (pair["a"], pair["b"], path[0], path[-1]) == (0, 1, *accuracies)
    assert pair["ratio_error"] == (one / both if both else None)  # JSON has no infinity: null
    chord = [(1 - t) * path[0] + t * path[-1] for t in printed["alphas"]]
    assert pair["barrier"] == max(0.0, *(c - a for c, a in zip(chord, path)))


def test_results_prints_a_finished_outputs_record(two_runs, capsys, tmp_path):
    import ratatouille_hub
    from ratatouille_hub.config import ResultsOptions
    from ratatouille_hub.results import Results

    _, models = two_runs
    output = models[0].parents[2]  # out/runs/<key>/model
    saved = json.loads((output / "soup" / "results.json").read_text(), parse_constant=lambda constant: None)
    for folder in (output, output / "soup"):
        assert cli.main(["results", str(folder), "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == saved
    assert jsondoc.undocumented(saved, "results") == []
    assert cli.main(["assemble", str(output), "--format", "json"]) == 0  # the same record, assembled again
    assert json.loads(capsys.readouterr().out) == saved
    results = ratatouille_hub.read_results(ResultsOptions(output=str(output)))
    assert results == Results.load(output / "soup" / "results.json")
    assert cli.main(["results", str(output)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" val ")[0].rstrip() for line in table] == [row.name for row in results.summary]

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "results.json").write_text(json.dumps({"test_domains": ["../../etc"]}))
    assert cli.main(["results", str(hostile)]) == 2
    err = capsys.readouterr().err.strip()  # the domain's soup is looked for inside the folder, never at its path
    assert err.startswith(f"error: {hostile / 'soups'}/etc-") and err.endswith(
        "results.json: No such file or directory"
    )
    assert cli.main(["results", str(tmp_path / "nothing")]) == 2
    assert "no results.json" in capsys.readouterr().err
    wrong = {**saved, "summary": [{**saved["summary"][0], "val_accuracy": "high"}]}
    (hostile / "results.json").write_text(json.dumps(wrong))
    assert cli.main(["results", str(hostile)]) == 2  # a field of another type: refused, not an internal error
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {hostile / 'results.json'}: not the results of a finished recipe (")
