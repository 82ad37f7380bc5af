"""The ``openvino+units`` runtime: ``openvino`` with BUnit's unit kernel as an OpenVINO custom operation.

Every BUnit unit layer is exported as one custom ONNX node per group of same-spec units (``bunit::UnitGroup``,
BatchNorm folded, the residual block's shortcut and final ReLU inside) and runs BUnit's own unit kernel (the source
of ``fused_cpu``) as an OpenVINO custom operation (:mod:`harness.measure.openvino_ext`, built on first use). A model
without unit layers exports exactly as under ``openvino``, so dense references are the same graph.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.measure import openvino_ext
from harness.measure.runtimes.base import register_runtime
from harness.measure.runtimes.openvino_runtime import OpenVINO

__all__ = ["OpenVINOUnits"]


@register_runtime("openvino+units")
class OpenVINOUnits(OpenVINO):
    """:class:`OpenVINO` on an export whose unit layers are ``bunit::UnitGroup`` nodes."""

    def export(self, net: nn.Module, x: torch.Tensor) -> tuple[bytes, str | None, dict]:
        model, nodes = openvino_ext.export_with_units(net.float(), x.float())
        extension = str(openvino_ext.extension_path()) if nodes else None
        return model, extension, {"openvino_unit_nodes": nodes}
