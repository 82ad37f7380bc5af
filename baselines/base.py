"""The method protocol and registry: every compression method is one class, registered by name.

A method turns a backbone into its compressed form and owns its pipeline. The harness asks the method
(:meth:`Method.pipeline`) where it starts — from the trained dense checkpoint of its (dataset, backbone,
seed, recipe), shared by every method, or from a freshly initialised backbone — and how many epochs the
harness trains the model from scratch after ``apply``. ``apply(model, target, ctx)`` receives that model, the
method's own target knob, and a :class:`MethodContext` that the harness fills in. It returns the model to be
fine-tuned/evaluated and writes what it achieved into ``ctx.record``. How a trained model is prepared for
inference (:meth:`Method.prepare_for_inference`) and rebuilt from its stored architecture
(:meth:`Method.rebuild`) are the method's answers too; the harness never tests a family name.

Who trains when (one rule for every method):

- ``ctx.sparse_epochs`` is a budget of sparsity-inducing training *before* pruning. A method that uses it
  (``uses_sparse_training``) spends it itself, inside ``apply``, through
  ``ctx.run_finetune(model, ctx.sparse_epochs, regularize=self.regularize)``.
- ``ctx.finetune_epochs`` is the whole fine-tune budget *after* pruning begins. The harness always runs the
  final fine-tune after ``apply`` returns, for ``ctx.final_finetune_epochs()`` epochs. In the "oneshot" schedule
  that is all of ``finetune_epochs``. In the "iterative" schedule the method prunes in ``ctx.steps`` steps and
  calls ``ctx.run_finetune(model, ctx.finetune_epochs // ctx.steps)`` after every step but the last; the
  harness's final share is what is left (at least one step's share).
- The method records in ``ctx.record``: ``epochs_sparse`` (spent inside ``apply``), ``epochs_finetune`` (the
  run's total fine-tune epochs: its own between steps plus the harness's final share) and
  ``epochs_finetune_final`` (the harness's share, which ``ctx.final_finetune_epochs()`` returns; a method that
  does not record it leaves all of ``finetune_epochs`` to the harness). :func:`finetune_split` computes the split.
- Every training loop the harness runs for a method (the ``ctx.finetune`` callback and the final fine-tune)
  calls ``method.after_optimizer_step(model)`` right after each ``optimizer.step()``; unstructured methods use
  it to keep pruned weights at exactly zero. ``regularize`` is applied only where the method passes it to
  ``ctx.run_finetune``; the harness never adds it on its own.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = [
    "FAMILIES",
    "EXAMPLE_TARGETS",
    "Method",
    "MethodContext",
    "register_method",
    "get_method",
    "list_methods",
    "method_info",
    "finetune_split",
    "Pipeline",
    "START_POINTS",
    "SCHEDULES",
]

SCHEDULES = ("oneshot", "iterative", "progressive")
"""``oneshot``: one scoring pass, then prune; ``iterative``: ``steps`` prune steps with fine-tuning between them;
``progressive``: re-score after every small prune step until a measured target is reached (no fine-tuning
between steps). Methods that support only some say so in ``validate_target``/``apply``."""

START_POINTS = ("dense", "scratch")

FAMILIES = ("dense", "bunit", "unstructured", "structured")
EXAMPLE_TARGETS = {"dense": None, "bunit": "paper", "unstructured": 0.5, "structured": 0.3}
"""A small target of each family's usual knob (sparsity, channel ratio, unit plan) that contract tests apply."""

@dataclass(frozen=True)
class Pipeline:
    """Where a method starts and what the harness trains (the method's answer to :meth:`Method.pipeline`).

    Attributes:
        start: ``dense`` (a copy of the trained dense checkpoint, shared by every method of the same key) or
            ``scratch`` (a freshly initialised backbone, seeded by the experiment seed).
        scratch_epochs: epochs the harness trains the model returned by ``apply`` with the full recipe (warm-up,
            peak learning rate) before the final fine-tune; 0 for methods that start from the dense checkpoint.
    """

    start: str = "dense"
    scratch_epochs: int = 0

    def __post_init__(self) -> None:
        if self.start not in START_POINTS:
            raise ValueError(f"start: {self.start!r} not allowed; allowed: {', '.join(START_POINTS)}")
        if self.scratch_epochs < 0:
            raise ValueError(f"scratch_epochs: must be >= 0; got {self.scratch_epochs}")


# fine-tune callback: (model, epochs, regularize) -> model; regularize(model, loss) -> loss is optional
FinetuneFn = Callable[..., nn.Module]


@dataclass
class MethodContext:
    """What the harness hands a method.

    Attributes:
        example_inputs: one batch of inputs on ``device`` (shape and dtype of real data).
        calib_batches: a few (inputs, labels) batches on ``device`` for data-driven criteria.
        finetune: ``finetune(model, epochs, regularize=None) -> model`` trains with the harness trainer, in place
            (it returns the same module), calling the method's ``after_optimizer_step`` after every optimizer step
            and adding ``regularize(model, loss) -> loss`` to the batch loss before backward when given.
        device: the torch device the model lives on.
        schedule: "oneshot" or "iterative".
        steps: prune steps for the iterative schedule.
        finetune_epochs: fine-tune epochs budgeted after pruning (spread over steps when iterative).
        sparse_epochs: epochs of sparsity-inducing training before pruning (methods that use it).
        sparse_lambda: strength of that training's sparsity term; None keeps the method's own default.
        backbone: backbone name; ``shortcut`` its CIFAR-ResNet shortcut variant (or None).
        num_classes: classes of the dataset.
        seed: the experiment seed.
        record: what the method achieved and spent; copied into the row.
    """

    example_inputs: torch.Tensor
    calib_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    finetune: FinetuneFn | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    schedule: str = "oneshot"
    steps: int = 1
    finetune_epochs: int = 0
    sparse_epochs: int = 0
    sparse_lambda: float | None = None
    backbone: str = ""
    shortcut: str | None = None
    num_classes: int = 10
    seed: int = 0
    record: dict[str, Any] = field(default_factory=dict)

    def run_finetune(self, model: nn.Module, epochs: int, regularize=None) -> nn.Module:
        """Fine-tune through the harness when it provided a callback and epochs > 0."""
        if self.finetune is None or epochs <= 0:
            return model
        return self.finetune(model, epochs, regularize=regularize)

    def final_finetune_epochs(self) -> int:
        """Epochs the harness fine-tunes after ``apply`` returns (the method's ``epochs_finetune_final``)."""
        return int(self.record.get("epochs_finetune_final", self.finetune_epochs))


def finetune_split(ctx: MethodContext) -> tuple[int, int]:
    """How the fine-tune budget splits under the schedule rule in this module's docstring.

    Args:
        ctx: the method context (``schedule``, ``steps``, ``finetune_epochs``).

    Returns:
        ``(epochs_between_steps, epochs_final)``: the method fine-tunes ``epochs_between_steps`` after each prune
        step but the last; the harness fine-tunes ``epochs_final`` after ``apply``.
    """
    if ctx.schedule not in SCHEDULES:
        raise ValueError(f"schedule: {ctx.schedule!r} not allowed; allowed: {', '.join(SCHEDULES)}")
    if ctx.steps < 1:
        raise ValueError(f"steps: {ctx.steps!r} not allowed; allowed: an integer >= 1")
    if ctx.schedule != "iterative" or ctx.steps == 1:
        return 0, ctx.finetune_epochs
    per_step = ctx.finetune_epochs // ctx.steps
    return per_step, ctx.finetune_epochs - per_step * (ctx.steps - 1)


class Method:
    """Base class. Subclasses set ``family``, answer :meth:`pipeline` when they do not start from the dense
    checkpoint, and implement :meth:`apply`.

    Hooks:
        regularize(model, loss) -> loss: a term added during training (e.g. an L1 on BN scales); applied only in
            the training the method runs through ``ctx.run_finetune(..., regularize=self.regularize)``.
        after_optimizer_step(model): called by every training loop for this method right after each optimizer
            step (e.g. to re-apply pruning masks so that pruned weights stay exactly zero).
        validate_target(target): raise ``ValueError`` naming the allowed values for a bad knob.
        architecture(model) -> dict | None: a JSON-able description from which the harness can
            rebuild the compressed model (widths / unit plan); None means "same as the backbone".
        rebuild(backbone, architecture) -> nn.Module: the inverse of ``architecture`` on a fresh backbone.
        prepare_for_inference(model, example_inputs) -> dict: make the trained model ready to be timed (e.g. pick
            execution backends); returns row columns that say what was chosen. Counting happens before it.
    """

    name: str = ""
    family: str = "dense"
    schedules: tuple[str, ...] = ("oneshot",)
    """The schedules this method supports (a subset of :data:`SCHEDULES`); the suite is checked against it."""
    uses_sparse_training: bool = False
    example_target: Any = None
    """A small, valid target the contract tests (``tests/test_contracts.py``) apply; None: the family's own
    (:data:`EXAMPLE_TARGETS`)."""

    def contract_target(self) -> Any:
        """The target the contract tests apply: ``example_target``, else the family's entry of
        :data:`EXAMPLE_TARGETS`."""
        return self.example_target if self.example_target is not None else EXAMPLE_TARGETS.get(self.family)

    def pipeline(self, recipe: Any) -> Pipeline:
        """Where this method starts and how many epochs the harness trains from scratch, given the recipe.

        Args:
            recipe: the suite's training recipe (``epochs``, ``finetune_epochs``, ...).
        """
        return Pipeline(start="dense", scratch_epochs=0)

    def apply(self, model: nn.Module, target: Any, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError(f"method {self.name!r} does not implement apply()")

    def regularize(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def validate_target(self, target: Any) -> None:
        return None

    def after_optimizer_step(self, model: nn.Module) -> None:
        return None

    def architecture(self, model: nn.Module) -> dict | None:
        return None

    def rebuild(self, backbone: nn.Module, architecture: dict | None) -> nn.Module:
        return backbone

    def prepare_for_inference(self, model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
        return {}


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``; raises on duplicates."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered (by {_METHODS.get(name, cls).__module__})")
        if cls.family not in FAMILIES:
            raise ValueError(f"family: {cls.family!r} not allowed for method {name!r}; allowed: {', '.join(FAMILIES)}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods(pattern: str = "*", *, family: str | None = None) -> list[str]:
    """Registered method names matching a wildcard pattern, optionally of one family."""
    _load_plugins()
    return sorted(n for n, c in _METHODS.items()
                  if fnmatch.fnmatch(n, pattern) and (family is None or c.family == family))


def method_info(name: str) -> type[Method]:
    _load_plugins()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown {name!r}; allowed: {', '.join(list_methods())}") from None


def get_method(name: str) -> Method:
    """A fresh instance of the method registered as ``name``."""
    return method_info(name)()


_PLUGINS_LOADED = False


def _load_plugins() -> None:
    """Import third-party methods announced through the ``bunitbench.methods`` entry-point group."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="bunitbench.methods"):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not take the registry down
            warnings.warn(f"plugin {ep.name!r} failed to load: {err}", RuntimeWarning, stacklevel=2)
