"""Low-precision and sparse-kernel copies timed on CUDA: bfloat16, and 2:4 semi-structured sparsity.

``*_bf16`` columns time a bfloat16 copy. ``*_semi24`` columns time a bfloat16 copy in which every ``nn.Linear``
and every ``nn.Conv2d`` (groups 1, zero padding) whose 2-D weight ``(out, in * kh * kw)`` meets
``to_sparse_semi_structured``'s shape rules gets a 2:4 magnitude mask (a no-op for weights already 2:4) and runs
as a semi-structured sparse GEMM (a conv via ``F.unfold``); other layers stay dense bfloat16. It runs under
``torch.no_grad``, its output is checked against the dense masked copy, and ``semi24_layers`` says how many
layers were converted. Compare it with ``*_bf16``; the accuracy of the masked copy is not measured here.
No GPU has run these paths yet in this project's sessions.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.core.devices import normalize_device
from harness.core.models import SubsampledProjection
from harness.measure.latency import make_batch, prepared_copy, timed_pass

__all__ = ["has_semi_structured", "bf16_columns", "semi24_columns", "mask_2to4", "GemmConv2d",
           "semi_structured_copy"]

has_semi_structured = hasattr(torch.sparse, "to_sparse_semi_structured")


def bf16_columns(model: nn.Module, example: torch.Tensor, row: dict[str, Any], common: dict) -> list[str]:
    try:
        net = prepared_copy(model, common["device"], torch.bfloat16, common["memory_format"])
        result = timed_pass(net, example, dtype=torch.bfloat16, mem_base=None, **common)
        row["latency_ms_p50_b1_bf16"] = result["b1"]["p50"]
        row["latency_ms_p50_bt_bf16"] = result["bt"]["p50"] if result["bt"] else None
        return []
    except Exception as err:  # noqa: BLE001
        return [f"bf16: {type(err).__name__}: {err}"]


def semi24_columns(model: nn.Module, example: torch.Tensor, row: dict[str, Any], common: dict) -> list[str]:
    if not has_semi_structured:
        return ["semi24: torch.sparse.to_sparse_semi_structured is not available"]
    try:
        device, fmt = common["device"], common["memory_format"]
        net, reference, converted, total, last_error = semi_structured_copy(model, device=device, memory_format=fmt)
        row["semi24_layers"] = f"{converted}/{total}"
        if converted == 0:
            del net, reference
            return [f"semi24: no layer could be converted ({last_error})"] if last_error else []
        x = make_batch(example, 1, device, torch.bfloat16, fmt)
        with torch.no_grad():
            expected, got = reference(x).float(), net(x).float()
        del reference
        rel = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-6))
        if not rel <= 0.05:
            return [f"semi24: output differs from the dense 2:4-masked copy (max rel. error {rel:.3g})"]
        result = timed_pass(net, example, dtype=torch.bfloat16, mem_base=None, grad_mode=torch.no_grad, **common)
        row["latency_ms_p50_b1_semi24"] = result["b1"]["p50"]
        row["latency_ms_p50_bt_semi24"] = result["bt"]["p50"] if result["bt"] else None
        return []
    except Exception as err:  # noqa: BLE001
        return [f"semi24: {type(err).__name__}: {err}"]



def mask_2to4(weight2d: torch.Tensor) -> torch.Tensor:
    """Keep the two largest-magnitude entries of every group of 4 consecutive entries of each row.

    A weight that is already 2:4 (at most two non-zeros per group) comes back unchanged.

    Args:
        weight2d: ``(rows, cols)`` with ``cols`` divisible by 4.

    Returns:
        A new tensor of the same shape, dtype and device with the 2:4 pattern.
    """
    if weight2d.dim() != 2 or weight2d.shape[1] % 4:
        raise ValueError(f"weight2d: expected a 2-D tensor with columns divisible by 4; got {tuple(weight2d.shape)}")
    rows, cols = weight2d.shape
    groups = weight2d.reshape(rows, cols // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight2d.device).scatter_(-1, keep, True)
    return (groups * mask).reshape(rows, cols)


class GemmConv2d(nn.Module):
    """A ``nn.Conv2d`` (groups 1, zero padding) computed as one matrix product over ``F.unfold`` patches.

    ``weight2d`` is ``(out_channels, in_channels * kh * kw)``: a dense tensor, or a
    ``SparseSemiStructuredTensor`` for the 2:4 timing.
    """

    def __init__(self, conv: nn.Conv2d, weight2d: torch.Tensor):
        super().__init__()
        if not self.supports(conv):
            raise ValueError("conv: GemmConv2d needs nn.Conv2d with groups=1, padding_mode='zeros', numeric padding")
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.weight2d = nn.Parameter(weight2d, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        return (type(conv) in (nn.Conv2d, SubsampledProjection) and conv.groups == 1 and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], b * ho * wo)  # (Cin*kh*kw, B*Ho*Wo)
        out = torch.mm(self.weight2d, cols)  # (Cout, B*Ho*Wo)
        out = out.view(self.out_channels, b, ho, wo).transpose(0, 1)  # (B, Cout, Ho, Wo)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.contiguous()


class _SemiLinear(nn.Module):
    """``nn.Linear`` with a semi-structured sparse weight."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., out_features)


def semi_structured_copy(model: nn.Module, *, device: str | torch.device,
                         memory_format: str = "contiguous") -> tuple[nn.Module, nn.Module, int, int, str | None]:
    """A bfloat16 copy whose eligible conv/linear layers run as 2:4 semi-structured sparse GEMMs (CUDA only).

    Eligible: ``nn.Linear`` and ``nn.Conv2d`` (groups 1, zero padding) whose weight, as ``(out, in * kh * kw)``,
    ``torch.sparse.to_sparse_semi_structured`` accepts after a 2:4 magnitude mask.

    Args:
        model: the network (not changed).
        device: a CUDA device.
        memory_format: layout of the dense parts of the copy.

    Returns:
        ``(sparse_copy, dense_reference, converted, total, last_error)``: the reference is the dense bfloat16
        copy with the same 2:4 masks, ``converted`` of ``total`` conv/linear layers were converted, and
        ``last_error`` is the last conversion error (``None`` if none).
    """
    device = normalize_device(device)
    reference = prepared_copy(model, device, torch.bfloat16, memory_format)
    replacements: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    total, last_error = 0, None
    for name, layer in reference.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        total += 1
        if isinstance(layer, nn.Conv2d) and not GemmConv2d.supports(layer):
            continue
        weight = layer.weight.detach()
        if weight.reshape(weight.shape[0], -1).shape[1] % 4:
            continue
        masked = mask_2to4(weight.reshape(weight.shape[0], -1)).contiguous()
        try:
            sparse = torch.sparse.to_sparse_semi_structured(masked)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            last_error = f"{type(err).__name__}: {err}"
            continue
        with torch.no_grad():
            layer.weight.copy_(masked.view(weight.shape))  # the reference holds the same 2:4 weights
        replacements[name] = (layer, sparse)
    net = copy.deepcopy(reference)
    for name, (layer, sparse) in replacements.items():
        new = GemmConv2d(layer, sparse) if isinstance(layer, nn.Conv2d) else _SemiLinear(layer, sparse)
        net.set_submodule(name, new)
    return net.eval(), reference, len(replacements), total, last_error

