"""Execution backends of the fused unit layer behind one protocol and one registry (see :mod:`bunit.backends.base`).

Every built-in backend module is imported here, explicitly and in a fixed order (the order of ``BACKENDS``), so that
registration is predictable. Adding a backend is one file: a :class:`Backend` subclass decorated with
``@register_backend("name")``, imported here (or by its user before the name is used).
"""
from bunit.backends.base import (
    BACKENDS,
    EAGER_BACKENDS,
    Backend,
    declared_caches,
    get_backend,
    list_backends,
    register_backend,
    unregister_backend,
)

# backend modules, one class each (import order = registration order = the order of BACKENDS)
from bunit.backends import loop, grouped, grouped_cl, blockdiag, bmm, stencil  # noqa: F401  (eager, pure torch)
from bunit.backends import fused_cpu, unit_train  # noqa: F401  (eager, C++ kernels)
from bunit.backends import compiled  # noqa: F401  (torch.compile of an eager backend)

__all__ = ["BACKENDS", "EAGER_BACKENDS", "Backend", "declared_caches", "get_backend", "list_backends",
           "register_backend", "unregister_backend"]
