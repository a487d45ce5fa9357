"""The SHiRA training loop used by `shira train`: mask, train (sparse params or gradient masks), evaluate, extract.

Seeded and deterministic for a given device: the mask seed, the data order of every epoch and torch's RNG
all derive from `TrainConfig.seed`. The model is left as it was found: sparse-parameter training writes W0
back at the end, gradient-mask training writes the saved base values back at the mask indices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..delta import SparseAdapter
from ..errors import ShiraError
from ..fingerprint import BaseFingerprint
from ..masks import MASKS
from ..models import linear_weight_names
from .calibration import masks_for
from .data import Encoded, Example, TrainingDataError, encode_all, iter_batches
from .evaluate import EvalResult, evaluate
from .grad_mask import attach_gradient_masks
from .sparse_params import attach_sparse_params

METHODS = ("sparse", "gradmask")


class TrainingConfigError(ShiraError):
    """A training option is out of range or unknown."""


@dataclass
class TrainConfig:
    """Options for train_adapter.

    Args:
        method: "sparse" (only nnz values are parameters) or "gradmask" (dense weights, masked gradients).
        mask: struct, rand, wm, grad or snip.
        density: fraction of each target weight to train.
        epochs, lr, batch_size, max_len: the usual; AdamW without weight decay.
        seed: seeds the mask, the data order and torch.
        calib_batches: batches of training data for the grad and snip masks.
        eval_limit: evaluate on at most this many eval examples (0: all).
        eval_before: also evaluate the untouched base first (epoch 0).
        max_steps: stop after this many optimizer steps in total (None: all epochs).
        grad_clip: max gradient norm (0: off).
        targets: weight names to adapt; default every nn.Linear except lm_head.
    """

    method: str = "sparse"
    mask: str = "wm"
    density: float = 0.01
    epochs: int = 1
    lr: float = 5e-4
    batch_size: int = 8
    max_len: int = 256
    seed: int = 0
    calib_batches: int = 8
    eval_limit: int = 64
    eval_before: bool = False
    max_steps: int | None = None
    grad_clip: float = 1.0
    targets: list[str] | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise TrainingConfigError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.mask not in MASKS:
            raise TrainingConfigError(f"unknown mask {self.mask!r}; use one of {', '.join(MASKS)}")
        if not 0 < self.density <= 1:
            raise TrainingConfigError(f"density must be in (0, 1], got {self.density}")
        for key in ("epochs", "batch_size", "calib_batches"):
            if getattr(self, key) < 1:
                raise TrainingConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise TrainingConfigError(f"lr must be positive, got {self.lr}")


@dataclass
class EpochStats:
    epoch: int
    train_loss: float | None
    eval: EvalResult | None
    tokens_per_s: float
    seconds: float


@dataclass
class TrainResult:
    adapter: SparseAdapter
    history: list[EpochStats] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True, leave=True)


def train_epochs(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    items: Sequence[Encoded],
    cfg: TrainConfig,
    *,
    pad: int,
    device: torch.device,
    call: Callable[..., Any] | None = None,
    progress: bool = True,
    after_epoch: Callable[[int, float, int, float], None] | None = None,
) -> int:
    """The recipe every trainer here follows, so that they all see the same batches in the same order: AdamW
    without weight decay, epochs of batches shuffled with seed cfg.seed + epoch, gradients clipped to
    cfg.grad_clip, and a stop after cfg.max_steps steps in all.

    Args:
        model: set to train mode at the start of every epoch.
        params: the tensors the optimizer updates.
        items: the encoded training examples.
        cfg: epochs, batch_size, seed, lr, grad_clip and max_steps apply.
        pad, device: the batches' pad token id and device.
        call: computes the loss from a batch (default: model; a PEFT wrapper of it for LoRA).
        progress: show a tqdm bar.
        after_epoch: called after every epoch that ran steps, with (epoch, mean train loss, tokens, seconds).

    Returns:
        The number of optimizer steps run.
    """
    call = call or model
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total = -(-len(items) // cfg.batch_size) * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    step = 0
    bar = _progress(total, progress)
    try:
        for epoch in range(1, cfg.epochs + 1):
            if step >= total:
                break
            model.train()  # a PEFT wrapper shares these modules, LoRA layers included
            t0, tokens, loss_sum, n = time.perf_counter(), 0, 0.0, 0
            for batch in iter_batches(items, cfg.batch_size, cfg.seed + epoch, pad, device):
                if step >= total:
                    break
                loss = call(**batch, use_cache=False).loss
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step, n = step + 1, n + 1
                loss_sum += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4f}", tok_s=f"{rate:.0f}")
                bar.update(1)
            if after_epoch is not None:
                after_epoch(epoch, loss_sum / max(n, 1), tokens, time.perf_counter() - t0)
    finally:
        bar.close()
    return step


def train_adapter(
    model: nn.Module,
    tokenizer: Any,
    train: Sequence[Example],
    eval_set: Sequence[Example] | None = None,
    config: TrainConfig | None = None,
    *,
    name: str = "adapter",
    description: str = "",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Trains one SHiRA adapter and returns it with per-epoch stats; the model ends as it started.

    Args:
        model: a causal LM (HF-style: model(input_ids, attention_mask, labels).loss and .generate()).
        tokenizer: its tokenizer (chat template used when it has one).
        train: training examples.
        eval_set: held-out examples, evaluated after every epoch.
        config: TrainConfig; default values when None.
        name, description: adapter metadata.
        progress: show a tqdm bar (loss, tokens/s, ETA).
        log: called with one line per epoch summary.
        masks: weight name -> sorted flat indices to train, instead of choosing them with config.mask (which is
            then only recorded), e.g. masks_for(..., exclude=...) for masks that avoid other adapters' indices.

    Returns:
        TrainResult with the SparseAdapter (base fingerprint of the untrained base) and the history.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    say = log or (lambda _line: None)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    names = list(masks) if masks is not None else list(cfg.targets or linear_weight_names(model))
    if not names:
        raise TrainingConfigError("the model has no target weights (no nn.Linear besides lm_head)")
    fingerprint = BaseFingerprint.of(model).to_dict(names)
    train_items: list[Encoded] = encode_all(tokenizer, train, cfg.max_len)
    eval_items = encode_all(tokenizer, eval_set, cfg.max_len) if eval_set else []
    if not train_items:
        raise TrainingDataError("no training examples")

    def batches(epoch: int):
        return iter_batches(train_items, cfg.batch_size, cfg.seed + epoch, pad, device)

    if masks is None:
        masks = masks_for(model, cfg.mask, cfg.density, names, seed=cfg.seed,
                          calibration=batches(-1), num_batches=cfg.calib_batches)
    history: list[EpochStats] = []
    if cfg.eval_before and eval_items:
        result = evaluate(model, tokenizer, eval_items, limit=cfg.eval_limit)
        history.append(EpochStats(0, None, result, 0.0, 0.0))
        say(f"epoch 0 (base): eval loss {result.loss:.4f}, accuracy {result.accuracy:.3f} on {result.examples}")

    if cfg.method == "sparse":
        handle: Any = attach_sparse_params(model, masks)
        params = list(handle.parameters())
    else:
        handle = attach_gradient_masks(model, masks)
        params = handle.parameters()

    def epoch_done(epoch: int, train_loss: float, tokens: int, seconds: float) -> None:
        result = evaluate(model, tokenizer, eval_items, limit=cfg.eval_limit) if eval_items else None
        stats = EpochStats(epoch, train_loss, result, tokens / max(seconds, 1e-9), seconds)
        history.append(stats)
        line = f"epoch {epoch}: train loss {stats.train_loss:.4f}, {stats.tokens_per_s:.0f} tok/s"
        if result is not None:
            line += f", eval loss {result.loss:.4f}, accuracy {result.accuracy:.3f} on {result.examples}"
        say(line)

    started = time.perf_counter()
    try:
        step = train_epochs(model, params, train_items, cfg, pad=pad, device=device, progress=progress,
                            after_epoch=epoch_done)
        meta = {"base_fingerprint": fingerprint, "description": description,
                "extra": {"density": f"{cfg.density:g}", "method": cfg.method, "epochs": str(cfg.epochs),
                          "lr": f"{cfg.lr:g}", "seed": str(cfg.seed), "steps": str(step)}}
        adapter = handle.extract(name, cfg.mask, **meta)
    finally:
        if cfg.method == "gradmask":
            handle.restore_base()
        handle.remove()
        model.eval()
    return TrainResult(adapter, history, step, time.perf_counter() - started)
