"""Unstructured baselines: achieved sparsity, permanent masks, zeros that survive fine-tuning, schedules."""
import pytest
import torch

from baselines import MethodContext, get_method, list_methods
from baselines.counting import prunable_layers, weight_sparsity
from baselines.lamp import lamp_scores
from harness.core.models import create_backbone

from conftest import apply_iterative, digits_batches, make_finetune

UNSTRUCTURED = list_methods(family="unstructured")


pytestmark = pytest.mark.usefixtures("one_thread")


def zero_positions(model) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0).clone() for n, m in prunable_layers(model)}


@pytest.mark.parametrize("target", [0.5, 0.9])
@pytest.mark.parametrize("name", UNSTRUCTURED)
def test_reaches_target_sparsity_with_permanent_masks(name, target):
    torch.manual_seed(0)
    model = create_backbone("resnet20", shortcut="A")
    ctx = MethodContext(example_inputs=torch.randn(2, 3, 16, 16), seed=1)
    model = get_method(name).apply(model, target, ctx)
    zeros, total = weight_sparsity(model)
    assert total == 267_696 + 640  # the 19 conv weights of resnet20-A (no BN, no bias) + the 64x10 classifier
    assert abs(zeros / total - target) <= 0.005
    assert ctx.record["sparsity"] == zeros / total
    assert ctx.record["achieved"]["weights_zero"] == zeros
    assert ctx.record["epochs_finetune"] == 0 and ctx.record["epochs_finetune_final"] == 0
    assert ctx.record["epochs_sparse"] == 0
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())  # prune.remove made it permanent
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert 0.0 < ctx.record["achieved"]["layer_sparsity"]["fc"] < 1.0  # the classifier is pruned and counted


@pytest.mark.parametrize("name", UNSTRUCTURED)
def test_after_optimizer_step_keeps_pruned_weights_at_zero(name):
    torch.manual_seed(0)
    batches = digits_batches(128)
    model = create_backbone("resnet8", in_channels=1, shortcut="B")
    method = get_method(name)
    model = method.apply(model, 0.9, MethodContext(example_inputs=batches[0][0]))
    before = zero_positions(model)
    zeros_before, total = weight_sparsity(model)
    finetune, _ = make_finetune(method, batches[:1])
    finetune(model, 1)  # one optimizer step with momentum and weight decay
    after = zero_positions(model)
    assert weight_sparsity(model)[0] == zeros_before
    assert all(torch.equal(before[n], after[n]) for n in before)
    # the same step without the hook revives pruned weights: the hook is what keeps them at zero
    revived = create_backbone("resnet8", in_channels=1, shortcut="B")
    method2 = get_method(name)
    revived = method2.apply(revived, 0.9, MethodContext(example_inputs=batches[0][0]))
    make_finetune(method2, batches[:1], use_hook=False)[0](revived, 1)
    assert weight_sparsity(revived)[0] < zeros_before - total // 2


def test_iterative_schedule_prunes_in_steps_and_finetunes_between():
    _, ctx, calls = apply_iterative("global-magnitude", 0.875, digits_batches(256), shortcut="B", steps=3,
                                    finetune_epochs=4)
    assert calls == [(1, False), (1, False)]  # 4 // 3 = 1 epoch after steps 1 and 2
    assert ctx.record["epochs_finetune"] == 4 and ctx.final_finetune_epochs() == 2  # 2 inside apply + 2 after
    assert ctx.record["achieved"]["step_targets"] == pytest.approx([0.5, 0.75, 0.875])
    assert abs(ctx.record["sparsity"] - 0.875) <= 0.001


def test_layer_magnitude_prunes_every_layer_by_the_target():
    torch.manual_seed(0)
    model = get_method("layer-magnitude").apply(create_backbone("resnet20"), 0.7,
                                                MethodContext(example_inputs=torch.randn(1, 3, 16, 16)))
    for name, m in prunable_layers(model):
        assert int((m.weight == 0).sum()) == round(0.7 * m.weight.numel()), name


def test_global_magnitude_uses_one_threshold():
    torch.manual_seed(0)
    model = create_backbone("resnet20")
    original = {n: m.weight.detach().abs().clone() for n, m in prunable_layers(model)}
    model = get_method("global-magnitude").apply(model, 0.8, MethodContext(example_inputs=torch.randn(1, 3, 16, 16)))
    kept = torch.cat([original[n][m.weight != 0] for n, m in prunable_layers(model)])
    pruned = torch.cat([original[n][m.weight == 0] for n, m in prunable_layers(model)])
    assert kept.min() >= pruned.max()


def test_lamp_score_definition_and_no_layer_emptied():
    w = torch.tensor([[0.5, -2.0], [1.0, 0.1]])
    # ascending |w|: 0.1, 0.5, 1.0, 2.0 -> squares 0.01, 0.25, 1, 4; score = w^2 / sum of the rest from there on
    expected = torch.tensor([[0.25 / 5.25, 1.0], [1.0 / 5.0, 0.01 / 5.26]])
    assert torch.allclose(lamp_scores(w), expected)
    torch.manual_seed(0)
    model = get_method("lamp").apply(create_backbone("resnet20"), 0.99,
                                     MethodContext(example_inputs=torch.randn(1, 3, 16, 16)))
    assert all(int((m.weight != 0).sum()) >= 1 for _, m in prunable_layers(model))


def test_random_unstructured_is_seeded():
    masks = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        model = get_method("random-unstructured").apply(
            create_backbone("resnet8"), 0.5, MethodContext(example_inputs=torch.randn(1, 3, 8, 8), seed=seed))
        masks.append(torch.cat([(m.weight == 0).flatten() for _, m in prunable_layers(model)]))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, "0.5", None, True])
def test_bad_sparsity_target_names_the_field(target):
    with pytest.raises(ValueError, match=r"target: .* allowed: a sparsity in \(0, 1\)"):
        get_method("lamp").validate_target(target)
