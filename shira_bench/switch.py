"""Adapter switching (`shira bench switch`) against its peers, side by side in one process.

Every method touches the same linear weights of the same base model with about the same number of
parameters, and each round runs every method once, so machine noise hits all of them alike. Reported
figures are medians over the rounds.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from shira_core.models import linear_weight_names, load_base
from shira_core.switcher import Switcher

from .synthetic import random_adapter

TARGETS = {
    "shira_apply_revert_ms <= 1.5 x scatter_bound_ms": ("scatter_bound_ms", 1.5, "le"),
    "2.5x faster than lora_fuse_unfuse_ms": ("lora_fuse_unfuse_ms", 2.5, "ge"),
    "10x faster than peft_shira_merge_unmerge_ms": ("peft_shira_merge_unmerge_ms", 10.0, "ge"),
}


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


class _Lora:
    """A raw LoRA fuse/unfuse (W += B@A, then W -= B@A) at rank r on each layer."""

    def __init__(self, model: torch.nn.Module, names: list[str], rank: int) -> None:
        gen = torch.Generator().manual_seed(7)
        self.pairs = []
        for n in names:
            w = model.get_parameter(n)
            out_f, in_f = w.shape
            b = (torch.randn(out_f, rank, generator=gen) * 0.01).to(w)
            a = (torch.randn(rank, in_f, generator=gen) * 0.01).to(w)
            self.pairs.append((w, b, a))

    @torch.no_grad()
    def fuse_unfuse(self) -> None:
        for w, b, a in self.pairs:
            w.addmm_(b, a)
        for w, b, a in self.pairs:
            w.addmm_(b, a, alpha=-1)


def _peft_model(model: torch.nn.Module, names: list[str], rank: int) -> torch.nn.Module:
    from peft import ShiraConfig, get_peft_model

    modules = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names})
    config = ShiraConfig(r=rank, target_modules=modules, init_weights=False, random_seed=3)
    return get_peft_model(copy.deepcopy(model), config)


def _scatter_bound(numel: int, nnz: int, device: torch.device) -> Callable[[], None]:
    flat = torch.zeros(numel, dtype=torch.float32, device=device)
    idx = torch.sort(torch.randperm(numel, device=device)[:nnz]).values
    vals = torch.randn(nnz, device=device)

    def two_passes() -> None:
        flat.index_put_((idx,), vals)
        flat.index_put_((idx,), vals)

    return two_passes


def measure(density: float = 0.01, repeats: int = 15, model_spec: str | None = None) -> dict:
    """Runs every method `repeats` times, interleaved, and returns medians in ms plus sizes."""
    model, _, _ = load_base(model_spec, device="auto", dtype="float32")
    device = next(model.parameters()).device
    names = linear_weight_names(model)
    a = random_adapter(model, names, density, seed=1, name="a").to(device)
    b = random_adapter(model, names, density, seed=2, name="b").to(device)
    nnz = a.nnz
    sum_dims = sum(sum(model.get_parameter(n).shape) for n in names)
    rank = max(1, round(nnz / sum_dims))  # LoRA and PEFT SHiRA: r*(m+n) per layer, equal total count

    peft = _peft_model(model, names, rank)
    switcher = Switcher(model)
    t0 = time.perf_counter()
    plan_a = switcher.prepare([(a, 1.0)])
    prepare_ms = (time.perf_counter() - t0) * 1e3
    plan_b = switcher.prepare([(b, 1.0)])
    lora = _Lora(model, names, rank)
    numel = sum(model.get_parameter(n).numel() for n in names)
    bound = _scatter_bound(numel, nnz, device)

    def apply_revert() -> None:
        switcher.apply(plan_a)
        switcher.revert()

    def transition() -> float:
        switcher.apply(plan_a)
        ms = _timed(lambda: switcher.apply(plan_b), device)
        switcher.revert()
        return ms

    def peft_cycle() -> None:
        peft.merge_adapter()
        peft.unmerge_adapter()

    samples: dict[str, list[float]] = {k: [] for k in
                                       ("shira_apply_revert_ms", "shira_transition_ms", "lora_fuse_unfuse_ms",
                                        "peft_shira_merge_unmerge_ms", "scatter_bound_ms")}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            apply_revert(), transition(), lora.fuse_unfuse(), bound(), peft_cycle()
        for _ in tqdm(range(repeats), desc="bench switch", unit="round", leave=False):
            samples["shira_apply_revert_ms"].append(_timed(apply_revert, device))
            samples["shira_transition_ms"].append(transition())
            samples["lora_fuse_unfuse_ms"].append(_timed(lora.fuse_unfuse, device))
            samples["peft_shira_merge_unmerge_ms"].append(_timed(peft_cycle, device))
            samples["scatter_bound_ms"].append(_timed(bound, device))
    result = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    result.update(nnz=nnz, density=density, torch=torch.__version__)
    extras = {"lora_rank": rank, "lora_params": rank * sum_dims, "prepare_ms": round(prepare_ms, 1),
              "device": str(device), "threads": torch.get_num_threads(), "layers": len(names),
              "plan_bytes": plan_a.nbytes}
    return {"result": result, "extras": extras}


def report(result: dict, extras: dict) -> str:
    """The medians as a table, with each method against apply+revert, and the TARGETS met or missed."""
    own = result["shira_apply_revert_ms"]
    lines = [
        f"base: {extras['layers']} linear layers, nnz {result['nnz']:,} (density {result['density']}), "
        f"LoRA/PEFT rank {extras['lora_rank']} ({extras['lora_params']:,} params), device {extras['device']}, "
        f"{extras['threads']} threads, torch {result['torch']}",
        f"one-time plan build (prepare): {extras['prepare_ms']} ms, plan memory {extras['plan_bytes'] / 2**20:.1f} MiB",
        "",
        f"{'method':34s} {'median ms':>10s} {'vs shira apply+revert':>22s}",
    ]
    for key in ("shira_apply_revert_ms", "shira_transition_ms", "scatter_bound_ms", "lora_fuse_unfuse_ms",
                "peft_shira_merge_unmerge_ms"):
        lines.append(f"{key:34s} {result[key]:10.2f} {result[key] / own:21.2f}x")
    lines.append("")
    for label, (key, factor, kind) in TARGETS.items():
        ratio = own / result[key] if kind == "le" else result[key] / own
        ok = ratio <= factor if kind == "le" else ratio >= factor
        shown = f"apply+revert / bound = {ratio:.2f}" if kind == "le" else f"speed-up = {ratio:.1f}x"
        lines.append(f"[{'ok' if ok else 'MISS'}] {label}: {shown}")
    return "\n".join(lines)
