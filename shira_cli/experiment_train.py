"""The training phase of `shira experiment`: every (task, kind) adapter, trained or loaded from TrainedAdapters.

SHiRA-WM and SHiRA-SNIP go through train_adapter as `shira train` does; the non-overlapping ("next top 1%")
adapters give train_adapter masks that exclude the indices of earlier tasks, and the LoRA baselines come from
shira_core.baselines.train_lora. All of them follow train_adapter's recipe, so they see the same batches in
the same order.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shira_core.baselines import LoraFactors, train_lora
from shira_core.training import TrainConfig, masks_for, train_adapter
from shira_core.training.data import Example

from .experiment_config import KINDS, ExperimentConfig, progress_bar

# (task, kind) -> a SparseAdapter, or LoraFactors for kind "lora"
Adapters = dict[tuple[str, str], Any]


class TrainedAdapters:
    """The experiment's trained adapters on disk, one file per (task, kind, settings hash), so that `--reuse`
    reruns only evaluation and any changed setting trains afresh."""

    def __init__(self, folder: Path | None, reuse: bool, model: nn.Module, label: str) -> None:
        from shira_core.fingerprint import BaseFingerprint

        self.folder, self.reuse, self.label = folder, reuse, label
        self.fingerprint = BaseFingerprint.of(model)

    def path(self, task: str, kind: str, settings: dict[str, Any]) -> Path | None:
        if self.folder is None:
            return None
        key = hashlib.sha1(json.dumps({"model": self.label, **settings}, sort_keys=True).encode()).hexdigest()[:12]
        return self.folder / f"{task}-{kind}-{key}.safetensors"

    def load(self, path: Path | None, kind: str) -> Any:
        if path is None or not self.reuse or not path.is_file():
            return None
        if kind == "lora":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return LoraFactors.from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())  # noqa: SIM118
        from shira_core.io import load_adapter

        return load_adapter(path, base=self.fingerprint)

    def save(self, path: Path | None, adapter: Any) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(adapter, "factors"):
            from safetensors.torch import save_file

            tensors, meta = adapter.to_tensors()
            save_file(tensors, str(path), metadata=meta)
        else:
            from shira_core.io import save_adapter

            save_adapter(adapter, path)


def train_config(cfg: ExperimentConfig, mask: str, n_train: int, lr: float) -> TrainConfig:
    """The TrainConfig of one adapter: enough epochs of n_train examples to run cfg.steps steps."""
    epochs = -(-cfg.steps // -(-n_train // cfg.batch_size))
    return TrainConfig(method="sparse", mask=mask, density=cfg.density, epochs=epochs, lr=lr,
                       batch_size=cfg.batch_size, max_len=cfg.max_len, seed=cfg.seed,
                       calib_batches=cfg.calib_batches, eval_limit=cfg.eval_limit, max_steps=cfg.steps)


def _union(adapters: list[Any]) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for adapter in adapters:
        for d in adapter:
            out.setdefault(d.name, []).append(d.indices.long())
    return {name: torch.unique(torch.cat(parts)) for name, parts in out.items()}


def _train_one(model: nn.Module, tokenizer: Any, cfg: ExperimentConfig, train: Sequence[Example], tc: TrainConfig,
               task_index: int, kind: str, adapters: Adapters, names: list[str], progress: bool) -> Any:
    """Trains the `kind` adapter of task number `task_index`; `adapters` holds those of the earlier tasks."""
    name = f"{cfg.tasks[task_index]}-{kind}"
    torch.set_grad_enabled(True)
    if kind in ("wm", "snip"):
        return train_adapter(model, tokenizer, train, None, tc, name=name, progress=progress).adapter
    if kind == "wm-next":
        earlier = [adapters[(t, "wm-next")] for t in cfg.tasks[:task_index]]
        masks = masks_for(model, "wm", cfg.density, names, seed=cfg.seed, exclude=_union(earlier))
        return train_adapter(model, tokenizer, train, None, tc, name=name, progress=progress, masks=masks).adapter
    return train_lora(model, tokenizer, train, tc, names, name, alpha_ratio=cfg.lora_alpha_ratio, progress=progress)


def train_all(model: nn.Module, tokenizer: Any, cfg: ExperimentConfig, data: dict[str, tuple[list[Example], Any]],
              cache: TrainedAdapters, names: list[str], *, progress: bool,
              log: Callable[[str], None]) -> tuple[Adapters, dict[tuple[str, str], dict[str, Any]]]:
    """Trains (or loads from `cache`) every kind of adapter for every task.

    Returns:
        The adapters and, per (task, kind), what the results record of its training: trainable values, steps,
        lr, seconds and whether it came from the cache; the first task's "wm-next" is its "wm" (same_as).
    """
    adapters: Adapters = {}
    info: dict[tuple[str, str], dict[str, Any]] = {}
    jobs = [(k, task, kind) for k, task in enumerate(cfg.tasks) for kind in KINDS if not (kind == "wm-next" and k == 0)]
    with progress_bar(len(jobs), "train", progress) as bar:
        for k, task in enumerate(cfg.tasks):
            train = data[task][0]
            for kind in KINDS:
                if kind == "wm-next" and k == 0:
                    adapters[(task, kind)] = adapters[(task, "wm")]  # the first task's "next" 1% is the top 1%
                    info[(task, kind)] = {**info[(task, "wm")], "same_as": "wm"}
                    continue
                lr = (cfg.lora_lr or cfg.lr) if kind == "lora" else cfg.lr
                tc = train_config(cfg, "snip" if kind == "snip" else "wm", len(train), lr)
                settings = {"task": task, "kind": kind, "n_train": len(train), "train": asdict(tc)}
                if kind == "wm-next":
                    settings["after"] = list(cfg.tasks[:k])
                if kind == "lora":
                    settings["alpha_ratio"] = cfg.lora_alpha_ratio
                path = cache.path(task, kind, settings)
                t1 = time.perf_counter()
                adapter = cache.load(path, kind)
                cached = adapter is not None
                if adapter is None:
                    adapter = _train_one(model, tokenizer, cfg, train, tc, k, kind, adapters, names, progress)
                    cache.save(path, adapter)
                took = time.perf_counter() - t1
                adapters[(task, kind)] = adapter
                info[(task, kind)] = {"trainable": adapter.params if kind == "lora" else adapter.nnz,
                                      "steps": cfg.steps, "lr": lr, "seconds": round(took, 1), "cached": cached}
                log(f"{'loaded' if cached else 'trained'} {task}-{kind}: {info[(task, kind)]['trainable']:,} "
                    f"trainable values, {took:.1f} s")
                bar.update(1)
    return adapters, info
