"""The fastest training configuration of a model, by measuring a few SGD steps of each candidate.

A candidate is (precision, memory format, unit backend):

- precision: ``bf16`` autocast only where the recipe asks for it (``bf16``, and ``bf16_cpu`` on CPU); float32 is
  always a candidate, since it is at least as exact. So the picked precision never rounds more than the recipe says.
- memory format: NCHW or channels_last (the same arithmetic in another layout). On CPU, ``unit_train``'s unit
  groups compute in NCHW, except rows of 16k 2-1-2 or 2-1-4 units and hybrid rows, which run channels_last; a
  layer given the other layout copies its input (and its block's shortcut) and hands the gradient back in the
  given layout, so channels_last serves the dense layers (the dense stages of a partial plan, the shortcuts).
- unit backend (models with fused unit layers): ``grouped`` (oneDNN's grouped convolution), ``blockdiag`` (each
  conv as one dense convolution whose weight is zero off the unit blocks, :mod:`bunit.blockdiag`: more arithmetic
  than the units need, on the runtime's fastest convolution path; gradients reach only the unit weights) and
  ``unit_train``: on CPU :mod:`bunit.unit_train`, the C++ kernel with its own backward, checked within 1e-4 of
  ``grouped`` by ``tests/test_bunit_train.py``; on CUDA, where ``triton`` is installed, the Triton kernels of
  :mod:`bunit.unit_triton` (checked by ``tests/test_unit_triton.py`` in Triton's interpreter; never run on a
  GPU). ``tests/test_train_speed.py`` checks one SGD step of each within 1e-4 of ``grouped``'s. The backend changes how the step is computed, not what the model is: its MACs and
  parameters are the units'.

Then, for a model with several unit layers, each unit layer alone (forward and backward, on the input it gets in
training under the winner) is timed on every unit backend in the winner's precision and memory format
(:func:`time_layer_backends`),
and where the fastest backend differs between layers, that mix (``unit_backend`` :data:`PER_LAYER`, the choice per
layer in ``layer_backends``) is timed side by side with the winner and replaces it if its step is faster. One layer's
backend changes how that layer is computed, not what: ``tests/test_train_speed.py`` checks a mix against ``grouped``
in float64.

Each candidate trains a deep copy of the model on one real batch (its own SGD optimizer; the model itself, its
BN statistics and the caller's optimizer are untouched); the candidates take turns round-robin
(:func:`bunit.timing.interleaved_times`), so a slow spell of the machine lands on all of them, and the lowest
median step wins. Measuring costs ``(warmup + rounds * (1 + settle))`` steps per candidate; a run too short to pay
for it (fewer than :data:`MIN_STEPS_TO_MEASURE` steps) keeps the recipe's configuration.
"""
from __future__ import annotations

import copy
import functools
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bunit import unit_train, unit_triton
from bunit.layers import unit_layers
from bunit.timing import interleaved_times

__all__ = ["TrainSetting", "PER_LAYER", "setting_record", "candidates", "apply_setting", "fused_sgd_supported",
           "step_fn", "time_settings",
           "choose_setting", "time_layer_backends", "MIN_STEPS_TO_MEASURE"]

MIN_STEPS_TO_MEASURE = 640
"""Training runs with fewer optimizer steps keep the recipe's configuration: measuring takes up to 12 candidates x 4
steps, over 7% of a shorter run."""


PER_LAYER = "per-layer"
"""The ``unit_backend`` of a setting whose unit layers each run their own backend (``layer_backends``)."""


@dataclass(frozen=True)
class TrainSetting:
    """One way to run the same training: bf16 autocast or not, channels_last or not, the unit layers' backend."""

    bf16: bool
    channels_last: bool
    unit_backend: str | None  # None: the model has no fused unit layers (or keeps theirs); PER_LAYER: see below
    layer_backends: tuple[tuple[str, str], ...] | None = None  # (unit layer's module name, backend) when PER_LAYER

    def __post_init__(self) -> None:
        if (self.unit_backend == PER_LAYER) != (self.layer_backends is not None):
            raise ValueError(f"unit_backend: {PER_LAYER!r} goes with layer_backends, and layer_backends with it")

    @property
    def name(self) -> str:
        units = f"/{self.unit_backend}" if self.unit_backend else ""
        return f"{'bf16' if self.bf16 else 'fp32'}/{'channels_last' if self.channels_last else 'nchw'}{units}"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def setting_record(setting: TrainSetting, *, measured: bool, step_ms: dict[str, float] | None,
                   **extra: Any) -> dict[str, Any]:
    """The row's record of the setting a training phase ran with (``train_settings``): its fields and name,
    ``layer_backends`` as ``{layer: backend}``, whether it was measured, the step times behind it, and ``extra``."""
    record = {**asdict(setting), "setting": setting.name, "measured": measured, **extra, "step_ms": step_ms}
    if setting.layer_backends is not None:
        record["layer_backends"] = dict(setting.layer_backends)
    return record


def _named_unit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in unit_layers(model) if m.impl == "fused"]


def _unit_layers(model: nn.Module) -> list:
    return [m for _, m in _named_unit_layers(model)]


def candidates(model: nn.Module, *, bf16: bool, device: torch.device) -> list[TrainSetting]:
    """The settings to try: fp32 (and bf16 where the recipe allows it) x NCHW/channels_last x unit backends."""

    precisions = [False, True] if bf16 else [False]
    units: list[str | None] = [None]
    if _unit_layers(model):
        units = ["grouped", "blockdiag"]
        if (device.type == "cpu" and unit_train.is_available()) or (device.type == "cuda" and
                                                                      unit_triton.is_available()):
            units.append("unit_train")  # the C++ kernel on CPU, the Triton kernels on CUDA
    return [TrainSetting(p, cl, u) for p in precisions for cl in (False, True) for u in units]


def apply_setting(model: nn.Module, setting: TrainSetting) -> None:
    """Put ``model`` in ``setting``'s memory format and unit backend (precision is the training loop's autocast)."""
    model.to(memory_format=setting.memory_format)
    if setting.layer_backends is not None:
        layers = dict(_named_unit_layers(model))
        if set(layers) != {name for name, _ in setting.layer_backends}:
            raise ValueError(f"layer_backends: name every fused unit layer of the model: {', '.join(layers)}")
        for name, backend in setting.layer_backends:
            layers[name].backend = backend
    elif setting.unit_backend is not None:
        for layer in _unit_layers(model):
            layer.backend = setting.unit_backend


def fused_sgd_supported(params: list[torch.Tensor]) -> bool:
    """Whether PyTorch's fused SGD (one kernel over all parameters) runs on these: floating CPU or CUDA tensors. It
    updates a ResNet-20's 65 parameters in 0.2 ms against 0.7 ms for the default per-parameter loop on CPU, a BUnit
    network's 155 (two BN layers per unit group) in 0.3 against 1.3 ms (``torch.optim.SGD`` on 2 threads here)."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def step_fn(model: nn.Module, setting: TrainSetting, xb: torch.Tensor, yb: torch.Tensor):
    """One SGD step (forward, loss, backward, update) of a deep copy of ``model`` in ``setting`` on ``(xb, yb)``."""
    model = copy.deepcopy(model).train()
    apply_setting(model, setting)
    x = xb.contiguous(memory_format=setting.memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=fused_sgd_supported(params) or None)  # as training

    def step() -> None:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=setting.bf16):
            loss = F.cross_entropy(model(x).float(), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_settings(model: nn.Module, settings: list[TrainSetting], xb: torch.Tensor, yb: torch.Tensor, *,
                  rounds: int = 3, warmup: int = 1, settle: int = 0) -> dict[TrainSetting, list[float]]:
    """Seconds of one SGD step (forward, backward, update) of a copy of ``model`` per setting, interleaved."""
    fns = {s.name: step_fn(model, s, xb, yb) for s in settings}
    times = interleaved_times(fns, rounds=rounds, warmup=warmup, settle=settle, device=xb.device)
    return {s: times[s.name] for s in settings}


def choose_setting(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, *, bf16: bool, channels_last: bool,
                   total_steps: int, rounds: int = 3) -> tuple[TrainSetting, dict[str, Any]]:
    """The fastest setting for training ``model`` on batches like ``xb``, and the record of how it was chosen.

    Args:
        model: the model to train (not changed).
        xb, yb: one training batch.
        bf16: whether the recipe allows bf16 autocast here.
        channels_last: the recipe's memory format (kept when the run is too short to measure).
        total_steps: optimizer steps the run will take.
        rounds: timed steps per candidate.

    Returns:
        The setting and a dict for the row: ``setting`` (its name), ``bf16``, ``channels_last``, ``unit_backend``,
        ``layer_backends`` (per unit layer, when the per-layer mix won), ``measured`` (False when the recipe's setting
        was kept), ``step_ms`` (median ms per candidate, the mix included when it was timed) and ``layer_ms`` (median
        ms of each unit layer's forward + backward per backend, when layers were timed).
    """
    cands = candidates(model, bf16=bf16, device=xb.device)
    recipe = TrainSetting(bf16, channels_last, "grouped" if cands[0].unit_backend else None)
    if total_steps < MIN_STEPS_TO_MEASURE or len(cands) == 1:
        return recipe, setting_record(recipe, measured=False, step_ms=None)
    times = time_settings(model, cands, xb, yb, rounds=rounds)
    medians = {s: statistics.median(t) for s, t in times.items()}
    best = min(cands, key=lambda s: medians[s])
    record: dict[str, Any] = {}
    backends = sorted({s.unit_backend for s in cands if s.unit_backend})
    if len(backends) > 1 and len(_unit_layers(model)) > 1:
        layer_ms = time_layer_backends(model, backends, best, xb, rounds=rounds + 2)
        fastest = tuple((name, min(row, key=row.get)) for name, row in layer_ms.items())
        record["layer_ms"] = {name: {b: round(ms * 1e3, 3) for b, ms in row.items()} for name, row in layer_ms.items()}
        if len({b for _, b in fastest}) > 1:  # one backend everywhere is a candidate already timed
            mixed = TrainSetting(best.bf16, best.channels_last, PER_LAYER, fastest)
            pair = time_settings(model, [best, mixed], xb, yb, rounds=rounds)
            medians[mixed] = statistics.median(pair[mixed])
            if medians[mixed] < statistics.median(pair[best]):  # timed side by side with the whole-model winner
                best = mixed
    return best, setting_record(best, measured=True, step_ms={s.name: round(ms * 1e3, 2) for s, ms in medians.items()},
                                **record)


def time_layer_backends(model: nn.Module, backends: list[str], setting: TrainSetting, xb: torch.Tensor, *,
                        rounds: int = 5) -> dict[str, dict[str, float]]:
    """Seconds of forward + backward of each fused unit layer alone, per backend, in ``setting``'s precision and
    memory format, as the model calls it in training under ``setting``: on the input it gets from ``xb`` (its unit
    backends too: in a channels_last setting ``unit_train`` hands the next layer NCHW, and that is the input the layer
    is timed on), with the block's shortcut it is given (the input itself for an identity shortcut, whose gradient
    ``unit_train`` adds in its kernel; a projection's output in the layout it comes in), and a gradient of the output's
    shape and layout (an expanded one, as ``out.sum().backward()`` gives, sends some backends down slower copies);
    all (layer, backend) pairs take turns.

    Works on copies: the model, its BN statistics and its backends are untouched.
    """
    probe = copy.deepcopy(model).train()
    apply_setting(probe, setting)
    calls: dict[str, tuple] = {}  # name: (input, shortcut or None, shortcut is the input, residual_map)

    def keep(mod, args, kwargs, out, name):
        x = args[0]
        res = args[1] if len(args) > 1 else kwargs.get("residual")
        rmap = args[2] if len(args) > 2 else kwargs.get("residual_map", (1, 0))
        calls[name] = (x.detach(), None if res is None else res.detach(), res is x, rmap)

    hooks = [layer.register_forward_hook(functools.partial(keep, name=name), with_kwargs=True)
             for name, layer in _named_unit_layers(probe)]
    try:
        with torch.no_grad(), torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16, enabled=setting.bf16):
            probe(xb.contiguous(memory_format=setting.memory_format))
    finally:
        for hook in hooks:
            hook.remove()
    fns = {}
    for name, layer in _named_unit_layers(probe):
        x0, r0, identity, rmap = calls[name]
        for backend in backends:
            copy_ = copy.deepcopy(layer)
            copy_.backend = backend
            x = x0.clone().requires_grad_(True)
            r = x if identity else (None if r0 is None else r0.clone().requires_grad_(True))
            with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                                 enabled=setting.bf16):  # a gradient like the one it gets back
                grad = torch.randn_like(copy_(x0, residual=x0 if identity else r0, residual_map=rmap))

            def fwd_bwd(layer=copy_, x=x, r=r, grad=grad, rmap=rmap) -> None:
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=setting.bf16):
                    out = layer(x, residual=r, residual_map=rmap)
                out.backward(grad)
            fns[f"{name}|{backend}"] = fwd_bwd
    times = interleaved_times(fns, rounds=rounds, warmup=1, settle=0, device=xb.device)
    out: dict[str, dict[str, float]] = {}
    for key, t in times.items():
        name, backend = key.split("|")
        out.setdefault(name, {})[backend] = statistics.median(t)
    return out
