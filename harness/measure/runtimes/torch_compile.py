"""The ``compile`` runtime: ``torch.compile(model, dynamic=False)``.

The whole session runs under :meth:`TorchCompile.session` (automatic dynamic shapes off, the recompile limits raised
so that dynamo never falls back to eager silently); the first call compiles and its wall time is reported as
``compile_s``, never as latency. Output must match eager within ``rtol=1e-3, atol=1e-4``.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn

from harness.measure.runtimes.base import Runner, Runtime, register_runtime

__all__ = ["TorchCompile"]


@register_runtime("compile")
class TorchCompile(Runtime):
    """``torch.compile(net, dynamic=False)``, compiled on the first call."""

    checked_as = "compile"

    def session(self) -> contextlib.AbstractContextManager:
        """Static shapes and no recompile limit.

        Every model of a session is compiled through the same code objects (a backbone's block ``forward``), and
        frames after a graph break compile on later calls; with dynamo's defaults the ninth entry would fall back to
        eager silently and automatic dynamic shapes would compile shape-generic kernels.
        """
        import torch._dynamo  # loaded on use: the other runtimes never need dynamo

        return torch._dynamo.config.patch(automatic_dynamic_shapes=False, assume_static_by_default=True,
                                          recompile_limit=100_000, accumulated_recompile_limit=100_000)

    def build(self, net: nn.Module, x: torch.Tensor, *, threads: int, device: torch.device) -> Runner:
        compiled = torch.compile(net, dynamic=False)
        with self.session(), torch.inference_mode():
            t0 = time.perf_counter()  # one compile, reported as such; latency is timed by bunit.timing
            out = compiled(x)
            compile_s = time.perf_counter() - t0
        return Runner(lambda: compiled(x), lambda: out, {"compile_s": round(compile_s, 3)})
