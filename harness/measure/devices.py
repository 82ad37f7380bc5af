"""Where a measurement ran: the device, its name and the thread count, as row columns."""
from __future__ import annotations

import platform
from typing import Any

import torch
import torch.nn as nn

__all__ = ["normalize_device", "model_device", "device_info", "dtype_name"]


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


def device_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Name of the device and the torch intra-op thread count.

    Args:
        device: ``cpu`` or a CUDA device.

    Returns:
        ``device_name`` (CPU model from /proc/cpuinfo, or the GPU name) and ``threads``.
    """
    device = normalize_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device_name": name, "threads": torch.get_num_threads()}

