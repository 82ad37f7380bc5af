"""The protocol of a timing-pass runtime, the registry of them, and :func:`make_runner`, which every timing uses.

A runtime turns a prepared model and one input batch into a function of no arguments that runs one inference
(:meth:`Runtime.build`). It says:

- ``via_onnx``: it runs an ONNX export of the model as rebuilt (NCHW float32 input, the runtime's own kernels), so
  the method's own preparation for inference and other memory formats do not apply.
- ``unavailable()``: why it cannot run here (its package is not installed), or None.
- ``version()``: the software a timing comes from (``torch 2.13.0+cpu``, ``onnxruntime 1.32.0``, ...).
- ``session()``: settings a whole timing session of it runs under (``compile``: static shapes, no recompile limit).
- ``rtol``, ``atol``: how close its output must be to eager's; ``checked_as``: the name its check reports under
  (``<checked_as>_max_abs_err`` in the runner's info), None for eager itself.

:func:`make_runner` checks every runner's output against the eager model before handing it out. Nothing here times
anything (:mod:`bunit.timing` does). A runtime is one class registered by name (``@register_runtime("name")``);
:mod:`harness.measure.runtimes` imports the built-in ones in the order ``RUNTIMES`` lists them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from bunit.registry import NameView, Registry
from harness.measure.lowp import semi_structured_copy

__all__ = ["Runtime", "Runner", "register_runtime", "unregister_runtime", "get_runtime", "list_runtimes",
           "RUNTIMES", "ONNX_RUNTIMES", "DTYPES", "RTOL", "ATOL", "make_runner", "runtime_context", "runtime_version",
           "variant_copy", "check_output", "onnx_bytes"]

DTYPES = ("float32", "bfloat16", "bfloat16+2:4")
"""``dtype`` column values: float32 everywhere; on CUDA (eager) also a bfloat16 copy and its 2:4 form."""
RTOL, ATOL = 1e-3, 1e-4
"""The default tolerance of a runtime's output against eager: float32 kernels differ in summation order, a wrong
graph is off by far more."""

_REGISTRY: Registry["Runtime"] = Registry("runtime")


class Runner(NamedTuple):
    """What :meth:`Runtime.build` returns: ``run()`` (what is timed), ``output()`` (runs once, returns the output as
    a CPU tensor), ``info`` (what the runtime did to get there)."""

    run: Callable[[], Any]
    output: Callable[[], torch.Tensor]
    info: dict


class Runtime:
    """How a model runs in one runtime: override :meth:`build` (and :meth:`version`, :meth:`unavailable`)."""

    name: str = ""
    via_onnx: bool = False
    rtol: float = RTOL
    atol: float = ATOL
    checked_as: str | None = None

    def unavailable(self) -> str | None:
        """Why this runtime cannot run here (a missing package, with how to install it), or None."""
        return None

    def version(self) -> str:
        """The software its timings come from."""
        return f"torch {torch.__version__}"

    def session(self) -> contextlib.AbstractContextManager:
        """Settings a whole session of this runtime runs under (none by default)."""
        return contextlib.nullcontext()

    def build(self, net: nn.Module, x: torch.Tensor, *, threads: int, device: torch.device) -> Runner:
        """A runner of ``net`` on ``x`` (see :func:`make_runner` for the arguments)."""
        raise NotImplementedError(f"runtime {self.name!r} does not implement build()")


def register_runtime(name: str):
    """Class decorator: register a :class:`Runtime` subclass under ``name``; raises on a duplicate."""
    return _REGISTRY.register(name)


def unregister_runtime(name: str) -> None:
    """Remove a registered runtime (a test's own, or one a plugin replaces)."""
    _REGISTRY.unregister(name)


def list_runtimes(*, via_onnx: bool | None = None) -> tuple[str, ...]:
    """Registered runtime names in registration order; only those that run an ONNX export (or only others) when
    asked."""
    return _REGISTRY.names(lambda r: via_onnx is None or r.via_onnx == via_onnx)


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name``; raises ``ValueError`` naming the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"runtime: {name!r} not allowed; allowed: {', '.join(list_runtimes())}")
    return _REGISTRY.get(name)


RUNTIMES = NameView(_REGISTRY)
"""Every registered runtime name, in registration order (a live view of the registry)."""
ONNX_RUNTIMES = NameView(_REGISTRY, lambda r: r.via_onnx)
"""Runtimes that run an ONNX export of the model as rebuilt (NCHW float32 input, the runtime's own kernels)."""


def runtime_version(runtime: str) -> str:
    """The software a runtime's timings come from: ``torch <v>``, ``onnxruntime <v>`` or ``openvino <v>``."""
    return get_runtime(runtime).version()


def runtime_context(runtime: str) -> contextlib.AbstractContextManager:
    """Settings a whole session of ``runtime`` runs under (:meth:`Runtime.session`)."""
    return get_runtime(runtime).session()


def check_output(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL,
                 atol: float = ATOL) -> float:
    """The largest absolute difference of ``got`` from ``expected``; raises ``RuntimeError`` naming ``what`` when
    they differ beyond ``rtol``/``atol`` or in shape."""
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    err = float((got - expected).abs().max()) if got.numel() else 0.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=rtol, atol=atol):
        raise RuntimeError(f"{what}: output differs from eager (max abs error {err:.3g}, rtol={rtol}, atol={atol})")
    return err


def make_runner(runtime: str, net: nn.Module, x: torch.Tensor, *, threads: int,
                device: torch.device) -> tuple[Callable[[], Any], dict]:
    """A function of no arguments running one inference of ``net`` on ``x`` in ``runtime``, checked against eager.

    Args:
        runtime: a registered name (``RUNTIMES``).
        net: the prepared model in eval mode, on ``device``, in the dtype and layout of ``x``.
        x: the input batch.
        threads: intra-op threads (ONNX Runtime's session option, OpenVINO's ``INFERENCE_NUM_THREADS``; torch's
            are set by the caller).
        device: where ``net`` lives.

    Returns:
        ``(run, info)``: ``info`` says what the runtime did (compile time, ONNX size and error against eager) and
        holds ``runtime_version``.

    Raises:
        ValueError: for a name that is not registered.
        RuntimeError: when the runtime cannot run here, or its output differs from eager's.
    """
    chosen = get_runtime(runtime)
    reason = chosen.unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    with torch.inference_mode():
        expected = net(x)
    run, output, info = chosen.build(net, x, threads=threads, device=device)
    if chosen.checked_as is not None:
        label = chosen.checked_as
        info = {**info, f"{label}_max_abs_err": check_output(output(), expected, label, chosen.rtol, chosen.atol)}
    return run, {**info, "runtime_version": chosen.version()}


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
        net, _, converted, total, _ = semi_structured_copy(model, device=device, memory_format=memory_format)
        info["semi24_layers"] = f"{converted}/{total}"
    else:
        net = copy.deepcopy(model).to(device=device, dtype=getattr(torch, dtype.split("+")[0]))
        if memory_format == "channels_last":
            net = net.to(memory_format=torch.channels_last)
    return net.eval(), info


def onnx_bytes(net: nn.Module, x: torch.Tensor) -> bytes:
    """``torch.onnx.export(net, x, dynamo=False, opset_version=17)`` for exactly this input shape, as bytes."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks in forward become constants: fine
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"])
    return buf.getvalue()
