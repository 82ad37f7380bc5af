"""Sparse training (slimming, depgraph), iterative structured schedules and data-driven criteria, on real digits."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.datasets import load_digits

from baselines import MethodContext, get_method
from baselines.depgraph import group_penalty
from baselines.shortcut import convert_pad_shortcuts
from harness.run.models import create_backbone


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, and a busy 2-core machine makes torch's thread pool spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_batches(n: int = 192, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real 8x8 one-channel digit images, standardised, in a few batches."""
    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1)  # (n, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target[:n], dtype=torch.long)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def make_finetune(method, batches, lr: float = 0.05):
    """A plain SGD loop with momentum and weight decay, as the harness runs it; records its calls."""
    calls = []

    def finetune(model, epochs, regularize=None):
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        model.train()
        for _ in range(epochs):
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                if regularize is not None:
                    loss = regularize(model, loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.after_optimizer_step(model)
        calls.append((epochs, regularize is not None))
        return model

    return finetune, calls


@pytest.mark.parametrize("name", ["slimming", "depgraph"])
def test_sparse_training_then_iterative_pruning(name):
    torch.manual_seed(0)
    batches = digits_batches()
    model = create_backbone("resnet8", in_channels=1, shortcut="A")
    method = get_method(name)
    assert method.uses_sparse_training
    finetune, calls = make_finetune(method, batches)
    ctx = MethodContext(example_inputs=batches[0][0], calib_batches=batches[:1], finetune=finetune,
                        schedule="iterative", steps=2, finetune_epochs=3, sparse_epochs=1)
    model = method.apply(model, 0.4, ctx)
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
    model = create_backbone("resnet8", in_channels=1, shortcut="B")
    for m in model.modules():  # distinct channel norms
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.2)
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
    (F.cross_entropy(model(x), y) + 0).backward(retain_graph=False)
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
    batches = digits_batches()
    model = create_backbone("resnet8", in_channels=1, shortcut="B")
    ctx = MethodContext(example_inputs=batches[0][0], calib_batches=batches[:2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = get_method("taylor").apply(model, "macs:0.3", ctx)
    assert 0.3 <= ctx.record["macs_reduction"] <= 0.35
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():  # gradients were taken in eval mode: fresh BN statistics are untouched
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    # surviving weights are untouched slices of the originals (no training happened inside apply)
    assert torch.equal(model.fc.bias.detach(), before["fc.bias"])


def test_iterative_structured_schedule_finetunes_between_steps():
    torch.manual_seed(0)
    batches = digits_batches()
    model = create_backbone("resnet8", in_channels=1, shortcut="A")
    method = get_method("l1-filter")
    finetune, calls = make_finetune(method, batches)
    ctx = MethodContext(example_inputs=batches[0][0], finetune=finetune, schedule="iterative", steps=3,
                        finetune_epochs=3)
    model = method.apply(model, {"macs_reduction": 0.5}, ctx)
    assert calls == [(1, False), (1, False)]
    assert ctx.record["epochs_finetune"] == 3 and ctx.final_finetune_epochs() == 1  # 2 inside apply + 1 after
    assert ctx.record["epochs_sparse"] == 0
    assert 0.5 <= ctx.record["macs_reduction"] <= 0.55
    assert ctx.record["achieved"]["step_targets"] == pytest.approx([1 - 0.5 ** (1 / 3), 1 - 0.5 ** (2 / 3), 0.5])
    convert_pad_shortcuts(model)  # idempotent on an already converted model
    assert model(batches[0][0]).shape == (64, 10)
