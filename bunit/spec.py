"""Basic-unit specifications: the ``a-b-c`` shapes BUnit-Net stacks into unit layers.

After Lan, Cheung et al., "Compact Neural Network via Stacking Hybrid Units" (TPAMI 2024): a basic
unit ``a-b-c`` is conv(a->b) + BN + ReLU followed by conv(b->c) + BN + ReLU. A unit layer splits its
input channels in order by the units' ``a`` and concatenates their outputs, so a layer is described
completely by its ordered list of specs. This module only describes units; ``bunit.layers`` builds them.

Spec strings: ``"a-b-c"`` with optional suffixes ``/sN`` (stride of the first conv) and ``/kN``
(kernel size, odd), e.g. ``"2-4-4/s2"``. A run of equal units may be written ``"32x2-4-2"``
(see :func:`parse_specs` and :func:`compact_specs`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "UnitSpec",
    "CATALOGUE",
    "parse_spec",
    "parse_specs",
    "format_spec",
    "compact_specs",
    "hybrid_mix",
    "uniform_units",
]

CATALOGUE: tuple[str, ...] = ("1-2-1", "1-2-2", "1-2-3", "2-1-1", "2-1-2", "3-2-1")
"""The unit types of the paper's exploration code (MNIST/CIFAR basic-unit study)."""

_SPEC_FORM = ("'a-b-c' with positive integers, optionally followed by '/sN' (stride) and '/kN' (odd kernel), "
              "e.g. '2-4-2/s2'")
_SPEC_RE = re.compile(r"^\s*(\d+)-(\d+)-(\d+)((?:/[sk]\d+)*)\s*$")
_RUN_RE = re.compile(r"^\s*(\d+)\s*[x*]\s*(.+)$")


@dataclass(frozen=True)
class UnitSpec:
    """One basic unit ``a-b-c``.

    Attributes:
        a: input channels (the slice of the layer input the unit reads).
        b: hidden channels (output of the first conv).
        c: output channels (output of the second conv).
        kernel: odd square kernel size of both convs (padding ``kernel // 2``).
        stride: stride of the first conv.
    """

    a: int
    b: int
    c: int
    kernel: int = 3
    stride: int = 1

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "kernel", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UnitSpec.{name}: must be a positive int, got {value!r}")
        if self.kernel % 2 == 0:
            raise ValueError(f"UnitSpec.kernel: must be odd (padding kernel//2 keeps the size), got {self.kernel}")

    @property
    def params(self) -> int:
        """Weights of both convs plus the affine BN parameters (2 per channel)."""
        k2 = self.kernel * self.kernel
        return k2 * (self.a * self.b + self.b * self.c) + 2 * (self.b + self.c)

    def __str__(self) -> str:
        return format_spec(self)


def format_spec(spec: UnitSpec) -> str:
    """``UnitSpec(2, 4, 4, stride=2)`` -> ``"2-4-4/s2"`` (defaults are omitted)."""
    text = f"{spec.a}-{spec.b}-{spec.c}"
    if spec.stride != 1:
        text += f"/s{spec.stride}"
    if spec.kernel != 3:
        text += f"/k{spec.kernel}"
    return text


def parse_spec(text: str | UnitSpec) -> UnitSpec:
    """Parse one spec string such as ``"2-4-2"`` or ``"2-4-4/s2"``; a UnitSpec is returned unchanged.

    Args:
        text: the spec string.

    Returns:
        The UnitSpec.

    Raises:
        ValueError: when the string is not of the allowed form.
    """
    if isinstance(text, UnitSpec):
        return text
    if not isinstance(text, str):
        raise ValueError(f"spec: expected a string of the form {_SPEC_FORM}; got {text!r}")
    match = _SPEC_RE.match(text)
    if match is None:
        raise ValueError(f"spec: {text!r} is not of the form {_SPEC_FORM}")
    a, b, c, suffixes = int(match[1]), int(match[2]), int(match[3]), match[4]
    extra: dict[str, int] = {}
    for part in filter(None, suffixes.split("/")):
        key = "stride" if part[0] == "s" else "kernel"
        if key in extra:
            raise ValueError(f"spec: {text!r} gives {key} twice; allowed form: {_SPEC_FORM}")
        extra[key] = int(part[1:])
    return UnitSpec(a, b, c, **extra)


def parse_specs(items: str | Iterable[str | UnitSpec]) -> list[UnitSpec]:
    """Parse a list of spec strings; ``"Nx<spec>"`` expands to N equal units.

    Args:
        items: spec strings / UnitSpecs, or one string with comma-separated entries.

    Returns:
        The expanded, ordered list of UnitSpecs.
    """
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    specs: list[UnitSpec] = []
    for item in items:
        if isinstance(item, str) and (run := _RUN_RE.match(item)):
            count = int(run[1])
            if count < 1:
                raise ValueError(f"spec: run length in {item!r} must be >= 1")
            specs.extend([parse_spec(run[2])] * count)
        else:
            specs.append(parse_spec(item))
    return specs


def compact_specs(specs: Sequence[UnitSpec]) -> list[str]:
    """Run-length encode an ordered spec list: ``[2-4-2]*32`` -> ``["32x2-4-2"]``; order is kept."""
    out: list[str] = []
    i = 0
    while i < len(specs):
        j = i
        while j + 1 < len(specs) and specs[j + 1] == specs[i]:
            j += 1
        n = j - i + 1
        out.append(f"{n}x{format_spec(specs[i])}" if n > 1 else format_spec(specs[i]))
        i = j + 1
    return out


def uniform_units(in_channels: int, out_channels: int, a: int = 2, b: int = 4, *, kernel: int = 3,
                  stride: int = 1) -> list[UnitSpec]:
    """The paper's ResNet unit row: ``in/a`` units of shape ``a-b-(a*out/in)``.

    Equal widths give ``2-4-2``; a doubled width gives ``2-4-4``.

    Args:
        in_channels: layer input channels (must be a multiple of ``a``).
        out_channels: layer output channels (``a * out / in`` must be an integer).
        a: unit input channels.
        b: unit hidden channels.
        kernel: conv kernel size.
        stride: stride of each unit's first conv.

    Returns:
        ``in_channels // a`` equal specs.
    """
    if in_channels < 1 or in_channels % a:
        raise ValueError(f"in_channels: {in_channels} is not a positive multiple of a={a}")
    if (a * out_channels) % in_channels:
        raise ValueError(f"out_channels: a*out/in = {a}*{out_channels}/{in_channels} is not an integer")
    c = a * out_channels // in_channels
    if c < 1:
        raise ValueError(f"out_channels: {out_channels} gives c={c} < 1 for in_channels={in_channels}, a={a}")
    return [UnitSpec(a, b, c, kernel=kernel, stride=stride)] * (in_channels // a)


def _reachable(in_channels: int, out_channels: int | None, cat: Sequence[UnitSpec]) -> list[int]:
    """reach[r] is a bit mask over totals of ``c``: bit q set iff some multiset of ``cat`` has sum a = r, sum c = q.

    Without ``out_channels`` only ``reach[r] != 0`` matters (bit 0 stands for "some total").
    """
    limit = None if out_channels is None else (1 << (out_channels + 1)) - 1
    reach = [0] * (in_channels + 1)
    reach[0] = 1
    for r in range(1, in_channels + 1):
        mask = 0
        for s in cat:
            if s.a <= r and reach[r - s.a]:
                mask |= 1 if out_channels is None else (reach[r - s.a] << s.c) & limit
        reach[r] = mask
    return reach


def hybrid_mix(in_channels: int, out_channels: int | None, catalogue: Sequence[str | UnitSpec] = CATALOGUE,
               seed: int = 0) -> list[UnitSpec]:
    """Draw a hybrid unit row at random, with a fixed seed, whose ``a`` sum to ``in_channels`` exactly.

    Algorithm (uniform draws restricted to completable choices): units are drawn one after another,
    each uniformly among the catalogue entries that still leave a completable remainder, i.e. for which
    some multiset of catalogue units has ``a`` summing to the channels left (and, when ``out_channels``
    is given, ``c`` summing to the outputs left). The completable set is precomputed once by a 2-D
    unbounded subset-sum over (remaining in, remaining out). So no draw is ever rejected after the
    fact and no tail is patched: the result is exact by construction, and it is a pure function of
    ``(in_channels, out_channels, catalogue order, seed)`` through ``random.Random(seed)``.

    Args:
        in_channels: channels the row consumes (sum of ``a``).
        out_channels: channels the row produces (sum of ``c``); None leaves the output width free.
        catalogue: unit types to draw from (spec strings or UnitSpecs).
        seed: the random seed.

    Returns:
        The ordered list of unit specs.

    Raises:
        ValueError: when no combination of catalogue units meets the widths.
    """
    cat = [parse_spec(s) for s in catalogue]
    if not cat:
        raise ValueError("catalogue: must name at least one unit type")
    if in_channels < 1:
        raise ValueError(f"in_channels: must be >= 1, got {in_channels}")
    if out_channels is not None and out_channels < 1:
        raise ValueError(f"out_channels: must be >= 1 or None, got {out_channels}")
    reach = _reachable(in_channels, out_channels, cat)

    def completable(r: int, q: int | None) -> bool:
        return bool(reach[r]) if q is None else q >= 0 and bool((reach[r] >> q) & 1)

    if not completable(in_channels, out_channels):
        raise ValueError(f"catalogue: no mix of {[format_spec(s) for s in cat]} has a summing to {in_channels}"
                         + ("" if out_channels is None else f" and c summing to {out_channels}"))
    rng = random.Random(seed)
    units: list[UnitSpec] = []
    r, q = in_channels, out_channels
    while r > 0:
        options = [s for s in cat if s.a <= r and completable(r - s.a, None if q is None else q - s.c)]
        pick = options[rng.randrange(len(options))]
        units.append(pick)
        r -= pick.a
        q = None if q is None else q - pick.c
    return units
