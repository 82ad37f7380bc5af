"""One experiment from start to row: the pipeline every executor runs, and the one row builder.

The method owns its pipeline (:meth:`baselines.Method.pipeline`): the run starts from a copy of the trained
dense checkpoint or from a freshly initialised backbone; ``apply`` compresses (and may train, for sparse
training or iterative schedules); the harness trains ``scratch_epochs`` with the full recipe when the method
asks for it, then fine-tunes for the method's final share (:meth:`baselines.MethodContext.final_finetune_epochs`).
The model is evaluated and counted in the form it was trained, kept in the store (``models/<key>.pt``), then
prepared for inference by the method (:meth:`baselines.Method.prepare_for_inference`) and timed on its own.
No step here asks which family a method belongs to.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Any

import torch.nn as nn

from baselines import Method, MethodContext, get_method
from baselines.counting import count_macs, count_params, weight_sparsity
from harness import measure
from harness.core.artefacts import save_model
from harness.core.config import Experiment
from harness.core.provenance import now, one_line, provenance
from harness.run.context import RunContext
from harness.core.schema import check_ok_row
from harness.run.train import evaluate, seed_everything

__all__ = ["run_experiment", "base_row", "failed_row", "method_context"]


def base_row(exp: Experiment, *, image_size: int | None, executor: str = "local") -> dict[str, Any]:
    """The columns every row has, whatever happened to the run: its key, its config and provenance."""
    return {"key": exp.key, "suite": exp.suite, "dataset": exp.dataset, "image_size": image_size,
            "backbone": exp.backbone, "shortcut": exp.shortcut, "method": exp.method,
            "family": get_method(exp.method).family, "target": exp.target, "schedule": exp.schedule,
            "steps": exp.steps, "seed": exp.seed, "config_hash": exp.config_hash, "config": exp.to_dict(),
            "executor": executor, **provenance()}


def failed_row(exp: Experiment, reason: str, *, executor: str, image_size: int | None) -> dict[str, Any]:
    """The row of a run that could not finish (also for a worker that died before it could write one)."""
    return {**base_row(exp, image_size=image_size, executor=executor), "status": "failed", "reason": reason[:500],
            "finished_at": now()}


def method_context(method: Method, exp: Experiment, ctx: RunContext) -> MethodContext:
    """What the harness hands ``method``: example and calibration batches, the fine-tune callback, the schedule."""
    after_step = method.after_optimizer_step
    calls = {"n": 0}

    def finetune(model: nn.Module, epochs: int, regularize=None) -> nn.Module:
        calls["n"] += 1
        ctx.train(model, exp, epochs, phase="sparse train" if regularize else "fine-tune", lr=exp.train.finetune_lr,
                  seed_offset=100 + calls["n"], warmup=False, regularize=regularize, after_step=after_step)
        return model

    return MethodContext(example_inputs=ctx.data.example_inputs(8),
                         calib_batches=ctx.data.calibration_batches(4, exp.train.batch_size),
                         finetune=finetune, device=ctx.device, schedule=exp.schedule, steps=exp.steps,
                         finetune_epochs=exp.train.finetune_epochs, sparse_epochs=exp.train.sparse_epochs,
                         sparse_lambda=exp.train.sparse_lambda, backbone=exp.backbone, shortcut=exp.shortcut,
                         num_classes=ctx.data.num_classes, seed=exp.seed)


def run_experiment(exp: Experiment, ctx: RunContext, *, executor: str = "local") -> dict[str, Any]:
    """Run one experiment and return its row (status ``ok``, or ``failed`` with a one-line reason)."""
    t0 = time.perf_counter()
    row = {**base_row(exp, image_size=ctx.data.image_size, executor=executor), "device": str(ctx.device),
           "data_loader": getattr(ctx.data, "data_loader", None), "started_at": now()}
    try:
        row.update(_train_and_measure(exp, get_method(exp.method), ctx))
        row["status"], row["reason"] = "ok", None
        check_ok_row(row)
    except Exception as err:  # a failed run is a row, not a crash
        row["status"], row["reason"] = "failed", one_line(err)
    row["finished_at"] = now()
    row["run_seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _train(exp: Experiment, method: Method, ctx: RunContext) -> tuple[nn.Module, MethodContext, dict[str, Any]]:
    """Start, apply, train: the trained model, the method context (with its record) and the spend columns."""
    recipe = exp.train
    pipeline = method.pipeline(recipe)
    mctx = method_context(method, exp, ctx)
    ctx.train_settings.clear()  # what this run's training phases ran with, for the row
    if pipeline.start == "dense":
        dense, pretrain_seconds, _ = ctx.dense_model(exp)
        model, pretrain_epochs = copy.deepcopy(dense), recipe.epochs
    else:
        seed_everything(exp.seed)
        model, pretrain_seconds, pretrain_epochs = ctx.new_backbone(exp), 0.0, pipeline.scratch_epochs
    t = time.perf_counter()
    model = method.apply(model, exp.target, mctx).to(ctx.device)
    if pipeline.scratch_epochs:
        ctx.train(model, exp, pipeline.scratch_epochs, phase=f"{exp.method} from scratch")
    final = mctx.final_finetune_epochs()  # the harness's share under the rule in baselines/base.py
    if final:
        ctx.train(model, exp, final, phase="fine-tune", lr=recipe.finetune_lr, seed_offset=99, warmup=False,
                  after_step=method.after_optimizer_step)
    spend = {"train_seconds": round(time.perf_counter() - t, 3), "pretrain_seconds": round(pretrain_seconds, 3),
             "epochs_pretrain": pretrain_epochs, "epochs_sparse": int(mctx.record.pop("epochs_sparse", 0)),
             "epochs_finetune": int(mctx.record.pop("epochs_finetune", final))}
    mctx.record.pop("epochs_finetune_final", None)
    spend["epochs_total"] = spend["epochs_pretrain"] + spend["epochs_sparse"] + spend["epochs_finetune"]
    spend["train_settings"] = list(ctx.train_settings) or None
    return model.eval(), mctx, spend


def _train_and_measure(exp: Experiment, method: Method, ctx: RunContext) -> dict[str, Any]:
    method.validate_target(exp.target)
    model, mctx, spend = _train(exp, method, ctx)
    metrics = evaluate(model, ctx.data)
    ctx.reporter.evaluated(metrics["top1"])
    example = ctx.data.example_inputs(max(exp.measure.batch_sizes))
    shape = tuple(example.shape[1:])
    dense = ctx.new_backbone(exp)  # the reduction columns compare with the dense backbone's counts
    row: dict[str, Any] = {**metrics, **measure.measure_size(model, shape), **spend}
    record = dict(mctx.record)
    if "sparsity" in record:
        row["sparsity"] = record.pop("sparsity")
    else:
        zeros, total = weight_sparsity(model)
        row["sparsity"] = zeros / total if total else 0.0
    row["channel_ratio"] = record.pop("channel_ratio", None)
    row["macs_reduction"] = 1.0 - row["macs"] / count_macs(dense, shape)
    row["params_reduction"] = 1.0 - row["params"] / count_params(dense)
    row["architecture"] = method.architecture(model)
    extras = record.pop("achieved", None)
    if isinstance(extras, dict):
        record = {**extras, **record}
    row["achieved"] = json.loads(json.dumps(record, default=str)) if record else None
    row["model_path"] = _keep(exp, method, model, row, ctx)
    row.update(dict.fromkeys(measure.LATENCY_COLUMNS))
    if exp.measure.latency:
        row["inference"] = method.prepare_for_inference(model, example) or None
        row.update(measure.measure_speed(model, example, batch_sizes=exp.measure.batch_sizes,
                                         repeats=exp.measure.repeats, warmup=exp.measure.warmup,
                                         memory_format=exp.measure.memory_format))
    return row


def _keep(exp: Experiment, method: Method, model: nn.Module, row: dict[str, Any], ctx: RunContext) -> str | None:
    """Write the trained model into the store (``keep_models``); its path relative to the store, or None."""
    if not ctx.keep_models or not ctx.is_writer:
        return None
    meta = {"method": exp.method, "family": method.family, "architecture": row["architecture"],
            "dataset": exp.dataset, "backbone": exp.backbone, "shortcut": exp.shortcut, "seed": exp.seed,
            "target": exp.target, "num_classes": ctx.data.num_classes, "in_channels": ctx.data.in_channels,
            "image_size": ctx.data.image_size, "git_rev": row.get("git_rev"), "config_hash": exp.config_hash}
    return save_model(ctx.results_dir, exp.key, model, meta=meta)
