"""The ``onnx`` runtime: an ONNX export run by ONNX Runtime.

``torch.onnx.export(..., dynamo=False, opset_version=17)`` for exactly this batch shape, then an
``onnxruntime.InferenceSession`` on the CPU execution provider (CUDA provider on a GPU: untested), all graph
optimisations on, ``intra_op_num_threads`` = the pass's thread count, one inter-op thread, sequential execution, and
idle thread-pool spinning off so that a session waiting for its turn does not burn the cores the next candidate is
timed on. The session's output must match eager within ``rtol=1e-3, atol=1e-4``; ``onnx_max_abs_err`` records the
difference.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.measure.runtimes.base import Runner, Runtime, onnx_bytes, register_runtime

try:
    import onnxruntime as _ort

    has_onnxruntime = True
except ImportError:  # pragma: no cover - an optional extra: pip install -c constraints.txt -e ".[onnx]"
    _ort = None
    has_onnxruntime = False

__all__ = ["OnnxRuntime", "has_onnxruntime"]


@register_runtime("onnx")
class OnnxRuntime(Runtime):
    """An ``onnxruntime.InferenceSession`` of the model's ONNX export."""

    via_onnx = True
    checked_as = "onnx"

    def unavailable(self) -> str | None:
        if has_onnxruntime:
            return None
        return "runtime onnx: onnxruntime is not installed; pip install -c constraints.txt -e '.[onnx]'"

    def version(self) -> str:
        return f"onnxruntime {_ort.__version__}" if has_onnxruntime else "onnxruntime (not installed)"

    def build(self, net: nn.Module, x: torch.Tensor, *, threads: int, device: torch.device) -> Runner:
        model = onnx_bytes(net.float(), x.float())
        options = _ort.SessionOptions()
        options.graph_optimization_level = _ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = _ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        session = _ort.InferenceSession(model, options, providers=providers)
        feed = {"input": x.detach().float().cpu().contiguous().numpy()}
        return Runner(lambda: session.run(None, feed), lambda: torch.from_numpy(session.run(None, feed)[0]),
                      {"onnx_bytes": len(model), "onnx_opset": 17, "onnxruntime": _ort.__version__})
