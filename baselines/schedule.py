"""Prune schedules: the targets of the successive prune stages (one stage unless the schedule is iterative)."""
from __future__ import annotations

from baselines.base import SCHEDULES, MethodContext

__all__ = ["stage_targets"]


def stage_targets(target: float, ctx: MethodContext) -> list[float]:
    """Per-step targets reaching ``target`` at the last step.

    "oneshot" and "progressive" have one stage (how a stage is reached is the method's business). "iterative" takes ``ctx.steps`` steps, geometric in the kept fraction: step ``k`` of
    ``n`` reaches ``1 - (1 - target) ** (k / n)``, so every step removes the same share of what is left (Han et
    al. 2015, Zhu & Gupta 2017 use the same shape). ``target`` is a removed fraction (sparsity, channel ratio or
    MACs reduction) in (0, 1).

    Args:
        target: the final removed fraction.
        ctx: the method context (``schedule`` and ``steps``).

    Returns:
        The increasing list of per-step targets; the last equals ``target``.
    """
    if ctx.schedule not in SCHEDULES:
        raise ValueError(f"schedule: {ctx.schedule!r} not allowed; allowed: {', '.join(SCHEDULES)}")
    if not isinstance(ctx.steps, int) or ctx.steps < 1:
        raise ValueError(f"steps: {ctx.steps!r} not allowed; allowed: an integer >= 1")
    n = ctx.steps if ctx.schedule == "iterative" else 1
    steps = [1.0 - (1.0 - target) ** (k / n) for k in range(1, n + 1)]
    steps[-1] = float(target)
    return steps
