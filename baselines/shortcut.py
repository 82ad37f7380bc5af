"""Teach torch-pruning the option-A (zero-padding) shortcut of CIFAR ResNets.

The trap: an option-A shortcut (``harness.core.models.PadShortcut``) subsamples and zero-pads channels with plain
tensor ops. Torch-pruning's dependency graph sees the pad as an element-wise op, couples the 16-channel input
with the 32-channel output index by index, prunes both sides "consistently", and the pruned model fails at its
next forward (``The size of tensor a (24) must match the size of tensor b (32)``).

The fix: before tracing, every option-A shortcut is replaced by a :class:`ChannelMapShortcut` that computes the
same function from an explicit channel map (input channel ``src[i]`` lands on output channel ``dst[i]``, every
other output channel is zero), and :class:`ChannelMapPruner` is registered for it. The pruner decouples the two
sides like a convolution does: pruning the input stream drops entries of the map (their output channels become
zero), pruning the output stream drops output positions (and the input channels that landed there). Any other
parameter-free module that changes the channel count is refused with a ``ValueError`` rather than mis-pruned.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = ["ChannelMapShortcut", "ChannelMapPruner", "convert_pad_shortcuts", "check_hidden_channel_ops"]


class ChannelMapShortcut(nn.Module):
    """A parameter-free shortcut: stride-``s`` subsampling, then ``out[:, dst[i]] = x[:, src[i]]``, zeros elsewhere.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: spatial subsampling step.
        src: input channels carried over, in order.
        dst: the output channel each of them lands on (same length as ``src``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, src: Sequence[int], dst: Sequence[int]):
        super().__init__()
        if len(src) != len(dst):
            raise ValueError(f"src/dst: lengths {len(src)} and {len(dst)} differ; allowed: equal lengths")
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        # the map is architecture, not weights: it travels in serialize.architecture_of, not in the state_dict
        self.register_buffer("src", torch.tensor(list(src), dtype=torch.long), persistent=False)
        self.register_buffer("dst", torch.tensor(list(dst), dtype=torch.long), persistent=False)

    @classmethod
    def from_pad(cls, in_channels: int, out_channels: int, stride: int) -> "ChannelMapShortcut":
        """The map of an option-A shortcut: the input lands in the middle, ``(out - in) // 2`` zeros in front."""
        front = max(out_channels - in_channels, 0) // 2
        n = min(in_channels, out_channels)
        return cls(in_channels, out_channels, stride, range(n), range(front, front + n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        out = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])  # (B, C_out, H/s, W/s)
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def prune_in(self, idxs: Sequence[int]) -> None:
        """Remove input channels ``idxs``: their map entries go, the other inputs are renumbered."""
        drop = set(int(i) for i in idxs)
        keep = [k for k, s in enumerate(self.src.tolist()) if s not in drop]
        shift = _shift_table(self.in_channels, drop)
        self.src = torch.tensor([shift[s] for s in self.src[keep].tolist()], dtype=torch.long, device=self.src.device)
        self.dst = self.dst[keep]
        self.in_channels -= len(drop)

    def prune_out(self, idxs: Sequence[int]) -> None:
        """Remove output channels ``idxs``: the entries landing there go, the other outputs are renumbered."""
        drop = set(int(i) for i in idxs)
        keep = [k for k, d in enumerate(self.dst.tolist()) if d not in drop]
        shift = _shift_table(self.out_channels, drop)
        self.dst = torch.tensor([shift[d] for d in self.dst[keep].tolist()], dtype=torch.long, device=self.dst.device)
        self.src = self.src[keep]
        self.out_channels -= len(drop)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}, carried={self.src.numel()}"


def _shift_table(n: int, drop: set[int]) -> dict[int, int]:
    """New index of every surviving index of ``range(n)`` once ``drop`` is removed."""
    survivors = [i for i in range(n) if i not in drop]
    return {old: new for new, old in enumerate(survivors)}


class ChannelMapPruner(tp.pruner.BasePruningFunc):
    """Torch-pruning handler for :class:`ChannelMapShortcut`: in and out channels prune independently."""

    TARGET_MODULES = ChannelMapShortcut

    def prune_out_channels(self, layer: ChannelMapShortcut, idxs: Sequence[int]) -> nn.Module:
        layer.prune_out(idxs)
        return layer

    def prune_in_channels(self, layer: ChannelMapShortcut, idxs: Sequence[int]) -> nn.Module:
        layer.prune_in(idxs)
        return layer

    def get_out_channels(self, layer: ChannelMapShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelMapShortcut) -> int:
        return layer.in_channels


def _is_pad_shortcut(module: nn.Module) -> bool:
    # duck-typed on harness.core.models.PadShortcut (baselines do not import harness internals)
    return (type(module).__name__ == "PadShortcut" and all(hasattr(module, a) for a in
            ("in_channels", "out_channels", "stride")) and not any(True for _ in module.parameters()))


def convert_pad_shortcuts(model: nn.Module) -> int:
    """Replace every option-A ``PadShortcut`` of ``model`` by the equivalent :class:`ChannelMapShortcut`, in place.

    Returns:
        How many shortcuts were replaced.
    """
    found = [(name, m) for name, m in model.named_modules() if _is_pad_shortcut(m)]
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ChannelMapShortcut.from_pad(m.in_channels, m.out_channels, m.stride))
    return len(found)


def check_hidden_channel_ops(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Refuse a model with a parameter-free leaf module that changes the channel count (torch-pruning cannot see it).

    Raises:
        ValueError: naming the first such module.
    """
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(m: nn.Module, inputs, out) -> None:
        x = inputs[0] if inputs else None
        if (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dim() == out.dim() == 4
                and x.shape[1] != out.shape[1]):
            found.append(f"{names[m]} ({type(m).__name__}, {x.shape[1]}->{out.shape[1]} channels)")

    leaves = [m for m in model.modules() if not isinstance(m, ChannelMapShortcut)
              and next(m.children(), None) is None and next(m.parameters(), None) is None]
    hooks = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if found:
        raise ValueError(f"model: {found[0]} changes channels without parameters, which structured pruning "
                         "cannot follow; allowed: layers torch-pruning knows (for CIFAR ResNets use shortcut 'B')")
