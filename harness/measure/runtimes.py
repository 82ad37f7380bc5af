"""Runtimes a trained model is timed in: eager PyTorch, ``torch.compile``, ONNX Runtime and OpenVINO.

:func:`make_runner` turns a prepared model and one input batch into a function of no arguments that runs one
inference, plus what the runtime did to get there. Nothing here times anything (:mod:`bunit.timing` does);
every runner's output is checked against the eager model before it is handed out:

- ``eager``: the model itself (the caller runs the timing under ``torch.inference_mode``).
- ``compile``: ``torch.compile(model, dynamic=False)``; the whole session runs under :func:`runtime_context`
  (automatic dynamic shapes off, the recompile limits raised so that dynamo never falls back to eager
  silently); the first call compiles and its wall time is
  reported as ``compile_s``, never as latency. Output must match eager within ``rtol=1e-3, atol=1e-4``.
- ``onnx``: ``torch.onnx.export(..., dynamo=False, opset_version=17)`` for exactly this batch shape, then an
  ``onnxruntime.InferenceSession`` on the CPU execution provider (CUDA provider on a GPU: untested), all graph
  optimisations on, ``intra_op_num_threads`` = the pass's thread count, one inter-op thread, sequential
  execution, and idle thread-pool spinning off so that a session waiting for its turn does not burn the cores
  the next candidate is timed on. The session's output must match eager within ``rtol=1e-3, atol=1e-4``
  (float32 kernels differ in summation order; a wrong graph is off by far more); ``onnx_max_abs_err`` records
  the difference.
- ``openvino``: the same ONNX export, read by OpenVINO (``openvino.Core().read_model``) and compiled for its CPU
  plugin with ``INFERENCE_NUM_THREADS`` = the pass's thread count, one stream, the latency hint and
  ``INFERENCE_PRECISION_HINT = f32`` (the plugin's default on a CPU with AVX512-BF16 or AMX is bfloat16, which is
  another model); one infer request, its input tensor set once. Output checked like ``onnx``
  (``openvino_max_abs_err``). CPU only.
- ``openvino+units``: as ``openvino``, but every BUnit unit layer is exported as one custom ONNX node per group of
  same-spec units (``bunit::UnitGroup``, BatchNorm folded, the residual block's shortcut and final ReLU inside)
  and runs BUnit's own unit kernel (the source of ``fused_cpu``) as an OpenVINO custom operation
  (:mod:`harness.measure.openvino_ext`, built on first use). A model without unit layers exports exactly as
  under ``openvino``, so dense references are the same graph.

Every runner's ``info`` holds ``runtime_version`` (``torch 2.13.0+cpu``, ``onnxruntime 1.32.0``,
``openvino 2026.4.1-...``): the software that produced the timing.

On CUDA, ``variant_copy`` gives the bfloat16 copy and the 2:4 semi-structured copy that :mod:`harness.measure`
builds (GPU paths untested here: no GPU was available when this was written).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["RUNTIMES", "ONNX_RUNTIMES", "DTYPES", "RTOL", "ATOL", "make_runner", "runtime_context",
           "variant_copy", "runtime_version", "has_onnxruntime", "has_openvino"]

RUNTIMES = ("eager", "compile", "onnx", "openvino", "openvino+units")
ONNX_RUNTIMES = ("onnx", "openvino", "openvino+units")
"""Runtimes that run an ONNX export of the model as rebuilt (NCHW float32 input, the runtime's own kernels)."""
DTYPES = ("float32", "bfloat16", "bfloat16+2:4")
"""``dtype`` column values: float32 everywhere; on CUDA (eager) also a bfloat16 copy and its 2:4 form."""
RTOL, ATOL = 1e-3, 1e-4

try:
    import onnxruntime as _ort

    has_onnxruntime = True
except ImportError:  # pragma: no cover - an optional extra: pip install -c constraints.txt -e ".[onnx]"
    _ort = None
    has_onnxruntime = False

has_openvino = importlib.util.find_spec("openvino") is not None
"""Whether the optional ``openvino`` extra is installed (imported only when an OpenVINO runtime is used)."""


def _openvino_module():
    import openvino

    return openvino


def runtime_version(runtime: str) -> str:
    """The software a runtime's timings come from: ``torch <v>``, ``onnxruntime <v>`` or ``openvino <v>``."""
    if runtime in ("eager", "compile"):
        return f"torch {torch.__version__}"
    if runtime == "onnx":
        return f"onnxruntime {_ort.__version__}" if has_onnxruntime else "onnxruntime (not installed)"
    return f"openvino {_openvino_module().get_version()}" if has_openvino else "openvino (not installed)"


def variant_copy(model: nn.Module, dtype: str, device: torch.device, memory_format: str) -> tuple[nn.Module, dict]:
    """The copy of ``model`` that is timed for the ``dtype`` condition, and what was converted.

    Args:
        model: the prepared model (not changed).
        dtype: one of ``DTYPES``; the last two need CUDA.
        device: where the copy goes.
        memory_format: ``contiguous`` or ``channels_last``.

    Returns:
        ``(copy, info)``; ``info`` holds ``semi24_layers`` for the 2:4 form.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} not allowed; allowed: {', '.join(DTYPES)}")
    info: dict[str, Any] = {}
    if dtype == "bfloat16+2:4":
        from harness.measure.lowp import semi_structured_copy

        net, _, converted, total, _ = semi_structured_copy(model, device=device, memory_format=memory_format)
        info["semi24_layers"] = f"{converted}/{total}"
    else:
        net = copy.deepcopy(model).to(device=device, dtype=getattr(torch, dtype.split("+")[0]))
        if memory_format == "channels_last":
            net = net.to(memory_format=torch.channels_last)
    return net.eval(), info


def _check(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    err = float((got - expected).abs().max()) if got.numel() else 0.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
        raise RuntimeError(f"{what}: output differs from eager (max abs error {err:.3g}, rtol={RTOL}, atol={ATOL})")
    return err


def runtime_context(runtime: str) -> contextlib.AbstractContextManager:
    """Settings a whole session of ``runtime`` runs under: for ``compile``, static shapes and no recompile limit.

    Every model of a session is compiled through the same code objects (a backbone's block ``forward``), and frames
    after a graph break compile on later calls; with dynamo's defaults the ninth entry would fall back to eager
    silently and automatic dynamic shapes would compile shape-generic kernels.
    """
    if runtime != "compile":
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(automatic_dynamic_shapes=False, assume_static_by_default=True,
                                      recompile_limit=100_000, accumulated_recompile_limit=100_000)


def _compiled(net: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> tuple[Callable[[], Any], dict]:
    compiled = torch.compile(net, dynamic=False)
    with runtime_context("compile"), torch.inference_mode():
        t0 = time.perf_counter()  # one compile, reported as such; latency is timed by bunit.timing
        out = compiled(x)
        compile_s = time.perf_counter() - t0
    err = _check(out, expected, "compile")
    return (lambda: compiled(x)), {"compile_s": round(compile_s, 3), "compile_max_abs_err": err}


def onnx_bytes(net: nn.Module, x: torch.Tensor) -> bytes:
    """``torch.onnx.export(net, x, dynamo=False, opset_version=17)`` for exactly this input shape, as bytes."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks in forward become constants: fine
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"])
    return buf.getvalue()


def _onnx_session(net: nn.Module, x: torch.Tensor, threads: int, device: torch.device):
    if not has_onnxruntime:
        raise RuntimeError("runtime onnx: onnxruntime is not installed; pip install -c constraints.txt -e '.[onnx]'")
    model = onnx_bytes(net, x)
    options = _ort.SessionOptions()
    options.graph_optimization_level = _ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = _ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    return _ort.InferenceSession(model, options, providers=providers), len(model)


def _onnx(net: nn.Module, x: torch.Tensor, expected: torch.Tensor, threads: int,
          device: torch.device) -> tuple[Callable[[], Any], dict]:
    session, size = _onnx_session(net.float(), x.float(), threads, device)
    feed = {"input": x.detach().float().cpu().contiguous().numpy()}
    err = _check(torch.from_numpy(session.run(None, feed)[0]), expected, "onnx")
    return (lambda: session.run(None, feed)), {"onnx_max_abs_err": err, "onnx_bytes": size, "onnx_opset": 17,
                                               "onnxruntime": _ort.__version__}


def openvino_compiled(model: bytes, threads: int, *, extension: str | None = None):
    """An ONNX model (bytes) compiled by OpenVINO for its CPU plugin, float32, ``threads`` threads, one stream.

    Args:
        model: the ONNX model.
        threads: ``INFERENCE_NUM_THREADS``.
        extension: path of an OpenVINO extension library to add first (custom operations), or None.
    """
    if not has_openvino:
        raise RuntimeError("runtime openvino: openvino is not installed; pip install -c constraints.txt -e "
                           "'.[openvino]'")
    core = _openvino_module().Core()
    if extension is not None:
        core.add_extension(extension)
    config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32"}
    return core.compile_model(core.read_model(io.BytesIO(model)), "CPU", config)


def _openvino(net: nn.Module, x: torch.Tensor, expected: torch.Tensor, threads: int, device: torch.device,
              units: bool) -> tuple[Callable[[], Any], dict]:
    if device.type != "cpu":
        raise RuntimeError(f"runtime openvino: runs on the CPU here; got device {device}")
    info: dict[str, Any] = {}
    extension = None
    if units:
        from harness.measure import openvino_ext

        model, info["openvino_unit_nodes"] = openvino_ext.export_with_units(net.float(), x.float())
        extension = str(openvino_ext.extension_path()) if info["openvino_unit_nodes"] else None
    else:
        model = onnx_bytes(net.float(), x.float())
    compiled = openvino_compiled(model, threads, extension=extension)
    request = compiled.create_infer_request()
    data = x.detach().float().cpu().contiguous().numpy()
    ov = _openvino_module()
    request.set_input_tensor(ov.Tensor(data, shared_memory=True))  # set once: each call runs on the same batch
    request.infer()
    err = _check(torch.from_numpy(request.get_output_tensor(0).data.copy()), expected, "openvino")
    return request.infer, {**info, "openvino_max_abs_err": err, "onnx_bytes": len(model), "onnx_opset": 17,
                           "openvino": ov.get_version(), "openvino_precision": "f32"}


def make_runner(runtime: str, net: nn.Module, x: torch.Tensor, *, threads: int,
                device: torch.device) -> tuple[Callable[[], Any], dict]:
    """A function of no arguments running one inference of ``net`` on ``x`` in ``runtime``, checked against eager.

    Args:
        runtime: one of ``RUNTIMES``.
        net: the prepared model in eval mode, on ``device``, in the dtype and layout of ``x``.
        x: the input batch.
        threads: intra-op threads (ONNX Runtime's session option, OpenVINO's ``INFERENCE_NUM_THREADS``; torch's
            are set by the caller).
        device: where ``net`` lives.

    Returns:
        ``(run, info)``: ``info`` says what the runtime did (compile time, ONNX size and error against eager) and
        holds ``runtime_version``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: {runtime!r} not allowed; allowed: {', '.join(RUNTIMES)}")
    with torch.inference_mode():
        expected = net(x)
    if runtime == "eager":
        run, info = (lambda: net(x)), {}
    elif runtime == "compile":
        run, info = _compiled(net, x, expected)
    elif runtime == "onnx":
        run, info = _onnx(net, x, expected, threads, device)
    else:
        run, info = _openvino(net, x, expected, threads, device, units=runtime == "openvino+units")
    return run, {**info, "runtime_version": runtime_version(runtime)}
