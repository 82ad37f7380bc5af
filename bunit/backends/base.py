"""The protocol of a unit-layer execution backend and the registry of them.

A backend says how a fused :class:`bunit.layers.UnitLayer` computes its output, and what it supports:

- ``eager``: it runs as written (the autotuner's default candidates, a ``compile_base``); ``compiled`` is not.
- ``devices``: the device types it runs on (elsewhere it raises, and the autotuner records it as failed).
- ``trains``: training mode and autograd run its own computation; False: they run ``grouped`` instead (exact
  gradients and BatchNorm statistics), as ``fused_cpu`` does.
- ``fuses_residual``: :meth:`Backend.run_with_residual` adds a residual block's shortcut inside the kernel and reads
  an option-A shortcut from the block's input (a block then hands over that input and its channel map).
- ``caches``: the names of the per-layer caches it keeps (``layer.caches[name]``, written with
  ``layer.keep_cache``). The layer empties every declared cache when it is pickled, deep-copied or moved
  (``to()``, ``float()``, ...); a backend checks its own cache against the weights it was built from.

A backend is one class registered by name (``@register_backend("name")``); :mod:`bunit.backends` imports the
built-in ones in the order ``BACKENDS`` lists them.
"""
from __future__ import annotations

from typing import Any

import torch

from bunit.registry import NameView, Registry

__all__ = ["Backend", "register_backend", "unregister_backend", "get_backend", "list_backends", "declared_caches",
           "BACKENDS", "EAGER_BACKENDS"]

_REGISTRY: Registry["Backend"] = Registry("backend")


class Backend:
    """How a fused unit layer runs: override :meth:`run` (and :meth:`run_with_residual` if it fuses the residual)."""

    name: str = ""
    eager: bool = True
    devices: tuple[str, ...] = ("cpu", "cuda")
    trains: bool = True
    fuses_residual: bool = False
    caches: tuple[str, ...] = ()

    def run(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """The units' output ``(B, out, H/s, W/s)`` of ``layer`` on ``x`` ``(B, in, H, W)``, in layer order."""
        raise NotImplementedError(f"backend {self.name!r} does not implement run()")

    def run_with_residual(self, layer: Any, x: torch.Tensor, residual: torch.Tensor | None,
                          residual_map: tuple[int, int]) -> torch.Tensor:
        """``relu(units(x) + residual)`` (the residual mapped as ``UnitLayer.forward`` says); the units alone
        without a residual."""
        return layer.add_residual(self.run(layer, x), residual, residual_map)


def register_backend(name: str):
    """Class decorator: register a :class:`Backend` subclass under ``name``; raises on a duplicate."""
    return _REGISTRY.register(name)


def unregister_backend(name: str) -> None:
    """Remove a registered backend (a test's own, or one a plugin replaces)."""
    _REGISTRY.unregister(name)


def list_backends(*, eager: bool | None = None, device: str | None = None) -> tuple[str, ...]:
    """Registered backend names in registration order; only eager ones (or only others), only those running on a
    device type, when asked."""
    return _REGISTRY.names(lambda b: (eager is None or b.eager == eager) and (device is None or device in b.devices))


def get_backend(name: str, *, field: str = "backend", eager: bool | None = None) -> Backend:
    """The backend registered as ``name``.

    Args:
        name: the backend's name.
        field: how the error names the value (``backend``, ``compile_base``).
        eager: only eager backends are allowed (True) when given.

    Raises:
        ValueError: ``<field>: 'x' is not allowed; allowed: ...`` for a name that is not registered (or not eager).
    """
    backend = _REGISTRY.find(name)  # a dict lookup: a unit layer asks on every forward
    if backend is None or (eager is not None and backend.eager != eager):
        raise ValueError(f"{field}: {name!r} is not allowed; allowed: {', '.join(list_backends(eager=eager))}")
    return backend


def declared_caches() -> frozenset[str]:
    """Every cache name a registered backend declares."""
    return frozenset(c for b in _REGISTRY.items() for c in b.caches)


BACKENDS = NameView(_REGISTRY)
"""Every registered backend name, in registration order (a live view of the registry)."""
EAGER_BACKENDS = NameView(_REGISTRY, lambda b: b.eager)
"""The registered eager backends: every backend but ``compiled`` among the built-in ones (a live view)."""
