"""The ``fused_cpu`` execution backend: one C++ kernel per group of same-spec units, for CPU inference.

Each unit's conv -> BN -> ReLU -> conv -> BN -> ReLU runs in one pass over space (``csrc/unit_fused.cpp``): the
hidden activations of a tile of rows stay in a small buffer, pixels are processed in vectors, work items
(image, unit) run in parallel through ``at::parallel_for``, and the unit shapes of the catalogue and the
uniform 2-4 plans are compiled with their sizes known (other 3x3 shapes run with their channel counts known only
at run time, other kernel sizes a generic path). BatchNorm is folded into the convolutions (``w' = w * gamma /
sqrt(var + eps)``, ``bias' = beta - mean * gamma / sqrt(var + eps)``), so the kernel computes what the layer
computes in eval mode.

Scope: float32 on CPU, eval mode, no autograd; input and residual in any memory format (read through their
strides: a channels_last network pays no conversion), output NCHW. The backend (:mod:`bunit.backends.fused_cpu`)
runs the layer's ``grouped`` form instead whenever the layer is in training mode or autograd records (gradients and BN
statistics then stay exact); other devices and dtypes raise ``ValueError``, and a machine without a working C++
compiler raises ``RuntimeError`` naming the build error, so the autotuner records the backend as failed
and never picks it.

The kernel itself (``csrc/unit_kernel.h``) is built on first use into a shared library of its own,
:func:`kernel_library` (``g++ -O3 -march=native``, ``<cache dir>/ext/bunit_unit_kernel-cpu<CPU hash>-src<source
hash>/``), which this extension and the OpenVINO unit operation (:mod:`harness.measure.openvino_ext`) both link:
its fixed-shape templates are most of the compile time, and they now compile once. The extension is built with
``torch.utils.cpp_extension.load`` (``-O3 -march=native``, OpenMP) into ``<cache dir>/ext/<name>-torch<version>-
cpu<hash of the CPU model and flags>`` (cache dir: ``$BUNITBENCH_CACHE_DIR``, else ``~/.cache/bunitbench``); later
processes load the cached builds. The build time and outcome are printed once per process and kept in
:func:`build_info`.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["FOLD_CACHE", "cache_dir", "cpu_tag", "cxx_compiler", "compile_shared", "kernel_library", "kernel_tag",
           "load_cpu_extension", "source_tag", "build_info", "is_available", "load_extension", "has_variant",
           "folded_weights", "forward"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "unit_fused.cpp"
_KERNEL = _SOURCE.parent / "unit_kernel.h"  # the kernel itself, shared with the OpenVINO custom operation
_KERNEL_API = _SOURCE.parent / "unit_kernel_api.h"  # what the extension and the OpenVINO operation include
_KERNEL_LIB = _SOURCE.parent / "unit_kernel.cpp"  # the kernel's library: its C entry points
_NAME = "bunit_unit_fused"
_state: dict[str, Any] = {}
FOLD_CACHE = "fused_cpu.folded_weights"
"""The layer's cache of folded weights (declared by the backend): ``(what they were folded from, per group
(w1, b1, w2, b2))``."""


def cache_dir() -> Path:
    """``$BUNITBENCH_CACHE_DIR``, else ``~/.cache/bunitbench``: where bunit keeps its builds and tuning."""
    base = os.environ.get("BUNITBENCH_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "bunitbench"


@functools.lru_cache(maxsize=1)
def source_tag() -> str:
    """A short hash of the backend's C++ sources (``unit_fused.cpp`` and the kernel library's, :func:`kernel_tag`):
    what a timing was made with.

    The autotuner keys its cached choices on it, so a changed kernel is timed afresh rather than judged by the
    timings of its predecessor.
    """
    return hashlib.sha1(_SOURCE.read_bytes() + kernel_tag().encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=1)
def kernel_tag() -> str:
    """A short hash of the kernel library's sources (``unit_kernel.cpp``, ``unit_kernel.h``, ``unit_kernel_api.h``)."""
    return hashlib.sha1(_KERNEL_LIB.read_bytes() + _KERNEL.read_bytes() + _KERNEL_API.read_bytes()).hexdigest()[:10]


def kernel_library() -> Path:
    """The unit kernel's shared library (``libbunit_unit_kernel.so``), built on the first call of any process that
    finds none for this CPU and kernel source; the resolved path (the extensions link it with this run path).

    Built with ``$CXX`` (else ``g++``, else ``c++``) ``-std=c++17 -O3 -march=native -ffp-contract=fast``
    (``-fvisibility=hidden``: it exports its two C entry points only), one build
    at a time under a lock in its folder (test workers and parallel passes wait for it rather than build it twice).

    Raises:
        RuntimeError: one line naming why it cannot be built here (no compiler, a compile error).
    """
    build_dir = (cache_dir() / "ext" / f"bunit_unit_kernel-cpu{cpu_tag()}-src{kernel_tag()}").resolve()
    target = build_dir / "libbunit_unit_kernel.so"
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        compiler = cxx_compiler()
        if compiler is None:
            raise RuntimeError("unit kernel: no C++ compiler found (g++, c++ or $CXX)")
        failed = compile_shared(compiler, ["-std=c++17", "-O3", "-march=native", "-ffp-contract=fast",
                                           "-fvisibility=hidden", "-Wl,-soname,libbunit_unit_kernel.so",
                                           str(_KERNEL_LIB)], target)
        if failed:
            raise RuntimeError(f"unit kernel: the build failed: {failed}")
    return target


def cxx_compiler() -> str | None:
    """The C++ compiler the hand-built libraries use: ``$CXX``, else ``g++``, else ``c++``; None where none runs."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    return compiler if compiler and shutil.which(compiler) else None


def compile_shared(compiler: str, args: list[str], target: Path) -> str | None:
    """``compiler -fPIC -shared args`` into a file beside ``target``, moved onto it when the build succeeds (a reader
    never sees half a library); on failure the first line of the compiler's errors, else None."""
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    done = subprocess.run([compiler, "-fPIC", "-shared", *args, "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines() or ["?"]
        return lines[0].strip()
    os.replace(tmp, target)
    return None


def _link_kernel() -> list[str]:
    lib = kernel_library()
    return [str(lib), f"-Wl,-rpath,{lib.parent}"]


def cpu_tag() -> str:
    """A short hash of the CPU model and instruction-set flags: a ``-march=native`` build runs on this CPU only."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            text += "".join(ln for ln in fh if ln.startswith(("model name", "flags")))[:4096]
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _build(build_dir: Path, name: str, source: Path, opt: str, link: Sequence[str] = ()) -> Any:
    """Compile (or load the cached build of) one extension into ``build_dir``; raises on any failure."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(source)], build_directory=str(build_dir),
                              extra_cflags=[opt, "-march=native", "-fopenmp", "-ffp-contract=fast"],
                              extra_ldflags=["-fopenmp", *link], verbose=False)


def load_cpu_extension(name: str, source: Path, state: dict, label: str, *, quiet: bool = False,
                       opt: str = "-O3", link: Callable[[], Sequence[str]] | None = None) -> Any:
    """Build (or load the cached build of) a C++ extension of bunit on first call, remembering the outcome in
    ``state`` (``module`` or ``error``, ``build_s``, ``build_dir``); the one loader of ``fused_cpu`` and
    ``unit_train``. The build goes to ``$BUNITBENCH_CACHE_DIR/ext/<name>-torch<version>-cpu<cpu_tag>``, compiled
    with ``opt -march=native -fopenmp`` (a changed flag rebuilds it).

    Args:
        name: the extension's module name.
        source: its C++ file.
        state: the caller's per-process dict.
        label: how messages name it (``fused_cpu``, ``unit_train``).
        quiet: do not print the one-line build report.
        opt: the optimisation level (``-O3``; ``unit_train`` builds with ``-O2``).
        link: gives extra linker arguments, called inside the build's error handling (``fused_cpu``: the kernel
            library, built first).

    Raises:
        RuntimeError: when the extension cannot be built or loaded here (the message carries the reason).
    """
    if "module" in state:
        return state["module"]
    if "error" in state:
        raise RuntimeError(f"{label}: the C++ extension is unavailable: {state['error']}")
    build_dir = cache_dir() / "ext" / f"{name}-torch{torch.__version__.replace('+', '_')}-cpu{cpu_tag()}"
    t0 = time.perf_counter()
    try:
        module = _build(build_dir, name, source, opt, link() if link else ())
    except Exception as err:  # no compiler, no ninja, a compile error: the path is unavailable
        state.update(error=f"{type(err).__name__}: {str(err).strip()[-1500:]}", build_s=time.perf_counter() - t0,
                     build_dir=str(build_dir))
        if not quiet:
            print(f"bunit.{label}: build failed after {state['build_s']:.1f} s; unavailable", file=sys.stderr,
                  flush=True)
        raise RuntimeError(f"{label}: the C++ extension is unavailable: {state['error']}") from err
    state.update(module=module, build_s=time.perf_counter() - t0, build_dir=str(build_dir))
    if not quiet:
        print(f"bunit.{label}: extension ready in {state['build_s']:.1f} s (build or cached load) at {build_dir}",
              file=sys.stderr, flush=True)
    return module


def load_extension(*, quiet: bool = False) -> Any:
    """The compiled extension module; built on the first call of the process, then reused.

    Args:
        quiet: do not print the one-line build report.

    Returns:
        The extension module.

    Raises:
        RuntimeError: when the extension cannot be built or loaded here (the message carries the reason).
    """
    return load_cpu_extension(_NAME, _SOURCE, _state, "fused_cpu", quiet=quiet, link=_link_kernel)


def is_available() -> bool:
    """Whether the extension builds and loads here (builds it on the first call)."""
    try:
        load_extension()
    except RuntimeError:
        return False
    return True


def build_info() -> dict[str, Any]:
    """``available``, ``build_s`` (seconds of build or cached load), ``build_dir`` and ``error`` (or None).

    Reports the state of this process; tries the build first if nothing was tried yet.
    """
    is_available()
    return {"available": "module" in _state, "build_s": _state.get("build_s"), "build_dir": _state.get("build_dir"),
            "error": _state.get("error")}


def has_variant(spec: Any) -> bool:
    """Whether ``spec`` (a UnitSpec) runs a fixed-shape kernel; False: the run-time-channel 3x3 or the generic path."""
    return bool(load_extension().has_variant(spec.a, spec.b, spec.c, spec.kernel, spec.stride))


# --- folded weights -----------------------------------------------------------------------------


def _fold(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
    weight = (conv.weight * scale[:, None, None, None]).float().contiguous()
    return weight, (bn.bias - bn.running_mean * scale).float().contiguous()


def _fold_key(layer: Any) -> list | None:
    """What the folded weights depend on: storage and version of every tensor folding reads, and each BN's eps.

    None when a tensor is an inference tensor (made under ``torch.inference_mode``): those have no version
    counter (reading it raises), so in-place changes cannot be seen and nothing is cached. The tensors are
    reached through the modules' own dicts, and nothing else is asked of them: at batch 1 a unit layer's whole
    kernel takes a few microseconds, about what ``nn.Module`` attribute access or one more call per tensor
    would add here.
    """
    key: list = []
    try:
        for grp in layer._modules["groups"]._modules.values():
            mods = grp._modules
            for conv, bn in ((mods["conv1"], mods["bn1"]), (mods["conv2"], mods["bn2"])):
                params, buffers = bn._parameters, bn._buffers
                for t in (conv._parameters["weight"], params["weight"], params["bias"], buffers["running_mean"],
                          buffers["running_var"]):  # a flat list: one container per call (less GC work)
                    key += (t.data_ptr(), t._version)
                key.append(bn.eps)
    except AttributeError as err:  # a None among them: BN without affine parameters or running statistics
        raise ValueError("fused_cpu: a BatchNorm without affine parameters or running statistics cannot be "
                         "folded") from err
    except RuntimeError:  # an inference tensor
        return None
    return key


def folded_weights(layer: Any) -> list[tuple[torch.Tensor, ...]]:
    """Per group of a fused :class:`bunit.layers.UnitLayer`: ``(w1, b1, w2, b2)`` with its BNs folded in.

    Kept in the layer's cache ``FOLD_CACHE`` and rebuilt when any weight, BN parameter, running statistic or eps
    changes (tensor storage or version counter), as the ``blockdiag`` backend caches its dense weights; folded
    afresh on every call when the weights are inference tensors.
    """
    key = _fold_key(layer)
    cache = layer.caches.get(FOLD_CACHE)
    if key is None or cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, [(*_fold(g.conv1, g.bn1), *_fold(g.conv2, g.bn2)) for g in layer.groups])
        layer.keep_cache(FOLD_CACHE, cache)
    return cache[1]


# --- forward ------------------------------------------------------------------------------------


def forward(layer: Any, x: torch.Tensor, plan: list[tuple], residual: torch.Tensor | None = None,
            residual_map: tuple[int, int] = (1, 0)) -> torch.Tensor:
    """Eval-mode output of a fused :class:`bunit.layers.UnitLayer` on ``x``, one kernel call per group.

    Args:
        layer: the unit layer (its ``groups``, ``stride``, ``kernel``, ``out_channels``).
        x: input ``(B, in, H, W)``, float32 on CPU, any memory format (the kernel reads it through its strides).
        plan: per group, ``(a, b, c, kernel, stride, in_start, out_start)``: the unit spec and int64 tensors
            with each unit's first input and output channel in layer order.
        residual: None, or a tensor of the output's shape (any memory format): then ``relu(units(x) + residual)``
            is returned (a residual block's shortcut and final ReLU, applied as each output row is written).
        residual_map: ``(step, offset)`` other than ``(1, 0)``: ``residual`` is the tensor an option-A shortcut
            reads (output channel ``o`` at ``(i, j)`` adds ``residual[:, o - offset, i * step, j * step]``, zero
            where that channel does not exist); the kernel reads it so, and the shortcut is never built.

    Returns:
        ``(B, out, H/s, W/s)`` float32, NCHW.

    Raises:
        ValueError: for a device or dtype the kernel does not run on.
        RuntimeError: when the extension is unavailable.
    """
    if not x.is_cpu or x.dtype != torch.float32:
        raise ValueError(f"fused_cpu: input on {x.device} as {x.dtype}; allowed: cpu, torch.float32")
    ext = _state.get("module") or load_extension()
    k, stride = layer.kernel, layer.stride
    n, _, h, w = x.shape
    pad = k // 2
    y = torch.empty(n, layer.out_channels, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
    step, offset = residual_map
    if residual is not None:
        mapped = step != 1 or offset != 0
        if not residual.is_cpu or (residual.dim() != 4 or residual.shape[0] != n if mapped else
                                   residual.shape != y.shape):
            expected = f"(B={n}, C, H, W)" if mapped else str(tuple(y.shape))
            raise ValueError(f"fused_cpu: residual of shape {tuple(residual.shape)} on {residual.device}; "
                             f"expected {expected} on cpu")
        if residual.dtype != torch.float32:
            residual = residual.float()
    for (a, b, c, kg, s, in_start, out_start), weights in zip(plan, folded_weights(layer)):
        ext.unit_group_forward(x, y, residual, *weights, in_start, out_start, a, b, c, kg, s, step, offset)
    return y  # (B, out, H/s, W/s), layer order
