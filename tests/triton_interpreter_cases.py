"""Checks of :mod:`bunit.unit_triton` run by Triton's interpreter on CPU tensors, in a process of their own:
``TRITON_INTERPRET=1`` must be set before ``triton`` is imported (``tests/test_unit_triton.py`` starts it). Prints
one JSON object: per case, the largest error relative to the reference tensor's largest magnitude."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(__file__))

from bunit import unit_triton  # noqa: E402
from bunit.layers import UnitLayer  # noqa: E402
from conftest import spread_bn  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def kernel_case(n, cin, cout, groups, s, h, w, channels_last):
    """float32 kernels against float64 F.conv2d and its autograd; a different output gradient layout too."""
    gen = torch.Generator().manual_seed(cin * 7 + cout + s)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(cout, cin // groups, 3, 3, generator=gen, dtype=torch.float64)
    x32 = x.float().contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x32.requires_grad_()
    w32 = wt.float().requires_grad_()
    y = unit_triton.TritonUnitConv.apply(x32, w32, groups, s)
    xd, wd = x.clone().requires_grad_(), wt.clone().requires_grad_()
    ref = F.conv2d(xd, wd, None, s, 1, groups=groups)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    y.backward(g.float())
    ref.backward(g)
    return {"y": rel(y, ref), "gx": rel(x32.grad, xd.grad), "gw": rel(w32.grad, wd.grad),
            "layout_kept": bool(y.is_contiguous(memory_format=torch.channels_last) == channels_last
                                and x32.grad.is_contiguous(memory_format=torch.channels_last) == channels_last)}


def layer_case(specs, stride):
    """A unit layer in training mode with each conv through unit_triton.conv, against the grouped backend."""
    torch.manual_seed(0)
    ref = spread_bn(UnitLayer(specs, stride=stride), 1).train()
    new = UnitLayer(specs, stride=stride).train()
    new.load_state_dict(ref.state_dict())
    x = torch.randn(2, ref.in_channels, 5, 6)
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    yn = new.run_groups(xn, unit_triton.conv)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(1))
    yr.backward(g)
    yn.backward(g)
    grads = max(rel(a.grad, b.grad) for a, b in zip(new.parameters(), ref.parameters()))
    stats = max(rel(a, b) for a, b in zip(new.buffers(), ref.buffers()) if a.is_floating_point())
    conv = new.groups[0].conv1
    return {"y": rel(yn, yr), "gx": rel(xn.grad, xr.grad), "params": grads, "running": stats,
            "supports": unit_triton.supports(x, conv)}


KERNEL_CASES = {
    "groups3_s2": (2, 6, 6, 3, 2, 9, 8, False),
    "channels_last_s1": (2, 4, 4, 2, 1, 5, 6, True),
    "two_blocks": (4, 2, 2, 2, 1, 17, 17, False),  # 289 pixels: two programs per plane; 1156 positions: two gw blocks
}
LAYER_CASES = {"units_s2": (["2x2-1-4"], 2)}

if __name__ == "__main__":
    out = {name: kernel_case(*args) for name, args in KERNEL_CASES.items()}
    out.update({name: layer_case(*args) for name, args in LAYER_CASES.items()})
    print(json.dumps(out))
