"""The ``compiled`` backend: ``torch.compile`` of the layer's ``compile_base`` (an eager backend).

The first call compiles and may take tens of seconds; the compiled function is kept per layer (``COMPILED_CACHE``)
until ``compile_base`` changes. Each layer compiles a function with a code object of its own, so each has its own
dynamo cache (dynamo allows 8 graphs per code object and would otherwise run every layer past the eighth eagerly).
"""
from __future__ import annotations

import sys
import types

import torch

from bunit.backends.base import Backend, get_backend, register_backend

__all__ = ["Compiled", "COMPILED_CACHE", "own_code"]

COMPILED_CACHE = "compiled.function"
"""The per-layer cache: ``(compile_base, compiled function)``."""


@register_backend("compiled")
class Compiled(Backend):
    """``torch.compile`` of ``layer.compile_base``'s :meth:`Backend.run` on this layer."""

    eager = False
    caches = (COMPILED_CACHE,)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        base = layer.compile_base
        backend = get_backend(base, field="compile_base", eager=True)
        compiled = layer.caches.get(COMPILED_CACHE)
        if compiled is None or compiled[0] != base:
            fn = own_code(lambda t: backend.run(layer, t), f"unit_layer_{id(layer):x}")
            compiled = (base, torch.compile(fn))
            layer.keep_cache(COMPILED_CACHE, compiled)
        return compiled[1](x)  # (B, out, H/s, W/s)


def own_code(fn: types.FunctionType, name: str) -> types.FunctionType:
    """``fn`` with a code object of its own (named ``name``), same closure and globals.

    Dynamo keeps its compiled graphs per code object, at most ``recompile_limit`` (8) of them: every layer's
    ``compiled`` closure shares the one lambda's code, so from the ninth layer on dynamo would stop compiling and
    silently run the layer eagerly. A code object per layer gives each layer its own cache and leaves the global
    limit alone.
    """
    code = fn.__code__.replace(co_name=name, co_qualname=name) if sys.version_info >= (3, 11) else \
        fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
