"""The evaluation phases of `shira experiment`: the base model, each adapter alone, the fused adapters, and the
orthogonality of every pair of task adapters."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import combinations
from typing import Any

from torch import nn

from shira_core.training.data import Encoded

from .experiment_config import FUSIONS, KINDS, LABELS, ExperimentConfig, progress_bar
from .experiment_train import Adapters

Log = Callable[[str], None]


class TaskScorer:
    """Held-out exact match of the model, as its weights are now, on each task's evaluation items."""

    def __init__(self, model: nn.Module, tokenizer: Any, held: dict[str, Sequence[Encoded]]) -> None:
        self.model, self.tokenizer, self.held = model, tokenizer, held

    def __call__(self, task: str) -> dict[str, Any]:
        from shira_core.training.evaluate import generate_completions

        # evaluate()'s exact match without its loss pass, which would double the cost of every evaluation
        items = self.held[task]
        self.model.eval()
        texts = generate_completions(self.model, self.tokenizer, items, batch_size=16)
        hits = sum(t.strip() == e.completion.strip() for t, e in zip(texts, items, strict=True))
        return {"accuracy": hits / len(items), "examples": len(items),
                "samples": [[e.completion, t] for e, t in zip(items[:3], texts, strict=False)]}


@contextmanager
def _applied(switcher: Any, adapter: Any) -> Iterator[None]:
    switcher.apply([(adapter, 1.0)])
    try:
        yield
    finally:
        switcher.revert()


def score_base(score: TaskScorer, tasks: Sequence[str], *, progress: bool, log: Log) -> dict[str, dict[str, Any]]:
    """The base model on every task."""
    base = {}
    with progress_bar(len(tasks), "base eval", progress) as bar:
        for task in tasks:
            base[task] = score(task)
            log(f"base model on {task}: accuracy {base[task]['accuracy']:.3f}")
            bar.update(1)
    return base


def score_single(model: nn.Module, switcher: Any, score: TaskScorer, tasks: Sequence[str], adapters: Adapters,
                 train_info: dict[tuple[str, str], dict[str, Any]], *, progress: bool,
                 log: Log) -> dict[tuple[str, str], dict[str, Any]]:
    """Each adapter alone, on its own task: SHiRA applied by the Switcher, LoRA added densely."""
    from shira_core.baselines import dense_deltas_applied

    single: dict[tuple[str, str], dict[str, Any]] = {}
    jobs = sum(1 for info in train_info.values() if not info.get("same_as"))
    with progress_bar(jobs, "single eval", progress) as bar:
        for task in tasks:
            for kind in KINDS:
                if train_info[(task, kind)].get("same_as"):
                    continue
                adapter = adapters[(task, kind)]
                alone = dense_deltas_applied(model, [(adapter, 1.0)]) if kind == "lora" else _applied(switcher, adapter)
                with alone:
                    single[(task, kind)] = score(task)
                log(f"{task}-{kind} alone: accuracy {single[(task, kind)]['accuracy']:.3f}")
                bar.update(1)
        for task in tasks:
            if train_info[(task, "wm-next")].get("same_as"):
                single[(task, "wm-next")] = single[(task, "wm")]
    return single


def score_fusions(model: nn.Module, switcher: Any, score: TaskScorer, cfg: ExperimentConfig, adapters: Adapters,
                  single: dict[tuple[str, str], dict[str, Any]], *, progress: bool,
                  log: Log) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """All task adapters of a family fused with equal weights, and every task scored on the fused weights.

    Returns:
        One row per (family, task) with its accuracy alone, fused and the drop, and per family the number of
        weight values the fusion changes.
    """
    from shira_core.baselines import dense_deltas_applied
    from shira_core.fusion import fuse_linear

    w = cfg.fusion_weight
    members = {"overlap": "wm", "nonoverlap": "wm-next", "lora": "lora"}
    rows = []
    changed_values = {}
    with progress_bar(len(members) * len(cfg.tasks), "fusion eval", progress) as bar:
        for family, kind in members.items():
            items = [(adapters[(t, kind)], w) for t in cfg.tasks]
            if family == "lora":
                context: Any = dense_deltas_applied(model, items)
                changed = sum(p.numel() for n, p in model.named_parameters() if n in items[0][0].factors)
            else:
                fused = fuse_linear(items, name=f"fused-{family}")
                context, changed = _applied(switcher, fused), fused.nnz
            changed_values[family] = {"changed_values": changed}
            with context:
                for task in cfg.tasks:
                    got = score(task)
                    alone = single[(task, kind)]["accuracy"]
                    rows.append({"fusion": family, "label": FUSIONS[family], "task": task, "weight": w,
                                 "single": alone, "fused": got["accuracy"], "drop": alone - got["accuracy"],
                                 "samples": got["samples"]})
                    log(f"fused {family} on {task}: {alone:.3f} -> {got['accuracy']:.3f}")
                    bar.update(1)
    return rows, changed_values


def orthogonality(tasks: Sequence[str], adapters: Adapters) -> list[dict[str, Any]]:
    """AWOM and AWOR of every pair of task adapters of each kind (LoRA's from its dense ΔW)."""
    from shira_core.analysis import awom_awor, dense_orthogonality

    rows = []
    for kind in ("wm", "wm-next", "snip", "lora"):
        for ta, tb in combinations(tasks, 2):
            a, b = adapters[(ta, kind)], adapters[(tb, kind)]
            agg = dense_orthogonality(a, b) if kind == "lora" else awom_awor(a, b)["aggregate"]
            rows.append({"kind": kind, "label": LABELS[kind], "a": ta, "b": tb, **agg})
    return rows
