"""BUnit's unit kernel inside OpenVINO: unit layers exported to ONNX as a custom node, run as a custom operation.

A BUnit network deployed through OpenVINO as plain ONNX runs its unit layers as grouped convolutions, which
OpenVINO's CPU plugin runs no better than PyTorch does; its dense layers it runs well. This module keeps OpenVINO
for the dense layers and gives the unit layers BUnit's own kernel:

- :func:`extension_path` builds ``bunit/csrc/unit_openvino.cpp`` (the OpenVINO operation ``bunit.UnitGroup``,
  whose computation is ``bunit/csrc/unit_kernel.h``, the kernel of the ``fused_cpu`` torch backend, linked as the
  one kernel library both use, :func:`bunit.fused_cpu.kernel_library`) into a shared library against the headers
  and libraries that the ``openvino`` wheel ships (``openvino/include``, ``openvino/libs``): ``g++`` (or ``$CXX``)
  ``-O3 -march=native``, on first use, cached in
  ``<cache dir>/ext/bunit_unit_openvino-ov<version>-cpu<CPU hash>-src<source hash>/`` (cache dir:
  ``$BUNITBENCH_CACHE_DIR``, else ``~/.cache/bunitbench``); later processes load the cached build. Without a
  compiler it raises ``RuntimeError`` with one line saying so.
- :func:`export_with_units` exports a model with ``torch.onnx.export(..., dynamo=False, opset_version=17)`` in
  which every unit layer (the fused form of :class:`bunit.layers.UnitLayer`) becomes one ONNX node
  ``bunit::UnitGroup`` per group of same-spec units, BatchNorm folded into the weights (``bunit.fused_cpu.
  folded_weights``; the node takes them as one constant, ``w1, b1, w2, b2`` flattened one after the other), a
  residual block's shortcut and final ReLU inside the node (an option-A shortcut is read by the kernel from the
  block input, as ``fused_cpu`` does). A layer with several groups chains its nodes: each
  takes the previous one's output and writes its own units' channels. The network's first unit layer takes its
  input as ``x.permute(0, 2, 3, 1)`` (NHWC; its option-A shortcut too): OpenVINO's CPU plugin hands a convolution's
  channels-last output to that Transpose as it is, where it would reorder it to NCHW for the custom node (25-31 us,
  about 5% of a batch-1 inference of ResNet-56's all-stages plan here); the node transposes it back with vector
  shuffles. Everything else exports as usual.
- :func:`compile_model` compiles such an export with the library added (``Core.add_extension``); the timing pass
  does this for the ``openvino+units`` runtime (:mod:`harness.measure.runtimes.openvino_units`).

ONNX Runtime: its maintained route for a native custom operator is a custom-op library built against its C API
headers (``onnxruntime_c_api.h``) and registered with ``SessionOptions.register_custom_ops_library``; the PyPI wheel
ships the runtime library but not those headers, so the unit operation is built for OpenVINO only.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from bunit import fused_cpu
from bunit.fused_cpu import cache_dir, compile_shared, cpu_tag, cxx_compiler, kernel_library, kernel_tag
from bunit.functional import shift_residual
from bunit.layers import unit_layers
from harness.measure.runtimes.base import onnx_bytes
from harness.measure.runtimes.openvino_runtime import openvino_compiled

__all__ = ["SOURCE", "extension_path", "build_info", "export_with_units", "compile_model", "unit_group_reference"]

_CSRC = Path(__file__).resolve().parents[2] / "bunit" / "csrc"
SOURCE = _CSRC / "unit_openvino.cpp"
_KERNEL_API = _CSRC / "unit_kernel_api.h"
_LIB = "libbunit_unit_openvino.so"
_DOMAIN_OP = "bunit::UnitGroup"
_state: dict[str, Any] = {}


def _openvino_dir() -> Path:
    try:
        import openvino
    except ImportError as err:
        raise RuntimeError("openvino+units: openvino is not installed; pip install -c constraints.txt -e "
                           "'.[openvino]'") from err
    return Path(openvino.__file__).resolve().parent


def _source_tag() -> str:
    return hashlib.sha1(SOURCE.read_bytes() + _KERNEL_API.read_bytes() + kernel_tag().encode()).hexdigest()[:10]


def _one(libs: Path, stem: str) -> Path:
    """The versioned library ``<stem>.so.<N>`` the wheel ships (it has no unversioned link)."""
    found = sorted(libs.glob(f"{stem}.so*"))
    if not found:
        raise RuntimeError(f"openvino+units: {stem}.so not found in {libs}")
    return found[0]


def _compile(target: Path) -> None:
    compiler = cxx_compiler()
    if compiler is None:
        raise RuntimeError("openvino+units: no C++ compiler found (g++, c++ or $CXX); the unit operation cannot be "
                           "built here")
    ov = _openvino_dir()
    libs = ov / "libs"
    kernel = kernel_library()
    failed = compile_shared(compiler, [
        "-std=c++17", "-O3", "-march=native", "-ffp-contract=fast", "-D_GLIBCXX_USE_CXX11_ABI=1", str(SOURCE),
        f"-I{ov / 'include'}", str(_one(libs, "libopenvino")), str(_one(libs, "libopenvino_onnx_frontend")),
        str(_one(libs, "libtbb")), str(kernel), f"-Wl,-rpath,{libs}", f"-Wl,-rpath,{kernel.parent}"], target)
    if failed:
        raise RuntimeError(f"openvino+units: building the unit operation failed: {failed}")


def extension_path(*, quiet: bool = False) -> Path:
    """The built OpenVINO extension library (built on the first call of a process when no cached build exists).

    Raises:
        RuntimeError: one line naming why it cannot be built here (no openvino, no compiler, a compile error).
    """
    if "path" in _state:
        return _state["path"]
    if "error" in _state:
        raise RuntimeError(_state["error"])
    import openvino  # an optional extra, slow to import: loaded on use

    version = openvino.get_version().split("-")[0]
    build_dir = cache_dir() / "ext" / f"bunit_unit_openvino-ov{version}-cpu{cpu_tag()}-src{_source_tag()}"
    target = build_dir / _LIB
    t0 = time.perf_counter()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / ".lock", "w") as lock:  # one build at a time (test workers, parallel passes)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _compile(target)  # builds the kernel library first where it is missing
            else:
                kernel_library()  # the library it links by run path, built again if its folder was cleared
    except (RuntimeError, OSError) as err:
        _state["error"] = str(err) if isinstance(err, RuntimeError) else f"openvino+units: {err}"
        raise RuntimeError(_state["error"]) from err
    _state.update(path=target, build_s=time.perf_counter() - t0)
    if not quiet:
        print(f"harness.openvino_ext: unit operation ready in {_state['build_s']:.1f} s (build or cached) at {target}",
              file=sys.stderr, flush=True)
    return target


def build_info() -> dict[str, Any]:
    """``available``, ``build_s``, ``path`` and ``error`` of this process's build (tries it first)."""
    with contextlib.suppress(RuntimeError):
        extension_path(quiet=True)
    return {"available": "path" in _state, "build_s": _state.get("build_s"),
            "path": str(_state["path"]) if "path" in _state else None, "error": _state.get("error")}


# --- export ------------------------------------------------------------------------------------


def unit_group_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                         residual: torch.Tensor | None, prev: torch.Tensor | None, a: int, b: int, c: int, k: int,
                         s: int, in_start: tuple[int, ...], out_start: tuple[int, ...], out_channels: int,
                         res_step: int, res_offset: int, x_nhwc: bool = False,
                         res_nhwc: bool = False) -> torch.Tensor:
    """What one ``bunit.UnitGroup`` node computes, in PyTorch (grouped convolutions on the folded weights).

    With ``x_nhwc``, ``x`` is given as ``(N, H, W, Cin)`` (``x.permute(0, 2, 3, 1)`` of the NCHW input); with
    ``res_nhwc``, so is ``residual``.

    Returns:
        ``(N, out_channels, Ho, Wo)``: ``prev`` (zeros without it) with this group's units' channels written.
    """
    if x_nhwc:
        x = x.permute(0, 3, 1, 2)
    if res_nhwc:
        residual = residual.permute(0, 3, 1, 2)
    units = len(in_start)
    idx = torch.tensor([i + j for i in in_start for j in range(a)], device=x.device)
    hidden = F.relu(F.conv2d(x.index_select(1, idx), w1, b1, stride=s, padding=k // 2, groups=units))
    z = F.relu(F.conv2d(hidden, w2, b2, padding=k // 2, groups=units))  # (N, U*c, Ho, Wo), unit order
    out_idx = torch.tensor([o + j for o in out_start for j in range(c)], device=x.device)
    if residual is not None:
        if (res_step, res_offset) != (1, 0):
            residual = shift_residual(residual, res_step, res_offset, out_channels)
        z = F.relu(z + residual.index_select(1, out_idx))
    y = prev.clone() if prev is not None else z.new_zeros(z.shape[0], out_channels, *z.shape[2:])
    return y.index_copy_(1, out_idx, z)


def _unpacked(weights: torch.Tensor, units: int, a: int, b: int, c: int, k: int) -> list[torch.Tensor]:
    """``w1, b1, w2, b2`` of a group from the one flat tensor a node takes (their flattened values, in this order)."""
    shapes = [(units * b, a, k, k), (units * b,), (units * c, b, k, k), (units * c,)]
    sizes = [math.prod(sh) for sh in shapes]
    return [t.reshape(sh) for t, sh in zip(weights.split(sizes), shapes)]


class _UnitGroupOp(torch.autograd.Function):
    """One group of same-spec units: runs :func:`unit_group_reference`, exports as one ``bunit::UnitGroup`` node."""

    @staticmethod
    def forward(ctx, x, weights, residual, prev, a, b, c, k, s, in_start, out_start, out_channels, res_step,
                res_offset, x_nhwc, res_nhwc):  # noqa: D102
        w1, b1, w2, b2 = _unpacked(weights, len(in_start), a, b, c, k)
        return unit_group_reference(x, w1, b1, w2, b2, residual, prev, a, b, c, k, s, in_start, out_start,
                                    out_channels, res_step, res_offset, x_nhwc, res_nhwc)

    @staticmethod
    def symbolic(g, x, weights, residual, prev, a, b, c, k, s, in_start, out_start, out_channels, res_step,
                 res_offset, x_nhwc, res_nhwc):  # noqa: D102
        inputs = [x, weights] + [t for t in (residual, prev) if t is not None]
        y = g.op(_DOMAIN_OP, *inputs, a_i=a, b_i=b, c_i=c, k_i=k, s_i=s, in_start_i=list(in_start),
                 out_start_i=list(out_start), out_channels_i=out_channels, has_residual_i=int(residual is not None),
                 res_step_i=res_step, res_offset_i=res_offset, has_prev_i=int(prev is not None),
                 x_nhwc_i=int(x_nhwc), res_nhwc_i=int(res_nhwc))
        sizes = x.type().sizes()
        if sizes is not None and None not in sizes:
            n, h, w = (sizes[0], sizes[1], sizes[2]) if x_nhwc else (sizes[0], sizes[2], sizes[3])
            y.setType(x.type().with_sizes([n, out_channels, (h + 2 * (k // 2) - k) // s + 1,
                                           (w + 2 * (k // 2) - k) // s + 1]))
        return y


def _exported_forward(groups: list[tuple], x_nhwc: bool):
    """A unit layer's forward for export: one :class:`_UnitGroupOp` per group, chained through ``prev``.

    With ``x_nhwc`` the layer's input goes to its nodes as ``x.permute(0, 2, 3, 1)`` (one ONNX Transpose), and so
    does its residual when that is the input itself (an option-A shortcut).
    """

    def forward(self, x, residual=None, residual_map=(1, 0)):
        step, offset = residual_map
        res_nhwc = x_nhwc and residual is x
        if x_nhwc:
            x = x.permute(0, 2, 3, 1)
            residual = x if res_nhwc else residual
        y = None
        for (a, b, c, k, s, in_start, out_start), weights in groups:
            y = _UnitGroupOp.apply(x, weights, residual, y, a, b, c, k, s, in_start, out_start,
                                   self.out_channels, step, offset, x_nhwc, res_nhwc)
        return y  # (B, out, H/s, W/s)

    return forward


@contextlib.contextmanager
def _units_as_custom_op(net: nn.Module) -> Iterator[int]:
    """Within the block, every fused unit layer of ``net`` runs (and traces) as :class:`_UnitGroupOp` nodes."""
    patched, nodes = [], 0
    try:
        for _, layer in unit_layers(net):
            if layer.impl != "fused":
                continue
            with torch.no_grad():  # folded once, outside the trace: the node's weights are constants
                weights = [torch.cat([t.detach().reshape(-1) for t in ws]) for ws in fused_cpu.folded_weights(layer)]
            plan = [(a, b, c, k, s, tuple(int(v) for v in i0), tuple(int(v) for v in o0))
                    for a, b, c, k, s, i0, o0 in layer.kernel_plan]
            first = not patched
            patched.append((layer, layer.backend))
            layer.forward = types.MethodType(_exported_forward(list(zip(plan, weights)), first), layer)
            layer.backend = "fused_cpu"  # a block then hands over its option-A shortcut's input and map
            nodes += len(plan)
        yield nodes
    finally:
        for layer, backend in patched:
            del layer.forward
            layer.backend = backend


def export_with_units(net: nn.Module, x: torch.Tensor) -> tuple[bytes, int]:
    """ONNX bytes of ``net`` on ``x`` with every unit layer as ``bunit::UnitGroup`` nodes, and how many nodes.

    Args:
        net: the model in eval mode (not changed: its unit layers are restored after the export).
        x: the input batch, float32 on the CPU, NCHW.
    """
    with _units_as_custom_op(net) as nodes:
        model = onnx_bytes(net, x)
    return model, nodes


def compile_model(model: bytes, threads: int, *, units: bool = True):
    """An export of :func:`export_with_units` compiled by OpenVINO (CPU, f32), the unit operation added when asked."""
    return openvino_compiled(model, threads, extension=str(extension_path()) if units else None)
