"""Training: the shared linear-probe head, warm-up then a fresh optimizer, frozen BatchNorm statistics,
best-validation checkpoints. Tiny ResNets (~6k parameters) on random 16 px images."""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.adam import Adam
from transformers import ResNetConfig, ResNetForImageClassification

from ratatouille_hub import checkpoint
from ratatouille_hub.artifacts import RunRecord, materialize
from ratatouille_hub.config import RecipeConfig, draw_hparams
from ratatouille_hub.data import ImageTensors, Normalization
from ratatouille_hub.fetch import resolve_model
from ratatouille_hub.models import (
    ArchitectureError,
    feature_dropout,
    head_parameter_names,
    load_classifier,
    set_head,
)
from ratatouille_hub.recipe import executor
from ratatouille_hub.recipe.plan import build_plan
from ratatouille_hub.target import Target, TargetSpec
from ratatouille_hub.train import (
    DomainBatches,
    LinearHead,
    TargetData,
    device_batch,
    linear_probe,
    make_accelerator,
    optimize,
    resolved_precision,
    validation_accuracy,
)

SIZE = 16
NORMALIZE = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ID2LABEL = {0: "a", 1: "b", 2: "c"}
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(n: int, seed: int, classes: int = 3) -> ImageTensors:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    return ImageTensors(pixels, torch.randint(0, classes, (n,), generator=generator))


@pytest.fixture(scope="module")
def data() -> TargetData:
    return TargetData(train=[images(24, 1), images(24, 2)], val=[images(6, 3), images(6, 4)], normalize=NORMALIZE)


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator("no")


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"), [(False, False, "no"), (True, True, "bf16"), (True, False, "no")]
)
def test_auto_precision_is_bf16_on_cuda_with_bf16_support_and_fp32_elsewhere(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolved_precision("auto") == expected
    assert (resolved_precision("no"), resolved_precision("bf16")) == ("no", "bf16")  # asked for: as asked


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's resolution")
def test_auto_precision_trains_in_fp32_on_cpu(accelerator):
    """Even where the CPU has bf16 units (AMX, avx512_bf16): there it did not pay (benchmarks/precision.py)."""
    assert make_accelerator("auto").mixed_precision == "no"


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def run_optimize(model, data, accelerator, **kwargs):
    arguments = dict(
        parameters=list(model.parameters()),
        steps=3,
        lr=1e-2,
        weight_decay=0.0,
        accelerator=accelerator,
        normalize=NORMALIZE,
        augment_seed=0,
    )
    return optimize(model, DomainBatches(data.train, 4, seed=0), **{**arguments, **kwargs})


# -- batches ----------------------------------------------------------------------------------------


def test_domain_batches_take_batch_size_from_every_domain_and_cover_each_epoch():
    domains = [
        ImageTensors(torch.zeros((5, 3, 2, 2), dtype=torch.uint8), torch.arange(5)),
        ImageTensors(torch.ones((3, 3, 2, 2), dtype=torch.uint8), torch.arange(3)),
    ]
    batches = DomainBatches(domains, 4, seed=0)
    small_domain = []
    for _ in range(6):
        pixels, labels = next(batches)
        assert pixels.shape == (8, 3, 2, 2)
        assert torch.equal(pixels[:4], torch.zeros_like(pixels[:4])) and torch.equal(
            pixels[4:], torch.ones_like(pixels[4:])
        )
        small_domain += labels[4:].tolist()
    epochs = [sorted(small_domain[i : i + 3]) for i in range(0, 24, 3)]  # 8 epochs of the 3-image domain
    assert epochs == [[0, 1, 2]] * 8

    def sequence(seed: int) -> list[list[int]]:
        batches = DomainBatches(domains, 4, seed=seed)
        return [next(batches)[1].tolist() for _ in range(6)]

    assert sequence(0) == sequence(0) != sequence(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_are_pinned_and_augmented_on_the_gpu(data):
    pixels, labels = next(DomainBatches(data.train, 4, seed=0))
    assert pixels.is_pinned() and labels.is_pinned() and pixels.dtype == torch.uint8
    x, on_gpu = device_batch((pixels, labels), torch.device("cuda"), NORMALIZE, torch.Generator().manual_seed(0))
    on_cpu, _ = device_batch((pixels, labels), torch.device("cpu"), NORMALIZE, torch.Generator().manual_seed(0))
    assert x.device.type == on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), labels)
    torch.testing.assert_close(x.cpu(), on_cpu, rtol=0, atol=1e-3)


# -- heads ------------------------------------------------------------------------------------------


def test_set_head_puts_exactly_those_tensors_in():
    model = tiny_model()
    before = snapshot(model)
    weight, bias = torch.randn(3, 16), torch.randn(3)
    set_head(model, weight, bias)
    after = model.state_dict()
    assert torch.equal(after["classifier.1.weight"], weight) and torch.equal(after["classifier.1.bias"], bias)
    assert head_parameter_names(model) == {"classifier.1.weight", "classifier.1.bias"}
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("classifier."))
    weight.add_(1.0)  # copied, not aliased
    assert not torch.equal(model.state_dict()["classifier.1.weight"], weight)
    with pytest.raises(ArchitectureError, match="head shape"):
        set_head(model, torch.zeros(4, 16), torch.zeros(4))


def test_feature_dropout_acts_on_the_head_input_in_training_only():
    model = tiny_model()
    x = NORMALIZE.from_uint8(images(8, 0).pixels)
    model.eval()
    clean = model(pixel_values=x).logits
    with feature_dropout(model, 0.5):
        assert torch.equal(model(pixel_values=x).logits, clean)  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        dropped = model(pixel_values=x).logits
        model.eval()
    assert not torch.allclose(dropped, clean)
    model.train()
    torch.manual_seed(0)
    assert torch.equal(model(pixel_values=x).logits, model(pixel_values=x).logits)  # hook removed
    assert set(model.state_dict()) == set(tiny_model().state_dict())


def test_linear_probe_ignores_the_checkpoint_head_and_leaves_the_model_alone(tiny_checkpoints, data, accelerator):
    heads = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # the re-initialised 3-class head is drawn from the global RNG
        model = load_classifier(tiny_checkpoints["base"], ID2LABEL)
        before = snapshot(model)
        heads.append(
            (
                linear_probe(
                    model, data, steps=12, lr=0.05, batch_size=4, eval_every=4, seed=0, accelerator=accelerator
                ),
                before["classifier.1.weight"],
            )
        )
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    (first, init_a), (second, init_b) = heads
    assert not torch.equal(init_a, init_b)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.weight.shape == (3, 16) and first.weight.abs().sum() > 0
    assert first.step in (4, 8, 12)


def test_linear_probe_reports_the_validation_accuracy_of_its_head(tiny_checkpoints, data, accelerator):
    torch.manual_seed(0)
    model = load_classifier(tiny_checkpoints["base"], ID2LABEL)
    head = linear_probe(model, data, steps=12, lr=0.05, batch_size=4, eval_every=4, seed=3, accelerator=accelerator)
    set_head(model, head.weight, head.bias)
    assert validation_accuracy(model, data.pooled_val, NORMALIZE) == head.val_accuracy


# -- optimize ---------------------------------------------------------------------------------------


def test_frozen_batchnorm_keeps_running_statistics_while_scale_and_shift_train(data, accelerator):
    model = tiny_model()
    before = snapshot(model)
    run_optimize(model, data, accelerator, freeze_bn=True)
    after = model.state_dict()
    norms = batchnorms(model)
    assert len(norms) >= 5
    for name in norms:
        for stat in BN_STATS:
            assert torch.equal(after[f"{name}.{stat}"], before[f"{name}.{stat}"]), (name, stat)
        for param in ("weight", "bias"):
            assert not torch.equal(after[f"{name}.{param}"], before[f"{name}.{param}"]), (name, param)


def test_batchnorm_in_train_mode_does_update_statistics(data, accelerator):
    # the control for the test above: the same training with freeze_bn=False moves every statistic
    model = tiny_model()
    before = snapshot(model)
    run_optimize(model, data, accelerator, freeze_bn=False)
    after = model.state_dict()
    for name in batchnorms(model):
        assert not torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"])
        assert after[f"{name}.num_batches_tracked"].item() == before[f"{name}.num_batches_tracked"].item() + 3


def test_best_validation_state_is_the_state_at_the_best_step(data, accelerator):
    model = tiny_model()
    scores = iter([0.2, 0.5, 0.5, 0.3])  # evaluations at steps 2, 4, 6 and the last step, 7
    states = []

    def validate(inner) -> float:
        states.append(snapshot(inner))
        return next(scores)

    outcome = run_optimize(model, data, accelerator, steps=7, eval_every=2, validate=validate)
    assert outcome.history == [(2, 0.2), (4, 0.5), (6, 0.5), (7, 0.3)]
    assert (outcome.step, outcome.val_accuracy) == (4, 0.5)  # a tie keeps the earlier step
    assert outcome.state.keys() == states[1].keys()
    assert all(torch.equal(outcome.state[k], v) for k, v in states[1].items())
    final = model.state_dict()
    assert not torch.equal(outcome.state["classifier.1.weight"], final["classifier.1.weight"])
    assert all(torch.equal(final[k], v) for k, v in states[3].items())  # the model itself ends at the last step


def test_without_validation_the_last_state_is_returned(data, accelerator):
    model = tiny_model()
    outcome = run_optimize(model, data, accelerator, steps=2)
    assert (outcome.step, outcome.val_accuracy, outcome.history) == (2, None, [])
    assert all(torch.equal(outcome.state[k], v) for k, v in model.state_dict().items())


def test_a_fine_tune_stopped_after_a_save_resumes_to_the_uninterrupted_outcome(
    data, accelerator, tmp_path, monkeypatch
):
    """Stopped at its evaluation of step 6, before saving there: resumed from the save at step 4 in a fresh
    model, optimizer and batch iterator (and another global generator state), it ends with the best state,
    step, history and last weights of a run never stopped, dropout and augmentation included."""
    monkeypatch.setattr(checkpoint, "SAVE_SHARE", math.inf)  # a save at every evaluation

    def accuracy(model) -> float:
        return validation_accuracy(model, data.pooled_val, NORMALIZE)

    settings = dict(steps=9, eval_every=2, dropout=0.5, validate=accuracy)
    reference = tiny_model()
    uninterrupted = run_optimize(reference, data, accelerator, **settings)

    class PowerCut(Exception):
        pass

    def cut_at_step_6(model) -> float:
        evaluations.append(1)
        if len(evaluations) == 3:
            raise PowerCut
        return accuracy(model)

    evaluations: list[int] = []
    progress = checkpoint.Checkpoint(tmp_path, started=time.monotonic())
    with pytest.raises(PowerCut):
        run_optimize(tiny_model(), data, accelerator, **{**settings, "validate": cut_at_step_6}, checkpoint=progress)
    assert progress.saved_step == 4

    torch.manual_seed(99)  # what the stopped process drew since is not the resumed one's
    resumed_model = tiny_model(seed=7)  # its own init: every weight comes from the save
    resumed = run_optimize(
        resumed_model, data, accelerator, **settings, checkpoint=checkpoint.Checkpoint(tmp_path, time.monotonic())
    )
    assert (resumed.step, resumed.val_accuracy, resumed.history) == (
        uninterrupted.step,
        uninterrupted.val_accuracy,
        uninterrupted.history,
    )
    assert all(torch.equal(resumed.state[k], v) for k, v in uninterrupted.state.items())
    assert all(torch.equal(resumed_model.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_each_step_loss_is_logged_and_each_evaluation_records_their_mean(data, accelerator):
    scores = iter([0.25, 0.75, 0.5])  # evaluations at steps 2, 4 and the last, 5
    logged: list[tuple[int, dict]] = []
    tracked = run_optimize(
        tiny_model(),
        data,
        accelerator,
        steps=5,
        eval_every=2,
        validate=lambda model: next(scores),
        log=lambda values, step: logged.append((step, values)),
    )
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5]
    step_losses = [values["train/step_loss"] for _, values in logged]
    assert all(0 < loss < 10 for loss in step_losses)  # cross-entropy over 3 classes starts near ln 3
    means = [statistics.fmean(step_losses[0:2]), statistics.fmean(step_losses[2:4]), step_losses[4]]
    assert tracked.losses == [(2, means[0]), (4, means[1]), (5, means[2])]
    evaluations = [
        (step, values["train/loss"], values["validation/accuracy"]) for step, values in logged if len(values) > 1
    ]
    assert evaluations == [(2, means[0], 0.25), (4, means[1], 0.75), (5, means[2], 0.5)]
    assert set(logged[0][1]) == {"train/step_loss"}
    # logging reads the losses only: the same training untracked ends in the same bytes, with the same losses
    scores = iter([0.25, 0.75, 0.5])
    untracked = run_optimize(
        tiny_model(), data, accelerator, steps=5, eval_every=2, validate=lambda model: next(scores)
    )
    assert untracked.losses == tracked.losses and untracked.step == tracked.step == 4
    assert all(torch.equal(untracked.state[k], v) for k, v in tracked.state.items())


def test_without_validation_the_loss_is_still_recorded_every_eval_every_steps(data, accelerator):
    outcome = run_optimize(tiny_model(), data, accelerator, steps=5, eval_every=2)
    assert [step for step, _ in outcome.losses] == [2, 4, 5] and outcome.history == []


def step_gradients(monkeypatch, model, data, accelerator, **kwargs):
    """Each step's gradient (lr 0: the model never moves, so steps are comparable) and the pass sizes."""
    gradients, passes, real_adam = [], [], Adam  # the unpatched class

    class RecordingAdam(real_adam):
        def step(self, closure=None):
            gradients.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    hook = model.register_forward_pre_hook(lambda m, args, kw: passes.append(len(kw["pixel_values"])), with_kwargs=True)
    try:
        run_optimize(model, data, accelerator, lr=0.0, **kwargs)
    finally:
        hook.remove()
    return gradients, passes


def test_micro_batches_accumulate_the_whole_batch_gradient(monkeypatch, data, accelerator):
    whole, whole_passes = step_gradients(monkeypatch, tiny_model(), data, accelerator)
    split, split_passes = step_gradients(monkeypatch, tiny_model(), data, accelerator, micro_batch=3, dropout=0.0)
    assert whole_passes == [8] * 3  # 4 images from each of 2 domains a step
    assert split_passes == [3, 3, 2] * 3
    for whole_step, split_step in zip(whole, split, strict=True):
        for a, b in zip(whole_step, split_step, strict=True):
            # float32 sums in another order: within 1e-5 of the step's largest gradient entry
            assert (a - b).abs().max() <= 1e-5 * max(g.abs().max() for g in whole_step)
    assert any(g.abs().max() > 0 for g in whole[0])


# -- one target fine-tune: shared head, warm-up, fresh optimizer --------------------------------------


class Recorder:
    """Wraps `optimize` (as the recipe calls it) and `torch.optim.Adam` to see what each phase did."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        self.optimizers: list[torch.optim.Adam] = []
        real_optimize, real_adam, optimizers = executor.optimize, torch.optim.Adam, self.optimizers

        class RecordingAdam(real_adam):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                optimizers.append(self)

        def recording(model, batches, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            call = {
                "desc": kwargs["desc"],
                "steps": kwargs["steps"],
                "before": snapshot(model),
                "parameters": {names[id(p)] for p in kwargs["parameters"]},
            }
            outcome = real_optimize(model, batches, **kwargs)
            call["after"] = snapshot(model)
            self.calls.append(call)
            return outcome

        monkeypatch.setattr(executor, "optimize", recording)
        monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)


def test_runs_start_from_the_shared_head_and_recycled_inits_warm_up_the_head_first(
    tiny_checkpoints, data, accelerator, monkeypatch, tmp_path
):
    config = RecipeConfig(
        base="b",
        target="t",
        runs=2,
        steps=4,
        eval_every=2,
        warmup_steps=3,
        batch_size=4,
        lr=1e-2,
        lr_choices=(1e-2,),
        output=str(tmp_path),
    )
    target = Target(
        reference="d",
        data=data,
        test=images(10, 5),
        train_domains=("d1", "d2"),
        test_domain="d3",
        id2label=ID2LABEL,
        fingerprint="fixed",
    )
    described = TargetSpec("d", ("d1", "d2"), "d3", ID2LABEL, "fixed", (24, 24), 12, 10, SIZE)
    generator = torch.Generator().manual_seed(9)
    head = LinearHead(torch.randn(3, 16, generator=generator), torch.randn(3, generator=generator), 1, 0.5)
    base, aux = resolve_model(str(tiny_checkpoints["base"])), resolve_model(str(tiny_checkpoints["aux1"]))
    plan = build_plan(config, base, [aux], described, datasets_of=lambda ingredient: ingredient.reference)
    assert [spec.init for spec in plan.runs] == [base, aux]  # run 0 from the base, run 1 recycled
    recorder = Recorder(monkeypatch)
    inputs = (head, target, accelerator, tmp_path, lambda line: None)
    records = [materialize(RunRecord, tmp_path / spec.folder, plan, spec, *inputs) for spec in plan.runs]

    assert [c["desc"] for c in recorder.calls] == ["run 0 of 2", "run 1 of 2 head warm-up", "run 1 of 2"]
    from_base, warmup, full = recorder.calls
    everything = set(from_base["before"]) - {n for n in from_base["before"] if n.endswith(BN_STATS)}
    head_names = {"classifier.1.weight", "classifier.1.bias"}

    # every run starts from exactly the shared head
    for call in (from_base, warmup):
        assert torch.equal(call["before"]["classifier.1.weight"], head.weight)
        assert torch.equal(call["before"]["classifier.1.bias"], head.bias)

    # a run from the base trains everything at once
    assert from_base["steps"] == 4 and from_base["parameters"] == everything

    # a recycled init: head alone for warmup_steps, backbone (weights and BN buffers) bit-identical ...
    assert warmup["steps"] == 3 and warmup["parameters"] == head_names
    for name, tensor in warmup["before"].items():
        same = torch.equal(warmup["after"][name], tensor)
        assert same != (name in head_names), name
    # ... then every parameter, from where the warm-up left it
    assert full["steps"] == 4 and full["parameters"] == everything
    assert all(torch.equal(full["before"][k], v) for k, v in warmup["after"].items())
    for name in everything:
        assert not torch.equal(full["after"][name], full["before"][name]), name

    # fresh Adam state for the full phase: its head steps count 4, not 3 + 4
    assert len(recorder.optimizers) == 3
    fresh = recorder.optimizers[2]
    assert sum(len(group["params"]) for group in fresh.param_groups) == len(everything)
    steps_seen = {int(state["step"]) for state in fresh.state.values()}
    assert steps_seen == {4}
    assert {int(state["step"]) for state in recorder.optimizers[1].state.values()} == {3}

    # BatchNorm statistics of each run are those of its init checkpoint; the run folder says what happened
    aux_file = load_file(tiny_checkpoints["aux1"] / "model.safetensors")
    saved = load_file(records[1].weights_file)
    for name, tensor in saved.items():
        if name.endswith(BN_STATS):
            assert torch.equal(tensor, aux_file[name]), name
    metrics = records[1].metrics
    assert metrics["warmup_steps"] == 3 and [step for step, _ in metrics["history"]] == [2, 4]
    assert metrics["hparams"] == vars(draw_hparams(config, 1)) and metrics["hparams"]["lr"] == 1e-2
    assert records[0].metrics["warmup_steps"] == 0
