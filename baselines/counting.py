"""The one counter of bunit-bench: parameters, sparsity, layer widths and multiply-accumulates.

Every count in the project comes from here: the numbers in a row (``harness.measure``), the MACs targets the
structured methods and the BUnit planner reach, and ``bunitbench inspect``. It lives in ``baselines/``
because that is the lowest package that needs MAC counts (``harness`` imports it; ``baselines`` never imports
``harness``).

Conventions:

- ``params``: every parameter once (shared ones once). ``params_nonzero``: entries that are not exactly zero,
  of the *effective* weight when a ``torch.nn.utils.prune`` re-parametrisation is attached.
- ``macs``: multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` call for one sample, plus one add
  per output element of a bias: ``uses x weight entries + bias adds``, where a conv weight is used once per
  output position and a linear weight once per output row. This equals ptflops' ``backend="aten"`` total
  (and thop and fvcore on conv + linear, bias adds aside); the tests check it. CIFAR ResNet-56 (option A) at
  32x32: 125,485,706. Other operations (BN, ReLU, pooling, element-wise adds) are not counted.
- ``macs_nonzero``: the same with each layer's weight part scaled to its non-zero weights (what unstructured
  sparsity could save); bias adds stay. For a dense model ``macs_nonzero == macs``.
- Hooks see the modules that run: count a model in the form it was built and trained (BUnit unit layers on
  their default ``grouped`` backend, whose grouped convolutions are exactly the units' convolutions), before
  anything picks other execution backends for inference.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["prunable_layers", "weight_sparsity", "layer_widths", "count_params", "count_params_nonzero",
           "layer_macs", "count_macs", "count_costs"]


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` by module name, classifier included, in module order."""
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


def count_params(model: nn.Module) -> int:
    """All parameters of ``model``, shared ones counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_params_nonzero(model: nn.Module) -> int:
    """Parameters that are not exactly zero (a pruning mask's zeros count as zero)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            mask = getattr(module, name[: -len("_orig")] + "_mask", None) if name.endswith("_orig") else None
            value = param.detach() if mask is None else param.detach() * mask
            total += int(torch.count_nonzero(value))
    return total


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _one_sample(model: nn.Module, inputs: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """One input sample: the first row of a batch, or zeros of a per-sample shape such as ``(3, 32, 32)``."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1]
    shape = tuple(int(s) for s in inputs)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape: expected the per-sample shape, e.g. (3, 32, 32); got {inputs!r}")
    device, dtype = _model_device_dtype(model)
    return torch.zeros((1, *shape), device=device, dtype=dtype)


@torch.no_grad()
def layer_macs(model: nn.Module, inputs: torch.Tensor | Sequence[int]) -> dict[str, tuple[int, int]]:
    """MACs of every Conv2d/Linear call for one sample, by module name: ``(dense, non-zero weights only)``.

    Args:
        model: the network; its train/eval flags are restored and no hook is left behind.
        inputs: a batch shaped like real inputs (its first sample runs) or the per-sample input shape.

    Returns:
        ``{name: (macs, macs_nonzero)}`` for the modules that ran, bias adds included in both.
    """
    counts: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        def fn(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            weight = module.weight.detach()
            if isinstance(module, nn.Linear):
                uses = out.numel() // module.out_features  # each weight entry once per output row
            else:
                uses = out.shape[0] * math.prod(out.shape[2:])  # once per output position
            bias_adds = out.numel() if module.bias is not None else 0
            dense, nonzero = counts.get(name, (0, 0))
            counts[name] = (dense + uses * weight.numel() + bias_adds,
                            nonzero + uses * int(torch.count_nonzero(weight)) + bias_adds)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in prunable_layers(model)]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model(_one_sample(model, inputs))
    finally:
        for m, flag in flags:
            m.training = flag
        for h in handles:
            h.remove()
    return counts


def count_macs(model: nn.Module, inputs: torch.Tensor | Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass for one sample (the convention in the module docstring)."""
    return sum(dense for dense, _ in layer_macs(model, inputs).values())


def count_costs(model: nn.Module, inputs: torch.Tensor | Sequence[int]) -> dict[str, int]:
    """``params``, ``params_nonzero``, ``macs`` and ``macs_nonzero`` of ``model`` for one sample."""
    per_layer = layer_macs(model, inputs)
    return {"params": count_params(model), "params_nonzero": count_params_nonzero(model),
            "macs": sum(d for d, _ in per_layer.values()), "macs_nonzero": sum(n for _, n in per_layer.values())}
