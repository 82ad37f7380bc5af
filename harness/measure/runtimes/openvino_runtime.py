"""The ``openvino`` runtime: an ONNX export compiled by OpenVINO for its CPU plugin.

The same ONNX export as ``onnx``, read by OpenVINO (``openvino.Core().read_model``) and compiled with
``INFERENCE_NUM_THREADS`` = the pass's thread count, one stream, the latency hint and
``INFERENCE_PRECISION_HINT = f32`` (the plugin's default on a CPU with AVX512-BF16 or AMX is bfloat16, which is
another model); one infer request, its input tensor set once. Output checked like ``onnx``
(``openvino_max_abs_err``). CPU only.
"""
from __future__ import annotations

import importlib.util
import io

import torch
import torch.nn as nn

from harness.measure.runtimes.base import Runner, Runtime, onnx_bytes, register_runtime

__all__ = ["OpenVINO", "openvino_compiled", "has_openvino"]

has_openvino = importlib.util.find_spec("openvino") is not None
"""Whether the optional ``openvino`` extra is installed (imported only when an OpenVINO runtime is used)."""
_MISSING = "runtime openvino: openvino is not installed; pip install -c constraints.txt -e '.[openvino]'"


def _openvino_module():
    import openvino  # an optional extra, slow to import: loaded when an OpenVINO runtime is used

    return openvino


def openvino_compiled(model: bytes, threads: int, *, extension: str | None = None):
    """An ONNX model (bytes) compiled by OpenVINO for its CPU plugin, float32, ``threads`` threads, one stream.

    Args:
        model: the ONNX model.
        threads: ``INFERENCE_NUM_THREADS``.
        extension: path of an OpenVINO extension library to add first (custom operations), or None.
    """
    if not has_openvino:
        raise RuntimeError(_MISSING)
    core = _openvino_module().Core()
    if extension is not None:
        core.add_extension(extension)
    config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32"}
    return core.compile_model(core.read_model(io.BytesIO(model)), "CPU", config)


@register_runtime("openvino")
class OpenVINO(Runtime):
    """OpenVINO's CPU plugin on the model's ONNX export (:meth:`export`), one infer request."""

    via_onnx = True
    checked_as = "openvino"

    def unavailable(self) -> str | None:
        return None if has_openvino else _MISSING

    def version(self) -> str:
        return f"openvino {_openvino_module().get_version()}" if has_openvino else "openvino (not installed)"

    def export(self, net: nn.Module, x: torch.Tensor) -> tuple[bytes, str | None, dict]:
        """The ONNX model, the extension library it needs (or None) and what the export did."""
        return onnx_bytes(net.float(), x.float()), None, {}

    def build(self, net: nn.Module, x: torch.Tensor, *, threads: int, device: torch.device) -> Runner:
        if device.type != "cpu":
            raise RuntimeError(f"runtime openvino: runs on the CPU here; got device {device}")
        model, extension, info = self.export(net, x)
        request = openvino_compiled(model, threads, extension=extension).create_infer_request()
        data = x.detach().float().cpu().contiguous().numpy()
        ov = _openvino_module()
        request.set_input_tensor(ov.Tensor(data, shared_memory=True))  # set once: each call runs on the same batch

        def output() -> torch.Tensor:
            request.infer()
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        return Runner(request.infer, output, {**info, "onnx_bytes": len(model), "onnx_opset": 17,
                                              "openvino": ov.get_version(), "openvino_precision": "f32"})
