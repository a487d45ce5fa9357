"""`shira experiment`: the paper's claims in miniature, on a small base model and the bundled demo tasks.

1. Single adapter: per task, SHiRA-WM, SHiRA-SNIP and PEFT LoRA at about equal trainable counts (LoRA's rank per
   layer makes r * (in + out) closest to SHiRA's nnz), plus SHiRA-WM on the "next top 1%" (non-overlapping).
2. Multi-adapter fusion (the paper's Table 4): the task adapters summed with equal weights. SHiRA-WM with
   overlapping masks (every task trains the same top-1% |W|) and non-overlapping masks (task k trains the top
   1% left after excluding tasks < k), fused by fuse_linear and applied by the Switcher; LoRA fused densely as
   W0 + Σ w_k·scaling_k·B_k A_k. Each task's accuracy after fusion and its drop from the single adapter.
3. Orthogonality: AWOM and AWOR for each pair of task adapters of each kind.

Trained adapters are cached (keyed by every setting that changes them), so `--reuse` reruns only evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shira_core.errors import ShiraError

KINDS = ("wm", "snip", "wm-next", "lora")
LABELS = {"base": "base model", "wm": "SHiRA-WM", "snip": "SHiRA-SNIP", "wm-next": "SHiRA-WM, next top 1%",
          "lora": "PEFT LoRA"}
FUSIONS = {"overlap": "SHiRA-WM, overlapping masks", "nonoverlap": "SHiRA-WM, non-overlapping masks",
           "lora": "PEFT LoRA"}
DEFAULT_CACHE = Path("data/experiment-cache")  # /data/ is git-ignored; adapters do not belong in docs/


class ExperimentConfigError(ShiraError):
    """An experiment option is out of range or names an unknown task."""


@dataclass
class ExperimentConfig:
    """Options of `shira experiment`; every one of them is part of the reproducing command."""

    tasks: tuple[str, ...] = ("sentiment", "kv2json")
    steps: int = 16
    batch_size: int = 4
    lr: float = 3e-3
    lora_lr: float | None = None  # None: the same as lr
    density: float = 0.01
    max_len: int = 96
    eval_limit: int = 24
    n_train: int | None = None  # None: each task's default
    seed: int = 0
    calib_batches: int = 4
    fusion_weight: float = 1.0
    lora_alpha_ratio: float = 2.0

    def validate(self) -> None:
        from shira_core.demo_data import TASKS

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ExperimentConfigError(f"unknown task(s) {unknown}; use two or more of {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks) or len(self.tasks) < 2:
            raise ExperimentConfigError(f"fusion needs two or more distinct tasks, got {list(self.tasks)}")
        for key in ("steps", "batch_size", "eval_limit", "calib_batches"):
            if getattr(self, key) < 1:
                raise ExperimentConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.density <= 1 / len(self.tasks):
            raise ExperimentConfigError(f"density must be in (0, 1/{len(self.tasks)}] so every task gets its own "
                                        f"non-overlapping mask, got {self.density}")
        if not (self.lr > 0 and (self.lora_lr is None or self.lora_lr > 0)):
            raise ExperimentConfigError(f"learning rates must be positive, got lr={self.lr}, lora_lr={self.lora_lr}")

    def command(self, out: Path) -> str:
        """The `shira experiment` command line that reproduces this configuration."""
        parts = ["shira experiment", f"--tasks {','.join(self.tasks)}", f"--steps {self.steps}",
                 f"--batch-size {self.batch_size}", f"--lr {self.lr:g}", f"--density {self.density:g}",
                 f"--max-len {self.max_len}", f"--eval-limit {self.eval_limit}", f"--seed {self.seed}",
                 f"--calib-batches {self.calib_batches}", f"--fusion-weight {self.fusion_weight:g}"]
        if self.lora_lr is not None:
            parts.append(f"--lora-lr {self.lora_lr:g}")
        if self.n_train is not None:
            parts.append(f"--n-train {self.n_train}")
        return " ".join(parts + [f"--out {out}"])


def _train_config(cfg: ExperimentConfig, mask: str, n_train: int, lr: float) -> Any:
    from shira_core.training import TrainConfig

    epochs = -(-cfg.steps // -(-n_train // cfg.batch_size))  # enough epochs to run cfg.steps steps
    return TrainConfig(method="sparse", mask=mask, density=cfg.density, epochs=epochs, lr=lr,
                       batch_size=cfg.batch_size, max_len=cfg.max_len, seed=cfg.seed,
                       calib_batches=cfg.calib_batches, eval_limit=cfg.eval_limit, max_steps=cfg.steps)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="job", dynamic_ncols=True)


@contextmanager
def _applied(switcher: Any, adapter: Any) -> Iterator[None]:
    switcher.apply([(adapter, 1.0)])
    try:
        yield
    finally:
        switcher.revert()


def _union(adapters: list[Any]) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for adapter in adapters:
        for d in adapter:
            out.setdefault(d.name, []).append(d.indices.long())
    return {name: torch.unique(torch.cat(parts)) for name, parts in out.items()}


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
    from shira_core.analysis import awom_awor
    from shira_core.demo_data import generate
    from shira_core.fusion import fuse_linear
    from shira_core.models import linear_weight_names
    from shira_core.switcher import Switcher
    from shira_core.training import encode_all, masks_for, parse_jsonl, train_adapter
    from shira_core.training.data import examples_to_jsonl
    from shira_core.training.evaluate import generate_completions

    from .experiment_train import AdapterCache, dense_deltas_applied, dense_orthogonality, train_lora, train_masked

    cfg.validate()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    names = linear_weight_names(model)
    cache = AdapterCache(cache_dir, reuse, model, model_label)
    data = {}
    for task in cfg.tasks:
        train, held = generate(task, seed=cfg.seed, n_train=cfg.n_train)
        held_items = encode_all(tokenizer, parse_jsonl(examples_to_jsonl(held)), cfg.max_len)[: cfg.eval_limit]
        data[task] = (parse_jsonl(examples_to_jsonl(train)), held_items)

    def score(task: str) -> dict[str, Any]:
        # evaluate()'s exact match without its loss pass, which would double the cost of every evaluation
        items = data[task][1]
        model.eval()
        texts = generate_completions(model, tokenizer, items, batch_size=16)
        hits = sum(t.strip() == e.completion.strip() for t, e in zip(texts, items, strict=True))
        return {"accuracy": hits / len(items), "examples": len(items),
                "samples": [[e.completion, t] for e, t in zip(items[:3], texts, strict=False)]}

    t0 = time.perf_counter()
    base = {}
    with _bar(len(cfg.tasks), "base eval", progress) as bar:
        for task in cfg.tasks:
            base[task] = score(task)
            log(f"base model on {task}: accuracy {base[task]['accuracy']:.3f}")
            bar.update(1)
    seconds["base_eval"] = time.perf_counter() - t0

    # Phase 1: train (or load) every adapter.
    t0 = time.perf_counter()
    adapters: dict[tuple[str, str], Any] = {}
    train_info: dict[tuple[str, str], dict[str, Any]] = {}
    jobs = [(k, task, kind) for k, task in enumerate(cfg.tasks) for kind in KINDS if not (kind == "wm-next" and k == 0)]
    with _bar(len(jobs), "train", progress) as bar:
        for k, task in enumerate(cfg.tasks):
            train = data[task][0]
            for kind in KINDS:
                if kind == "wm-next" and k == 0:
                    adapters[(task, kind)] = adapters[(task, "wm")]  # the first task's "next" 1% is the top 1%
                    train_info[(task, kind)] = {**train_info[(task, "wm")], "same_as": "wm"}
                    continue
                lr = (cfg.lora_lr or cfg.lr) if kind == "lora" else cfg.lr
                tc = _train_config(cfg, "snip" if kind == "snip" else "wm", len(train), lr)
                settings = {"task": task, "kind": kind, "n_train": len(train), "train": asdict(tc)}
                if kind == "wm-next":
                    settings["after"] = list(cfg.tasks[:k])
                if kind == "lora":
                    settings["alpha_ratio"] = cfg.lora_alpha_ratio
                path = cache.path(task, kind, settings)
                name = f"{task}-{kind}"
                t1 = time.perf_counter()
                adapter = cache.load(path, kind)
                cached = adapter is not None
                if adapter is None:
                    torch.set_grad_enabled(True)
                    if kind in ("wm", "snip"):
                        adapter = train_adapter(model, tokenizer, train, None, tc, name=name, progress=progress).adapter
                    elif kind == "wm-next":
                        earlier = [adapters[(t, "wm-next")] for t in cfg.tasks[:k]]
                        masks = masks_for(model, "wm", cfg.density, names, seed=cfg.seed, exclude=_union(earlier))
                        adapter = train_masked(model, tokenizer, train, tc, masks, name, progress=progress)
                    else:
                        adapter = train_lora(model, tokenizer, train, tc, names, name,
                                             alpha_ratio=cfg.lora_alpha_ratio, progress=progress)
                    cache.save(path, adapter)
                took = time.perf_counter() - t1
                adapters[(task, kind)] = adapter
                train_info[(task, kind)] = {"trainable": adapter.params if kind == "lora" else adapter.nnz,
                                            "steps": cfg.steps, "lr": lr, "seconds": round(took, 1), "cached": cached}
                log(f"{'loaded' if cached else 'trained'} {name}: {train_info[(task, kind)]['trainable']:,} "
                    f"trainable values, {took:.1f} s")
                bar.update(1)
    seconds["train"] = time.perf_counter() - t0

    # Phase 2: each adapter alone, on its own task.
    t0 = time.perf_counter()
    switcher = Switcher(model, names)
    single: dict[tuple[str, str], dict[str, Any]] = {}
    with _bar(len(jobs), "single eval", progress) as bar:
        for task in cfg.tasks:
            for kind in KINDS:
                if train_info[(task, kind)].get("same_as"):
                    continue
                adapter = adapters[(task, kind)]
                alone = dense_deltas_applied(model, [(adapter, 1.0)]) if kind == "lora" else _applied(switcher, adapter)
                with alone:
                    single[(task, kind)] = score(task)
                log(f"{task}-{kind} alone: accuracy {single[(task, kind)]['accuracy']:.3f}")
                bar.update(1)
        for task in cfg.tasks:
            if train_info[(task, "wm-next")].get("same_as"):
                single[(task, "wm-next")] = single[(task, "wm")]
    seconds["single_eval"] = time.perf_counter() - t0

    # Phase 3: fuse all task adapters with equal weights and score every task on the fused weights.
    t0 = time.perf_counter()
    w = cfg.fusion_weight
    members = {"overlap": "wm", "nonoverlap": "wm-next", "lora": "lora"}
    fusion_rows = []
    fused_info = {}
    with _bar(len(members) * len(cfg.tasks), "fusion eval", progress) as bar:
        for family, kind in members.items():
            items = [(adapters[(t, kind)], w) for t in cfg.tasks]
            if family == "lora":
                context: Any = dense_deltas_applied(model, items)
                changed = sum(p.numel() for n, p in model.named_parameters() if n in items[0][0].factors)
            else:
                fused = fuse_linear(items, name=f"fused-{family}")
                context, changed = _applied(switcher, fused), fused.nnz
            fused_info[family] = {"changed_values": changed}
            with context:
                for task in cfg.tasks:
                    got = score(task)
                    alone = single[(task, kind)]["accuracy"]
                    fusion_rows.append({"fusion": family, "label": FUSIONS[family], "task": task, "weight": w,
                                        "single": alone, "fused": got["accuracy"], "drop": alone - got["accuracy"],
                                        "samples": got["samples"]})
                    log(f"fused {family} on {task}: {alone:.3f} -> {got['accuracy']:.3f}")
                    bar.update(1)
    seconds["fusion_eval"] = time.perf_counter() - t0

    # Phase 4: orthogonality of every pair of task adapters of each kind.
    t0 = time.perf_counter()
    ortho = []
    for kind in ("wm", "wm-next", "snip", "lora"):
        for ta, tb in combinations(cfg.tasks, 2):
            a, b = adapters[(ta, kind)], adapters[(tb, kind)]
            agg = dense_orthogonality(a, b) if kind == "lora" else awom_awor(a, b)["aggregate"]
            ortho.append({"kind": kind, "label": LABELS[kind], "a": ta, "b": tb, **agg})
    seconds["orthogonality"] = time.perf_counter() - t0
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
    from .experiment_train import lora_ranks

    out: dict[str, int] = {}
    for name, r in lora_ranks(model, names, density).items():
        out.setdefault(name.rsplit(".", 2)[-2], r)
    return out
