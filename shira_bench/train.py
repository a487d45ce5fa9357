"""Training cost (`shira bench train`): step time and peak memory of SHiRA sparse-param, SHiRA grad-mask,
PEFT LoRA and PEFT SHiRA at equal trainable parameter counts (every layer gets r * (in + out) entries, LoRA's
count).

Each method runs in a fresh subprocess so peak memory is its own: on CUDA, max_memory_allocated above what
was allocated before the first step; on CPU, the peak resident set size (sampled) above the same point. The
model is the bundled base (SmolLM2-135M-Instruct) by default; `--base random` builds one of the same shape with
random weights, which --layers can shrink, for a quick run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from .synthetic import bench_model

METHODS = ("sparse", "gradmask", "lora", "peft_shira")
LINEAR_LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _RssPeak:
    """Samples this process's RSS every 2 ms in a thread and keeps the maximum."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _attach(model: Any, method: str, rank: int) -> tuple[Any, list[Any], int]:
    """Returns (model to call, optimizer params, trainable entries): r * (in + out) entries per linear layer."""
    from shira_core.masks import rand_mask
    from shira_core.models import linear_weight_names

    params = dict(model.named_parameters())
    if method in ("sparse", "gradmask"):
        from shira_core.training import attach_gradient_masks, attach_sparse_params

        masks = {}
        for pos, name in enumerate(linear_weight_names(model)):
            w = params[name]
            masks[name] = rand_mask(w, rank * sum(w.shape) / w.numel(), seed=pos)
        nnz = sum(m.numel() for m in masks.values())
        if method == "sparse":
            sp = attach_sparse_params(model, masks)
            return model, list(sp.parameters()), nnz
        handle = attach_gradient_masks(model, masks)
        return model, handle.parameters(), nnz  # dense tensors, of which only nnz entries train
    from peft import LoraConfig, ShiraConfig, get_peft_model

    if method == "lora":
        config: Any = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LINEAR_LEAVES)
    else:
        config = ShiraConfig(r=rank, target_modules=LINEAR_LEAVES)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, params, sum(p.numel() for p in params)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one method: warm-up step, then `steps` timed steps; returns times, peak memory, trainable count."""
    import torch

    device = torch.device(spec["device"])
    model = bench_model(spec)
    model.train()
    model, params, trainable = _attach(model, spec["method"], spec["rank"])
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (spec["batch_size"], spec["seq_len"]), generator=gen).to(device)

    def step() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with _RssPeak() as rss:
        before_rss = rss.peak
        for i in range(spec["steps"] + 1):
            t0 = time.perf_counter()
            step()
            sync()
            if i:  # the first step builds optimizer state and warms kernels
                times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else rss.peak - before_rss
    return {"method": spec["method"], "trainable": trainable,
            "step_s": statistics.median(times), "peak_mb": peak / 2**20, "memory": "cuda" if
            device.type == "cuda" else "rss"}


def measure(*, rank: int = 4, layers: int = 30, batch_size: int = 4, seq_len: int = 256, steps: int = 5,
            rounds: int = 1, device: str = "auto", dtype: str = "auto", methods: tuple[str, ...] = METHODS,
            base: str = "default") -> dict[str, Any]:
    """Runs every method in its own subprocess, `rounds` times interleaved, takes the median over rounds,
    and compares each with PEFT LoRA. On a shared machine, more rounds make the ratios less noisy.

    Args:
        base: "default" (the bundled model), a model path, or "random" (same shape, random weights).

    Returns:
        {"setup", "methods": each method's median step_s and peak_mb, "vs_lora": step and peak ratios,
        "targets"}; the last two only when lora (and sparse) ran.
    """
    import torch

    from shira_core.models import resolve

    if base != "random":
        resolve(base)  # fails here in one line rather than in every worker
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method in methods:
            spec = {"method": method, "rank": rank, "layers": layers, "batch_size": batch_size, "seq_len": seq_len,
                    "steps": steps, "device": device, "dtype": dtype, "base": base}
            runs[method].append(run_worker(spec))
    results = {m: dict(r[0], step_s=statistics.median(x["step_s"] for x in r),
                       peak_mb=statistics.median(x["peak_mb"] for x in r)) for m, r in runs.items()}
    report: dict[str, Any] = {"setup": {"rank": rank, "layers": layers, "batch_size": batch_size,
                                        "seq_len": seq_len, "steps": steps, "rounds": rounds, "device": device,
                                        "dtype": dtype, "base": base},
                              "methods": results}
    if "lora" in results:
        lora = results["lora"]
        report["vs_lora"] = {m: {"step_ratio": r["step_s"] / lora["step_s"],
                                 "peak_ratio": r["peak_mb"] / max(lora["peak_mb"], 1e-9)} for m, r in results.items()}
        if "sparse" in results:
            ratios = report["vs_lora"]["sparse"]
            report["targets"] = {"sparse_peak_le_lora": ratios["peak_ratio"] <= 1.0,
                                 "sparse_step_le_1.15x_lora": ratios["step_ratio"] <= 1.15}
    return report


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """worker(spec) in a fresh Python process, so the peak memory it reports is its own."""
    proc = subprocess.run([sys.executable, "-m", "shira_bench.train", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker for {spec['method']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(report: dict[str, Any]) -> str:
    """Each method's step time, peak memory and trainable count, then its ratios against LoRA."""
    lines = [f"{method:>10}: {r['step_s'] * 1e3:8.1f} ms/step, peak +{r['peak_mb']:7.1f} MB "
             f"({r['memory']}), {r['trainable']:,} trainable" for method, r in report["methods"].items()]
    for m, r in report.get("vs_lora", {}).items():
        lines.append(f"{m:>10} / lora: step x{r['step_ratio']:.2f}, peak memory x{r['peak_ratio']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":  # one worker: `python -m shira_bench.train '<spec as JSON>'`
    print(json.dumps(worker(json.loads(sys.argv[1]))))
