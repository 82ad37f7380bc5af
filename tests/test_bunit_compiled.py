"""The ``compiled`` backend: every unit layer runs its own compiled graph, however many layers a model has.

Dynamo caches compiled graphs per code object, at most ``recompile_limit`` (8) of them; a layer past that limit
would silently run eagerly. Here a counting dynamo backend records which graph runs on every call.
"""
from __future__ import annotations

import torch
import torch._dynamo

from bunit.layers import UnitLayer
from conftest import spread_bn


def test_every_compiled_layer_runs_its_own_graph(monkeypatch):
    runs: list[int] = []  # one entry per call of a compiled graph: the graph's number

    def counting_backend(gm, example_inputs):
        number = len(graphs)
        graphs.append(gm)

        def run(*args):
            runs.append(number)
            return gm.forward(*args)
        return run

    graphs: list = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting_backend))
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    layers = [spread_bn(UnitLayer([f"{n}x2-4-2"]), n).eval() for n in range(1, limit + 5)]  # more than the limit
    xs = [torch.randn(2, layer.in_channels, 6, 6) for layer in layers]
    with torch.no_grad():
        refs = [layer(x) for layer, x in zip(layers, xs)]
        for layer in layers:
            layer.backend = "compiled"
        for rnd in range(2):
            for i, (layer, x, ref) in enumerate(zip(layers, xs, refs)):
                before = len(runs)
                y = layer(x)
                assert len(runs) == before + 1, f"layer {i} ran without its compiled graph (round {rnd})"
                assert runs[-1] == i  # its own graph, compiled on its first call
                torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert len(graphs) == len(layers)  # the second round compiled nothing
    torch._dynamo.reset()
