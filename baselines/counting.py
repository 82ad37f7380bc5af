"""Counts the baselines need while they prune: prunable weights, sparsity, layer widths, and conv+linear MACs.

``harness/measure/`` owns the numbers that go into a row; these are the methods' own gauges (baselines do not
import harness internals). ``count_macs`` follows the literature's convention that ``harness.measure`` uses too:
multiply-accumulates of convolution and linear layers only, for one sample (CIFAR ResNet-56 at 32x32: 125.49M).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["prunable_layers", "weight_sparsity", "layer_widths", "count_macs"]


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` by module name, classifier included, in module order.

    Args:
        model: the network.

    Returns:
        ``[(name, module), ...]`` for the layers whose ``weight`` unstructured pruning may zero.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def weight_sparsity(model: nn.Module) -> tuple[int, int]:
    """Zeros and total entries over the weights of :func:`prunable_layers` (biases and BN excluded).

    Returns:
        ``(zeros, total)``.
    """
    zeros = total = 0
    for _, m in prunable_layers(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros, total


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Conv2d (``out_channels``) and Linear (``out_features``) by module name."""
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) for n, m in prunable_layers(model)}


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of all Conv2d and Linear layers for one sample, measured by forward hooks.

    Args:
        model: the network; its training mode is restored afterwards.
        example_inputs: a batch shaped like real inputs; only its first sample is run.

    Returns:
        MACs per sample (int).
    """
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, out: torch.Tensor) -> None:
        nonlocal total
        kernel = m.kernel_size[0] * m.kernel_size[1]
        total += out[0].numel() * (m.in_channels // m.groups) * kernel

    def linear_hook(m: nn.Linear, inputs, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
             for _, m in prunable_layers(model)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return int(total)
