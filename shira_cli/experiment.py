"""`shira experiment`: the paper's claims in miniature, on a small base model and the bundled demo tasks.

1. Single adapter: per task, SHiRA-WM, SHiRA-SNIP and PEFT LoRA at about equal trainable counts (LoRA's rank per
   layer makes r * (in + out) closest to SHiRA's nnz), plus SHiRA-WM on the "next top 1%" (non-overlapping).
2. Multi-adapter fusion (the paper's Table 4): the task adapters summed with equal weights. SHiRA-WM with
   overlapping masks (every task trains the same top-1% |W|) and non-overlapping masks (task k trains the top
   1% left after excluding tasks < k), fused by fuse_linear and applied by the Switcher; LoRA fused densely as
   W0 + Σ w_k·scaling_k·B_k A_k. Each task's accuracy after fusion and its drop from the single adapter.
3. Orthogonality: AWOM and AWOR for each pair of task adapters of each kind.

Trained adapters are cached (keyed by every setting that changes them), so `--reuse` reruns only evaluation.
The phases live in experiment_train (training and the cache) and experiment_eval (scoring and orthogonality).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .experiment_config import (  # noqa: F401 - re-exported: the experiment's public names
    DEFAULT_CACHE,
    FUSIONS,
    KINDS,
    LABELS,
    ExperimentConfig,
    ExperimentConfigError,
    progress_bar,
)


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - t0


def _task_data(tokenizer: Any, cfg: ExperimentConfig) -> dict[str, tuple[list[Any], list[Any]]]:
    """Per task, the generated training examples and the encoded held-out items (at most cfg.eval_limit)."""
    from shira_core.demo_data import generate
    from shira_core.training import encode_all, parse_jsonl
    from shira_core.training.data import examples_to_jsonl

    data = {}
    for task in cfg.tasks:
        train, held = generate(task, seed=cfg.seed, n_train=cfg.n_train)
        held_items = encode_all(tokenizer, parse_jsonl(examples_to_jsonl(held)), cfg.max_len)[: cfg.eval_limit]
        data[task] = (parse_jsonl(examples_to_jsonl(train)), held_items)
    return data


def run_experiment(model: nn.Module, tokenizer: Any, cfg: ExperimentConfig, *, model_label: str,
                   cache_dir: Path | None = DEFAULT_CACHE, reuse: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains, fuses, evaluates and measures; returns the results (see module docstring) as a JSON-ready dict.

    Args:
        model, tokenizer: the base model (left bit for bit as found) and its tokenizer.
        cfg: the experiment's options.
        model_label: names the base in the results and in the cache key.
        cache_dir: where trained adapters are cached (None: no cache).
        reuse: load adapters from the cache instead of training them, where present.
        progress: tqdm bars per phase.
        log: one line per finished job.

    Returns:
        {"setup", "base", "single", "fusion", "orthogonality", "seconds"}.
    """
    from shira_core.models import linear_weight_names
    from shira_core.switcher import Switcher

    from .experiment_eval import TaskScorer, orthogonality, score_base, score_fusions, score_single
    from .experiment_train import TrainedAdapters, train_all

    cfg.validate()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    names = linear_weight_names(model)
    cache = TrainedAdapters(cache_dir, reuse, model, model_label)
    data = _task_data(tokenizer, cfg)
    score = TaskScorer(model, tokenizer, {task: held for task, (_, held) in data.items()})
    shown = {"progress": progress, "log": log}
    with _timed(seconds, "base_eval"):
        base = score_base(score, cfg.tasks, **shown)
    with _timed(seconds, "train"):  # phase 1: train (or load) every adapter
        adapters, train_info = train_all(model, tokenizer, cfg, data, cache, names, **shown)
    with _timed(seconds, "single_eval"):  # phase 2: each adapter alone, on its own task
        switcher = Switcher(model, names)
        single = score_single(model, switcher, score, cfg.tasks, adapters, train_info, **shown)
    with _timed(seconds, "fusion_eval"):  # phase 3: all task adapters fused, every task scored on them
        fusion_rows, fused_info = score_fusions(model, switcher, score, cfg, adapters, single, **shown)
    with _timed(seconds, "orthogonality"):  # phase 4: every pair of task adapters of each kind
        ortho = orthogonality(cfg.tasks, adapters)
    seconds["total"] = time.perf_counter() - started

    return {
        "setup": {"model": model_label, **asdict(cfg), "tasks": list(cfg.tasks),
                  "train_examples": {t: len(data[t][0]) for t in cfg.tasks},
                  "eval_examples": {t: len(data[t][1]) for t in cfg.tasks},
                  "torch_threads": torch.get_num_threads(), "device": str(next(model.parameters()).device),
                  "lora_ranks": _rank_summary(model, names, cfg.density)},
        "base": base,
        "single": [{"task": t, "method": kind, "label": LABELS[kind], **train_info[(t, kind)], **single[(t, kind)]}
                   for t in cfg.tasks for kind in KINDS],
        "fusion": fusion_rows,
        "fused_changed_values": fused_info,
        "orthogonality": ortho,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _rank_summary(model: nn.Module, names: list[str], density: float) -> dict[str, int]:
    """LoRA rank per kind of layer (the name's last module), e.g. {"q_proj": 3, ...}."""
    from shira_core.baselines import lora_ranks

    out: dict[str, int] = {}
    for name, r in lora_ranks(model, names, density).items():
        out.setdefault(name.rsplit(".", 2)[-2], r)
    return out
