"""Size, arithmetic and latency of a model, measured one way for every row.

The conventions (DESIGN.md, "Measurement conventions"), as this module implements them:

- ``params`` counts every parameter once (shared ones once); ``params_nonzero`` counts the entries that are not
  exactly zero, of the *effective* weight when a ``torch.nn.utils.prune`` re-parametrisation is attached.
- ``macs`` is ptflops' ``backend="aten"`` count at batch 1: multiply-accumulates of convolutions and matrix
  products (conv and linear layers), plus one add per output element of a bias. CIFAR ResNet-56 (option A):
  125,485,706. ``torch.utils.flop_counter`` gives ``2 * (macs - bias adds)``; the tests check this.
  ``macs_all`` is ptflops' default (module-hook) backend, which adds BN, ReLU, pooling and element-wise ops.
  ``macs_nonzero`` replaces the weight part of every ``nn.Linear`` / ``nn.ConvNd`` call by what its non-zero
  weights cost: a layer whose weight is half zeros counts half its weight MACs; bias adds and matrix products
  outside those modules stay as counted. For a dense model ``macs_nonzero == macs``.
- Latency: a deep copy of the model is timed, so the caller's model is never touched (mode, device, dtype,
  memory format). The copy is in eval mode, any ``torch.nn.utils.prune`` mask is made permanent (the mask
  multiply is not timed), and it runs under ``torch.inference_mode``. Inputs are built before timing: the
  first ``batch`` rows of the example input, or its first row repeated. ``warmup`` untimed calls, then
  ``repeats`` timed calls, one timing per call; the row gets median, p90 and inter-quartile range in ms.

  * CPU: each call timed with ``time.perf_counter`` with the garbage collector off (what ``timeit`` does),
    intra-op threads pinned through ``torch.utils.benchmark``'s ``set_torch_threads``. ``Timer.timeit`` is
    not used per call because it runs two extra warm-up calls per measurement, and ``blocked_autorange``
    reports means of blocks, which hides the tail that p90 is meant to show.
  * CUDA: ``cudnn.benchmark`` on (restored afterwards), a CUDA event pair around each call and a
    synchronize after it, so calls do not overlap. ``peak_mem_mb`` is the allocator's peak during the
    throughput-batch calls minus what was allocated before the copy was made: the copy's weights, the input,
    activations and workspaces, not other tensors the process holds. On CPU it is ``None``: RSS deltas are
    blurred by the allocator's caching and are not reported.
  * An out-of-memory error at the throughput batch halves the batch and retries; ``throughput_batch`` holds
    the batch that ran. Any other failure leaves the latency columns ``None`` and says why in
    ``latency_error``; it never raises.
  * ``memory_format="auto"`` times both layouts and keeps the one with the lower median at the throughput
    batch (batch 1 when there is none); ``memory_format`` holds the winner, ``memory_format_requested`` says
    it was chosen.
  * CUDA only, in the chosen layout: ``*_bf16`` times a bfloat16 copy. ``*_semi24`` times a bfloat16 copy in
    which every ``nn.Linear`` and every ``nn.Conv2d`` (groups 1, zero padding) whose 2-D weight
    ``(out, in * kh * kw)`` meets ``to_sparse_semi_structured``'s shape rules gets a 2:4 magnitude mask
    (a no-op for weights already 2:4) and runs as a semi-structured sparse GEMM (a conv via ``F.unfold``);
    other layers stay dense bfloat16. It runs under ``torch.no_grad``, its output is checked against the
    dense masked copy, and ``semi24_layers`` says how many layers were converted. Compare it with ``*_bf16``;
    the accuracy of the masked copy is not measured here.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd
from torch.utils.benchmark.utils.common import set_torch_threads

try:  # harness/__init__ has run the torchvision shim by now, which ptflops needs
    from ptflops import get_model_complexity_info

    has_ptflops = True
except ImportError:  # pragma: no cover - ptflops is a dependency
    get_model_complexity_info = None
    has_ptflops = False

has_semi_structured = hasattr(torch.sparse, "to_sparse_semi_structured")

__all__ = [
    "LATENCY_COLUMNS",
    "MEMORY_FORMATS",
    "has_ptflops",
    "has_semi_structured",
    "count_params",
    "count_params_nonzero",
    "count_macs",
    "checkpoint_bytes",
    "device_info",
    "measure_latency",
    "peak_memory_mb",
    "measure_model",
    "mask_2to4",
    "GemmConv2d",
    "semi_structured_copy",
]

MEMORY_FORMATS = ("contiguous", "channels_last", "auto")

LATENCY_COLUMNS = (
    "latency_ms_p50_b1", "latency_ms_p90_b1", "latency_iqr_ms_b1",
    "latency_ms_p50_bt", "latency_ms_p90_bt", "latency_iqr_ms_bt",
    "throughput_batch", "throughput_img_s",
    "latency_ms_p50_b1_semi24", "latency_ms_p50_bt_semi24", "semi24_layers",
    "latency_ms_p50_b1_bf16", "latency_ms_p50_bt_bf16",
    "peak_mem_mb", "latency_device", "device_name", "dtype", "memory_format", "memory_format_requested",
    "threads", "latency_error",
)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_MIB = 2**20


# --- size -----------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """All parameters of ``model``, shared ones counted once.

    Args:
        model: the network.

    Returns:
        The number of scalar parameters.
    """
    return sum(p.numel() for p in model.parameters())


def count_params_nonzero(model: nn.Module) -> int:
    """Parameters that are not exactly zero.

    A ``torch.nn.utils.prune`` re-parametrisation (``weight_orig`` times the buffer ``weight_mask``) is counted
    through its effective weight, so masked entries count as zero.

    Args:
        model: the network.

    Returns:
        The number of non-zero scalar parameters.
    """
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


def checkpoint_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``, written to memory.

    Args:
        model: the network.

    Returns:
        The number of bytes of the serialized state dict.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# --- arithmetic ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _left_as_found(model: nn.Module) -> Iterator[None]:
    """Undo what a counter does to ``model``: forward hooks, instance attributes, train/eval flags."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [{d: set(getattr(m, d, {})) for d in _HOOK_DICTS} for m in modules]
    attrs = [set(vars(m)) for m in modules]
    try:
        yield
    finally:
        for m, flag, hook_keys, attr_keys in zip(modules, training, hooks, attrs):
            m.training = flag
            for d, keys in hook_keys.items():
                table = getattr(m, d, None)
                for key in [k for k in (table or {}) if k not in keys]:
                    del table[key]
            for key in [k for k in vars(m) if k not in attr_keys]:
                delattr(m, key)


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape: expected the per-sample shape, e.g. (3, 32, 32); got {input_shape!r}")
    return shape


def _ptflops_macs(model: nn.Module, shape: tuple[int, ...], backend: str) -> int:
    if not has_ptflops:
        raise RuntimeError("count_macs: ptflops is not installed (pip install ptflops)")
    log = io.StringIO()
    with _left_as_found(model), torch.no_grad(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        macs, _ = get_model_complexity_info(model, shape, as_strings=False, print_per_layer_stat=False,
                                            backend=backend, ost=log, verbose=False)
    if macs is None:
        raise RuntimeError(f"count_macs: ptflops backend {backend!r} failed: {log.getvalue().strip()[-2000:]}")
    return int(macs)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _layer_macs(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """Weight MACs plus bias adds of every ``nn.Linear`` / ``nn.ConvNd`` call: (dense, non-zero weights only)."""
    dense = nonzero = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal dense, nonzero
        weight = module.weight.detach()
        if isinstance(module, nn.Linear):
            uses = output.numel() // module.out_features  # each weight is used once per output row
        else:  # ptflops' convention: spatial size of the output, of the input for a transposed conv
            spatial = inputs[0].shape[2:] if module.transposed else output.shape[2:]
            uses = output.shape[0] * math.prod(spatial)
        bias_adds = output.numel() if module.bias is not None else 0
        dense += uses * weight.numel() + bias_adds
        nonzero += uses * int(torch.count_nonzero(weight)) + bias_adds

    device, dtype = _model_device_dtype(model)
    with _left_as_found(model), torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, _ConvNd)) and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.register_forward_hook(hook)
        model.eval()
        model(torch.zeros((1, *shape), device=device, dtype=dtype))
    return dense, nonzero


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-accumulates of one forward pass at batch 1.

    The model is left as found: same train/eval flags, no hooks or attributes left behind, same device.

    Args:
        model: the network, on any device; the counting input is made there in the model's dtype.
        input_shape: per-sample input shape without the batch dimension, e.g. ``(3, 32, 32)``.

    Returns:
        ``macs`` (ptflops aten backend: conv and linear), ``macs_all`` (ptflops default backend) and
        ``macs_nonzero`` (``macs`` with the weight MACs of conv/linear layers scaled by their non-zero share).
    """
    shape = _sample_shape(input_shape)
    with _canonical_unit_backends(model):
        macs = _ptflops_macs(model, shape, "aten")
        macs_all = _ptflops_macs(model, shape, "pytorch")
        dense, nonzero = _layer_macs(model, shape)
    return {"macs": macs, "macs_all": macs_all, "macs_nonzero": macs - dense + nonzero}


@contextlib.contextmanager
def _canonical_unit_backends(model: nn.Module):
    """Count BUnit layers as grouped convolutions whatever backend the autotuner chose.

    MACs belong to the architecture, not to the kernel that runs it: the block-diagonal backend executes a dense
    convolution whose off-diagonal zeros a counter would charge, and the per-unit loop or bmm run no Conv2d
    module at all. The chosen backends are restored afterwards.
    """
    from bunit.layers import unit_layers

    chosen = [(layer, layer.backend) for _, layer in unit_layers(model) if layer.impl == "fused"]
    try:
        for layer, _ in chosen:
            layer.backend = "grouped"
        yield
    finally:
        for layer, backend in chosen:
            layer.backend = backend


# --- devices ---------------------------------------------------------------------------------------


def _normalize_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Name of the device and the torch intra-op thread count.

    Args:
        device: ``cpu`` or a CUDA device.

    Returns:
        ``device_name`` (CPU model from /proc/cpuinfo, or the GPU name) and ``threads``.
    """
    device = _normalize_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device_name": name, "threads": torch.get_num_threads()}


# --- timing ----------------------------------------------------------------------------------------


def _make_pruning_permanent(net: nn.Module) -> None:
    from torch.nn.utils import prune

    for module in net.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)


def _prepared_copy(model: nn.Module, device: torch.device, dtype: torch.dtype, memory_format: str) -> nn.Module:
    net = copy.deepcopy(model)
    _make_pruning_permanent(net)
    net = net.to(device=device, dtype=dtype)
    if memory_format == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    return net.eval()


def _make_batch(example: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype,
                memory_format: str) -> torch.Tensor:
    x = example.detach()
    x = x[:batch] if x.shape[0] >= batch else x[:1].expand(batch, *x.shape[1:])
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    layout = torch.channels_last if memory_format == "channels_last" and x.dim() == 4 else torch.contiguous_format
    return x.contiguous(memory_format=layout).clone(memory_format=layout)


def _call_times(net: nn.Module, x: torch.Tensor, *, repeats: int, warmup: int, device: torch.device,
                grad_mode: Callable[[], contextlib.AbstractContextManager]) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``net(x)`` after ``warmup`` untimed calls."""
    if device.type == "cuda":
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            with torch.cuda.device(device), grad_mode():
                for _ in range(warmup):
                    net(x)
                torch.cuda.synchronize(device)
                times = []
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    net(x)
                    end.record()
                    torch.cuda.synchronize(device)  # one call at a time: latency, not queue depth
                    times.append(start.elapsed_time(end) / 1e3)
            return times
        finally:
            torch.backends.cudnn.benchmark = previous
    with grad_mode():
        for _ in range(warmup):
            net(x)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - start)
        finally:
            if gc_was_enabled:
                gc.enable()
    return times


def _summary_ms(times_s: list[float]) -> dict[str, float]:
    q25, q50, q75, q90 = np.percentile(np.asarray(times_s) * 1e3, [25, 50, 75, 90])
    return {"p50": float(q50), "p90": float(q90), "iqr": float(q75 - q25)}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _timed_pass(net: nn.Module, example: torch.Tensor, *, batch_sizes: tuple[int, ...], repeats: int, warmup: int,
                device: torch.device, dtype: torch.dtype, memory_format: str, mem_base: int | None,
                grad_mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode) -> dict[str, Any]:
    """Time ``net`` at batch 1 and at the throughput batch (halved on out-of-memory)."""
    timing = dict(repeats=repeats, warmup=warmup, device=device, grad_mode=grad_mode)
    x = _make_batch(example, 1, device, dtype, memory_format)
    result: dict[str, Any] = {"b1": _summary_ms(_call_times(net, x, **timing)), "bt": None, "batch": None,
                              "peak_mem_mb": None}
    del x
    batch = batch_sizes[1] if len(batch_sizes) > 1 else 0
    while batch >= 1:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            x = _make_batch(example, batch, device, dtype, memory_format)
            result["bt"] = _summary_ms(_call_times(net, x, **timing))
            result["batch"] = batch
            if device.type == "cuda" and mem_base is not None:
                result["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - mem_base) / _MIB
            return result
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch //= 2
    if len(batch_sizes) > 1:
        raise RuntimeError(f"out of memory down to batch 1 of the throughput batch {batch_sizes[1]}")
    return result


def _memory_allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _check_latency_args(batch_sizes: Sequence[int], repeats: int, warmup: int, memory_format: str) -> tuple[int, ...]:
    sizes = tuple(int(b) for b in batch_sizes)
    if not 1 <= len(sizes) <= 2 or sizes[0] != 1 or any(b < 1 for b in sizes):
        raise ValueError(f"batch_sizes: expected (1,) or (1, throughput_batch >= 1); got {batch_sizes!r}")
    if repeats < 3:
        raise ValueError(f"repeats: need at least 3 timed calls for a median and p90; got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup: must be >= 0; got {warmup}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format: unknown {memory_format!r}; allowed: {', '.join(MEMORY_FORMATS)}")
    return sizes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure_latency(model: nn.Module, example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 64),
                    repeats: int = 30, warmup: int = 5, dtype: torch.dtype = torch.float32,
                    memory_format: str = "contiguous", threads: int | None = None,
                    device: str | torch.device | None = None, extras: bool = True) -> dict[str, Any]:
    """Latency, throughput and peak memory of inference, as row columns (see the module docstring).

    Args:
        model: the network; a deep copy is timed, ``model`` itself is not changed.
        example_input: a batch of inputs ``(B, ...)``; its rows (or its first row repeated) form the timed batches.
        batch_sizes: ``(1, throughput_batch)`` or ``(1,)``.
        repeats: timed calls per batch size (at least 3).
        warmup: untimed calls before them.
        dtype: floating dtype of the timed copy and its input.
        memory_format: ``contiguous``, ``channels_last`` or ``auto`` (times both, keeps the faster).
        threads: torch intra-op threads while timing; ``None`` keeps the current count.
        device: where to time; ``None`` means where the model's parameters are.
        extras: on CUDA, also time the bfloat16 and 2:4 semi-structured copies.

    Returns:
        A dict with every key of ``LATENCY_COLUMNS``; values are ``None`` where not measured, and
        ``latency_error`` says why when a measurement failed.
    """
    sizes = _check_latency_args(batch_sizes, repeats, warmup, memory_format)
    device = _normalize_device(device if device is not None else _model_device_dtype(model)[0])
    row: dict[str, Any] = dict.fromkeys(LATENCY_COLUMNS)
    row.update(latency_device=str(device), dtype=_dtype_name(dtype), memory_format_requested=memory_format,
               throughput_batch=sizes[1] if len(sizes) > 1 else None)
    errors: list[str] = []
    with set_torch_threads(threads if threads is not None else torch.get_num_threads()):
        row.update(device_info(device))
        try:
            formats = ("contiguous", "channels_last") if memory_format == "auto" else (memory_format,)
            passes = {}
            for fmt in formats:
                mem_base = _memory_allocated(device)
                net = _prepared_copy(model, device, dtype, fmt)
                passes[fmt] = _timed_pass(net, example_input, batch_sizes=sizes, repeats=repeats, warmup=warmup,
                                          device=device, dtype=dtype, memory_format=fmt, mem_base=mem_base)
                del net
            chosen = min(formats, key=lambda f: (passes[f]["bt"] or passes[f]["b1"])["p50"])
            best = passes[chosen]
            row.update(memory_format=chosen, peak_mem_mb=best["peak_mem_mb"], latency_ms_p50_b1=best["b1"]["p50"],
                       latency_ms_p90_b1=best["b1"]["p90"], latency_iqr_ms_b1=best["b1"]["iqr"])
            if best["bt"] is not None:
                row.update(latency_ms_p50_bt=best["bt"]["p50"], latency_ms_p90_bt=best["bt"]["p90"],
                           latency_iqr_ms_bt=best["bt"]["iqr"], throughput_batch=best["batch"],
                           throughput_img_s=best["batch"] / (best["bt"]["p50"] / 1e3))
        except Exception as err:  # noqa: BLE001 - a failed measurement becomes an error column, never a crash
            errors.append(f"{type(err).__name__}: {err}")
        if device.type == "cuda" and extras and row["latency_ms_p50_b1"] is not None:
            extra_sizes = (1, row["throughput_batch"]) if row["throughput_batch"] else (1,)
            common = dict(batch_sizes=extra_sizes, repeats=repeats, warmup=warmup, device=device,
                          memory_format=row["memory_format"])
            errors += _bf16_columns(model, example_input, row, common)
            errors += _semi24_columns(model, example_input, row, common)
    row["latency_error"] = "; ".join(errors) or None
    return row


def _bf16_columns(model: nn.Module, example: torch.Tensor, row: dict[str, Any], common: dict) -> list[str]:
    try:
        net = _prepared_copy(model, common["device"], torch.bfloat16, common["memory_format"])
        result = _timed_pass(net, example, dtype=torch.bfloat16, mem_base=None, **common)
        row["latency_ms_p50_b1_bf16"] = result["b1"]["p50"]
        row["latency_ms_p50_bt_bf16"] = result["bt"]["p50"] if result["bt"] else None
        return []
    except Exception as err:  # noqa: BLE001
        return [f"bf16: {type(err).__name__}: {err}"]


def _semi24_columns(model: nn.Module, example: torch.Tensor, row: dict[str, Any], common: dict) -> list[str]:
    if not has_semi_structured:
        return ["semi24: torch.sparse.to_sparse_semi_structured is not available"]
    try:
        device, fmt = common["device"], common["memory_format"]
        net, reference, converted, total, last_error = semi_structured_copy(model, device=device, memory_format=fmt)
        row["semi24_layers"] = f"{converted}/{total}"
        if converted == 0:
            del net, reference
            return [f"semi24: no layer could be converted ({last_error})"] if last_error else []
        x = _make_batch(example, 1, device, torch.bfloat16, fmt)
        with torch.no_grad():
            expected, got = reference(x).float(), net(x).float()
        del reference
        rel = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-6))
        if not rel <= 0.05:
            return [f"semi24: output differs from the dense 2:4-masked copy (max rel. error {rel:.3g})"]
        result = _timed_pass(net, example, dtype=torch.bfloat16, mem_base=None, grad_mode=torch.no_grad, **common)
        row["latency_ms_p50_b1_semi24"] = result["b1"]["p50"]
        row["latency_ms_p50_bt_semi24"] = result["bt"]["p50"] if result["bt"] else None
        return []
    except Exception as err:  # noqa: BLE001
        return [f"semi24: {type(err).__name__}: {err}"]


def peak_memory_mb(model: nn.Module, example_input: torch.Tensor, *, batch_size: int = 64,
                   device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                   memory_format: str = "contiguous") -> float | None:
    """Peak CUDA memory of one inference call at ``batch_size``, MiB; ``None`` on CPU.

    Counts what the call needs beyond what was allocated before: a copy of the weights, the input,
    activations and workspaces (``torch.cuda.max_memory_allocated`` minus the allocation before the copy).

    Args:
        model: the network (not changed).
        example_input: a batch of inputs whose rows form the batch.
        batch_size: the batch size.
        device: where to run; ``None`` means where the model's parameters are.
        dtype: floating dtype of the copy and its input.
        memory_format: ``contiguous`` or ``channels_last``.

    Returns:
        MiB, or ``None`` when the device is not CUDA.
    """
    if memory_format not in MEMORY_FORMATS[:2]:
        raise ValueError(f"memory_format: unknown {memory_format!r}; allowed: contiguous, channels_last")
    device = _normalize_device(device if device is not None else _model_device_dtype(model)[0])
    if device.type != "cuda":
        return None
    base = _memory_allocated(device)
    net = _prepared_copy(model, device, dtype, memory_format)
    x = _make_batch(example_input, batch_size, device, dtype, memory_format)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        net(x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / _MIB


# --- 2:4 semi-structured ------------------------------------------------------------------------------


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
        return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
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
    device = _normalize_device(device)
    reference = _prepared_copy(model, device, torch.bfloat16, memory_format)
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


# --- all together -----------------------------------------------------------------------------------


def measure_model(model: nn.Module, example_input: torch.Tensor, *, latency: bool = True,
                  batch_sizes: Sequence[int] = (1, 64), repeats: int = 30, warmup: int = 5,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                  memory_format: str = "contiguous", threads: int | None = None,
                  extras: bool = True) -> dict[str, Any]:
    """Every measurement column of a row: size, arithmetic and (optionally) latency.

    Args:
        model: the network (not changed).
        example_input: a batch of inputs ``(B, ...)``; ``example_input.shape[1:]`` is the MAC-counting shape.
        latency: time the model; when ``False`` the latency columns are ``None``.
        batch_sizes: see :func:`measure_latency`.
        repeats: see :func:`measure_latency`.
        warmup: see :func:`measure_latency`.
        device: where to time; ``None`` means where the model's parameters are.
        dtype: see :func:`measure_latency`.
        memory_format: see :func:`measure_latency`.
        threads: see :func:`measure_latency`.
        extras: see :func:`measure_latency`.

    Returns:
        ``params``, ``params_nonzero``, ``macs``, ``macs_all``, ``macs_nonzero``, ``ckpt_bytes`` and every key
        of ``LATENCY_COLUMNS``.
    """
    row: dict[str, Any] = {"params": count_params(model), "params_nonzero": count_params_nonzero(model)}
    row.update(count_macs(model, tuple(example_input.shape[1:])))
    row["ckpt_bytes"] = checkpoint_bytes(model)
    if latency:
        row.update(measure_latency(model, example_input, batch_sizes=batch_sizes, repeats=repeats, warmup=warmup,
                                   dtype=dtype, memory_format=memory_format, threads=threads, device=device,
                                   extras=extras))
    else:
        row.update(dict.fromkeys(LATENCY_COLUMNS))
    return row
