"""Devices: the one resolution of a ``--device`` name, and where a measurement ran (name, threads) as row columns."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch
import torch.nn as nn

__all__ = ["resolve_device", "normalize_device", "model_device", "device_info", "dtype_name", "cpu_isa", "cpu_description"]


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; raises naming the allowed values."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available; allowed here: cpu, auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"device: {name!r} not allowed; allowed: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def normalize_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index becomes the current CUDA device; other devices pass through."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first floating-point tensor (CPU for a model without any)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device
    return torch.device("cpu")


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


_ISA_FLAGS = (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_isa(flags: set[str] | None = None) -> str:
    """The vector instruction sets that decide CPU training and inference speed, widest first: e.g.
    ``AVX-512, AVX512-BF16`` or ``AVX2`` (two machines sold under one CPU name have differed 10x in training speed).

    Args:
        flags: the CPU's flags; read from /proc/cpuinfo when None.

    Returns:
        The names, comma-separated; ``""`` when none of them is known.
    """
    if flags is None:
        flags = set()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.lower().startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
    have = [name for flag, name in _ISA_FLAGS if flag in flags]
    if "AVX-512" in have:  # the AVX-512 machine has AVX2 too; naming it adds nothing
        have = [h for h in have if h != "AVX2"]
    order = ("AVX2", "AVX-512", "AVX512-BF16", "AMX")
    return ", ".join(sorted(have, key=order.index))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_description() -> str:
    """``AMD EPYC (AVX-512, AVX512-BF16; 2 CPUs)``: the model, its instruction sets and the CPUs this process may use."""
    isa = cpu_isa()
    return f"{_cpu_name()} ({isa + '; ' if isa else ''}{_usable_cpus()} CPUs)"


def device_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Name of the device and the torch intra-op thread count.

    Args:
        device: ``cpu`` or a CUDA device.

    Returns:
        ``device_name`` (the GPU name, or :func:`cpu_description`: the CPU model from /proc/cpuinfo with its vector
        instruction sets and usable CPU count) and ``threads``.
    """
    device = normalize_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    return {"device_name": name, "threads": torch.get_num_threads()}

