"""Sparse training (slimming, depgraph), iterative structured schedules and data-driven criteria, on real digits."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from baselines import MethodContext, get_method
from baselines.depgraph import group_penalty
from baselines.shortcut import convert_pad_shortcuts
from harness.core.models import create_backbone

from conftest import apply_iterative, digits_batches, spread_bn


pytestmark = pytest.mark.usefixtures("one_thread")


def is_slice_of(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether ``new`` keeps entries of ``old`` unchanged and in order (torch-pruning keeps sorted indices).

    Removing channels with sorted index lists along any dimensions keeps the row-major order, so the flattened
    ``new`` is a subsequence of the flattened ``old``; a weight that was trained or re-initialised is not.
    """
    remaining = iter(old.detach().flatten().tolist())
    return all(any(v == w for w in remaining) for v in new.detach().flatten().tolist())


@pytest.mark.parametrize("name", ["slimming", "depgraph"])
def test_sparse_training_then_iterative_pruning(name):
    assert get_method(name).uses_sparse_training
    batches = digits_batches(192)
    model, ctx, calls = apply_iterative(name, 0.4, batches, shortcut="A", steps=2, finetune_epochs=3,
                                        calib_batches=batches[:1], sparse_epochs=1)
    assert calls == [(1, True), (1, False)]  # sparse training with the regularizer, then 3 // 2 between the steps
    assert ctx.record["epochs_sparse"] == 1
    assert ctx.record["epochs_finetune"] == 3 and ctx.record["epochs_finetune_final"] == 2  # 1 inside + 2 after
    assert ctx.final_finetune_epochs() == 2
    assert ctx.record["achieved"]["step_targets"] == pytest.approx([1 - 0.6 ** 0.5, 0.4])
    assert 0.4 <= ctx.record["channel_ratio"] <= 0.45
    assert model(batches[0][0]).shape == (64, 10)


def test_slimming_regularizer_is_the_l1_of_bn_scales():
    model = create_backbone("resnet8", shortcut="B")
    method = get_method("slimming")
    loss = torch.tensor(1.0)
    gammas = torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    assert gammas.numel() == 16 + (16 + 16) + (32 + 32 + 32) + (64 + 64 + 64)  # stem, 3 blocks, 2 projections
    assert method.regularize(model, loss).item() == pytest.approx(1.0 + method.l1 * gammas.sum().item())


def test_depgraph_penalty_gradient_equals_torch_pruning_regularizer():
    """Our loss term yields exactly the gradient GroupNormPruner.regularize adds (reg 1e-4, strengths 1..16)."""
    torch.manual_seed(0)
    x, y = digits_batches(32, 32)[0]
    model = spread_bn(create_backbone("resnet8", in_channels=1, shortcut="B"), 0)  # distinct channel norms
    reference = create_backbone("resnet8", in_channels=1, shortcut="B")
    reference.load_state_dict(model.state_dict())

    pruner = tp.pruner.GroupNormPruner(reference, x, tp.importance.GroupMagnitudeImportance(p=2), reg=1e-4,
                                       ignored_layers=[reference.fc])
    reference.eval()
    F.cross_entropy(reference(x), y).backward()
    pruner.regularize(reference)  # adds reg * gamma * w to the gradients

    method = get_method("depgraph")
    method._example = x
    model.eval()
    F.cross_entropy(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    method.regularize(model, F.cross_entropy(model(x), y)).backward()
    ours = dict(model.named_parameters())
    changed = 0
    for name, p in reference.named_parameters():
        assert torch.allclose(ours[name].grad, p.grad, rtol=1e-4, atol=1e-9), name
        changed += not torch.equal(plain[name], p.grad)
    assert changed == 9 + 9 + 1  # all 9 conv weights, all 9 BN scales and the classifier's input columns
    assert group_penalty(method._groups, 1e-4, 4.0).item() > 0


def test_taylor_uses_calibration_gradients_and_leaves_none_behind():
    torch.manual_seed(0)
    batches = digits_batches(192)
    model = spread_bn(create_backbone("resnet8", in_channels=1, shortcut="B"), 0)
    ctx = MethodContext(example_inputs=batches[0][0], calib_batches=batches[:2])
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    model = get_method("taylor").apply(model, "macs:0.3", ctx)
    assert 0.3 <= ctx.record["macs_reduction"] <= 0.35
    assert all(p.grad is None for p in model.parameters())
    # every surviving parameter and BN statistic is an untouched slice of the original: no training happened
    # inside apply, and the gradients were taken in eval mode (train mode would move the running statistics)
    after = model.state_dict()
    assert set(after) == set(before)
    assert sum(t.numel() for t in after.values()) < sum(t.numel() for t in before.values())  # something was pruned
    for name, tensor in after.items():
        assert is_slice_of(tensor, before[name]), name


def test_iterative_structured_schedule_finetunes_between_steps():
    batches = digits_batches(192)
    model, ctx, calls = apply_iterative("l1-filter", {"macs_reduction": 0.5}, batches, shortcut="A", steps=3,
                                        finetune_epochs=3)
    assert calls == [(1, False), (1, False)]
    assert ctx.record["epochs_finetune"] == 3 and ctx.final_finetune_epochs() == 1  # 2 inside apply + 1 after
    assert ctx.record["epochs_sparse"] == 0
    assert 0.5 <= ctx.record["macs_reduction"] <= 0.55
    assert ctx.record["achieved"]["step_targets"] == pytest.approx([1 - 0.5 ** (1 / 3), 1 - 0.5 ** (2 / 3), 0.5])
    assert ctx.record["achieved"]["option_a_shortcuts"] == 2  # apply converted the two zero-padding shortcuts
    model.eval()
    state, out = {k: v.clone() for k, v in model.state_dict().items()}, model(batches[0][0])
    assert out.shape == (64, 10)
    assert convert_pad_shortcuts(model) == 0  # idempotent: nothing left to convert, nothing changed
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(batches[0][0]), out)
