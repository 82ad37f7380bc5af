"""Training and evaluation, one readable loop.

Order of one step, as in nanoGPT: learning rate from a plain function of the step -> forward
(bf16 autocast on CUDA) -> loss (+ a method's regulariser) -> backward -> optimizer step -> the
method's post-step hook (e.g. re-apply pruning masks) -> ``zero_grad(set_to_none=True)``.
A non-finite loss stops the run with :class:`TrainingDiverged`, which the runner records as failed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bunit.layers import unit_layers
from harness.core.config import TrainConfig
from harness.core.data import ImageData
from harness.run.train_speed import TrainSetting, apply_setting, choose_setting, fused_sgd_supported, setting_record

if TYPE_CHECKING:
    from harness.run.parallel import DataParallelGroup

__all__ = ["TrainingDiverged", "TrainResult", "lr_at", "train_model", "evaluate", "seed_everything"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    epochs: int
    seconds: float
    final_loss: float
    history: list[dict] = field(default_factory=list)
    setting: dict | None = None  # how it ran: precision, memory format, unit backend (harness.run.train_speed)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_at(step: int, total_steps: int, *, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from base_lr/warmup_steps to base_lr, then cosine decay to zero."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageData, *, batch_size: int = 512) -> dict:
    """Top-1, top-5 (top-k with k = min(5, classes)) in percent, mean cross-entropy, and the number of images
    (``n_test``: one image is ``100 / n_test`` points of top-1), over ``data.eval_batches``.

    Args:
        model: the model, on the data's device.
        data: the dataset (:class:`harness.core.data.ImageData`).
        batch_size: images per forward.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    for xb, yb in data.eval_batches(batch_size):
        logits = model(xb).float()  # (B, classes)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hits = topk.eq(yb[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += yb.shape[0]
    model.train(was_training)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "test_loss": loss_sum / n, "n_test": n}


def train_model(model: nn.Module, data: ImageData, recipe: TrainConfig, *, epochs: int, lr: float | None = None,
                seed: int = 0, regularize: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                after_step: Callable[[nn.Module], None] | None = None, warmup: bool = True,
                progress: Callable[[dict], None] | None = None, parallel: DataParallelGroup | None = None,
                setting: TrainSetting | str | None = "auto") -> TrainResult:
    """Train ``model`` in place on ``data`` for ``epochs`` epochs.

    Args:
        model: already on the data's device.
        data: the dataset (:class:`harness.core.data.ImageData`); batches come from ``data.train_loader``.
        recipe: the suite's training recipe (batch size, momentum, weight decay, warm-up, ...).
        epochs: epochs to train (pre-training, sparse training or fine-tuning).
        lr: peak learning rate; ``recipe.lr`` when None.
        seed: seeds the batch order and augmentation.
        regularize: ``regularize(model, loss) -> loss`` adds a method's sparsity term.
        after_step: called after each optimizer step (keeps pruned weights at zero).
        warmup: use the recipe's linear warm-up (off for short fine-tunes).
        progress: called after every epoch with a dict (epoch, epochs, loss, seconds).
        parallel: data-parallel training under torchrun (:class:`harness.run.parallel.DataParallelGroup`): this process
            trains on its slice of every global batch and DDP all-reduces the gradients; None trains alone.
        setting: ``"auto"``: the fastest of the settings that compute the same training (precision no coarser than
            the recipe's, memory format, unit backend), measured on a few steps
            (:func:`harness.run.train_speed.choose_setting`; kept as the recipe says under torchrun, with
            ``compile``, or for runs too short to pay for measuring); a :class:`TrainSetting` to force one; None:
            the recipe as it is. Unit layers get their previous backends back afterwards.

    Returns:
        What was spent and the last epoch's mean loss.
    """
    if epochs <= 0:
        return TrainResult(0, 0.0, float("nan"))
    loader = data.train_loader(recipe.batch_size, seed=seed, augment=recipe.augment)
    if parallel is not None:
        loader = parallel.shard(loader)  # same global batches as one process; this rank keeps its slice
    base_lr = recipe.lr if lr is None else lr
    optimizer = sgd_optimizer(model, recipe, base_lr)
    schedule = _Schedule(base_lr, total_steps=epochs * len(loader),
                         warmup_steps=int(recipe.warmup_epochs * len(loader)) if warmup else 0)
    previous = [(m, m.backend) for _, m in unit_layers(model) if m.impl == "fused"]
    use_bf16, memory_format, setting_record = _take_setting(model, data, recipe, setting, parallel,
                                                            total_steps=schedule.total_steps)
    model.to(memory_format=memory_format)
    step_fn = model if parallel is None else parallel.wrap(model)  # DDP: gradients averaged over ranks
    step_fn = torch.compile(step_fn) if recipe.compile else step_fn

    model.train()
    start = time.perf_counter()
    history: list[dict] = []
    epoch_loss = float("nan")
    for epoch in range(epochs):
        loss_sum = _train_epoch(model, step_fn, loader, optimizer, schedule, recipe, device=data.device,
                                use_bf16=use_bf16, memory_format=memory_format, regularize=regularize,
                                after_step=after_step)
        if parallel is not None:
            loss_sum = parallel.mean(loss_sum)  # every rank sees the same loss, so all stop together on divergence
        epoch_loss = loss_sum.item() / len(loader)  # one device sync per epoch
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(f"loss became {epoch_loss} in epoch {epoch + 1} of {epochs}")
        record = {"epoch": epoch + 1, "epochs": epochs, "loss": epoch_loss, "seconds": time.perf_counter() - start}
        history.append(record)
        if progress is not None:
            progress(record)
    model.eval()
    for layer, backend in previous:
        layer.backend = backend
    return TrainResult(epochs, time.perf_counter() - start, epoch_loss, history, setting_record)


def sgd_optimizer(model: nn.Module, recipe: TrainConfig, base_lr: float) -> torch.optim.SGD:
    """SGD with the recipe's momentum; weight decay on weights, none on BatchNorm parameters and biases; fused where
    :func:`fused_sgd_supported` (the same update rule in one kernel)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=base_lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0,
                           fused=fused_sgd_supported(decay + no_decay) or None)


@dataclass
class _Schedule:
    """The learning rate of every step (:func:`lr_at`) and the count of steps taken."""

    base_lr: float
    total_steps: int
    warmup_steps: int
    step: int = 0

    def next_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, base_lr=self.base_lr, warmup_steps=self.warmup_steps)
        self.step += 1
        return lr


def _take_setting(model: nn.Module, data: ImageData, recipe: TrainConfig, setting: TrainSetting | str | None,
                  parallel: DataParallelGroup | None, *, total_steps: int) -> tuple[bool, torch.memory_format,
                                                                                     dict | None]:
    """Pick (``"auto"``: measure) and apply the training setting; ``(bf16, memory format, record for the row)``."""
    use_bf16 = recipe.bf16 and (data.device.type == "cuda" or recipe.bf16_cpu)  # CPU: oneDNN bf16 kernels
    record = None
    if setting == "auto" and (parallel is not None or recipe.compile):
        setting = None  # every rank must run alike; a compiled step is not what the candidates time
    if setting == "auto":
        xb, yb = data.calibration_batches(1, recipe.batch_size)[0]
        setting, record = choose_setting(model, xb, yb, bf16=use_bf16, channels_last=recipe.channels_last,
                                         total_steps=total_steps)
    channels_last = recipe.channels_last
    if isinstance(setting, TrainSetting):
        use_bf16, channels_last = setting.bf16, setting.channels_last
        apply_setting(model, setting)
        record = record or setting_record(setting, measured=False, step_ms=None)
    return use_bf16, torch.channels_last if channels_last else torch.contiguous_format, record


def _train_epoch(model: nn.Module, step_fn: Callable, loader: Iterable, optimizer: torch.optim.Optimizer,
                 schedule: _Schedule, recipe: TrainConfig, *, device: torch.device, use_bf16: bool,
                 memory_format: torch.memory_format, regularize: Callable | None,
                 after_step: Callable | None) -> torch.Tensor:
    """One pass over ``loader``: forward under autocast when bf16, the method's regulariser, SGD step, the
    method's hook after it. The summed loss, on the device (no sync)."""
    loss_sum = torch.zeros((), device=device)
    for xb, yb in loader:
        lr = schedule.next_lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        xb = xb.contiguous(memory_format=memory_format)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = step_fn(xb)  # (B, classes)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=recipe.label_smoothing)
        if regularize is not None:
            loss = regularize(model, loss)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
    return loss_sum
