"""Runtimes a trained model is timed in, behind one protocol and one registry (see
:mod:`harness.measure.runtimes.base`): eager PyTorch, ``torch.compile``, ONNX Runtime, OpenVINO, and OpenVINO with
BUnit's unit kernel as a custom operation.

Every built-in runtime module is imported here, explicitly and in a fixed order (the order of ``RUNTIMES``), so that
registration is predictable. Adding a runtime is one file: a :class:`Runtime` subclass decorated with
``@register_runtime("name")``, imported here (or by its user before the name is used).

Every runner's ``info`` holds ``runtime_version``: the software that produced the timing. On CUDA, ``variant_copy``
gives the bfloat16 copy and the 2:4 semi-structured copy that :mod:`harness.measure` builds (GPU paths untested
here: no GPU was available when this was written).
"""
from harness.measure.runtimes.base import (
    ATOL,
    DTYPES,
    ONNX_RUNTIMES,
    RTOL,
    RUNTIMES,
    Runner,
    Runtime,
    check_output,
    get_runtime,
    list_runtimes,
    make_runner,
    onnx_bytes,
    register_runtime,
    runtime_context,
    runtime_version,
    unregister_runtime,
    variant_copy,
)

# runtime modules, one class each (import order = registration order = the order of RUNTIMES)
from harness.measure.runtimes import eager, torch_compile  # noqa: F401  (PyTorch)
from harness.measure.runtimes.onnx_runtime import has_onnxruntime  # (onnx: ONNX Runtime)
from harness.measure.runtimes.openvino_runtime import has_openvino, openvino_compiled  # (openvino)
from harness.measure.runtimes import openvino_units  # noqa: F401  (openvino+units)

__all__ = ["ATOL", "DTYPES", "ONNX_RUNTIMES", "RTOL", "RUNTIMES", "Runner", "Runtime", "check_output", "get_runtime",
           "list_runtimes", "make_runner", "onnx_bytes", "openvino_compiled", "register_runtime", "runtime_context",
           "runtime_version", "unregister_runtime", "variant_copy", "has_onnxruntime", "has_openvino"]
