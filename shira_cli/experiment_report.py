"""Writes `shira experiment` results: experiment.json, the markdown tables (into experiment.md between markers,
keeping any prose around them) and experiment.png. Also the command's entry point, run_experiment_command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .experiment_config import FUSIONS, KINDS, LABELS, ExperimentConfig

START, END = "<!-- experiment:results:start -->", "<!-- experiment:results:end -->"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown_tables(results: dict[str, Any], command: str) -> str:
    """The results block: setup, single-adapter, fusion and orthogonality tables (accuracies in %)."""
    setup, tasks = results["setup"], results["setup"]["tasks"]
    rows = {(r["task"], r["method"]): r for r in results["single"]}
    sec = results["seconds"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Base model {Path(setup['model']).name} on {setup['device']} ({setup['torch_threads']} threads); "
        f"{setup['steps']} steps of batch {setup['batch_size']} per adapter, lr {setup['lr']:g} "
        f"(LoRA {setup['lora_lr'] or setup['lr']:g}), density {setup['density']:g}, max_len {setup['max_len']}, "
        f"seed {setup['seed']}; held-out exact match on "
        + ", ".join(f"{setup['eval_examples'][t]} {t}" for t in tasks) + " examples. "
        f"LoRA ranks per layer kind: {', '.join(f'{k} {r}' for k, r in setup['lora_ranks'].items())}. "
        f"Wall time {sec['total'] / 60:.1f} min (train {sec['train'] / 60:.1f}, evaluation "
        f"{(sec['base_eval'] + sec['single_eval'] + sec['fusion_eval']) / 60:.1f}, orthogonality "
        f"{sec['orthogonality']:.0f} s).",
        "",
        "**Single adapter**: held-out accuracy (%) of each adapter on its own task.",
        "",
        "| method | trainable values | " + " | ".join(tasks) + " | mean |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    base = [results["base"][t]["accuracy"] for t in tasks]
    lines.append(f"| {LABELS['base']} | 0 | " + " | ".join(_pct(a) for a in base)
                 + f" | {_pct(sum(base) / len(base))} |")
    for kind in KINDS:
        accs = [rows[(t, kind)]["accuracy"] for t in tasks]
        counts = sorted({rows[(t, kind)]["trainable"] for t in tasks})
        lines.append(f"| {LABELS[kind]} | {' / '.join(f'{c:,}' for c in counts)} | "
                     + " | ".join(_pct(a) for a in accs) + f" | {_pct(sum(accs) / len(accs))} |")
    lines += [
        "",
        f"**Multi-adapter fusion** (the paper's Table 4): all {len(tasks)} task adapters summed, each with weight "
        f"{results['fusion'][0]['weight']:g}; accuracy (%) of each task on the fused weights, and its drop from "
        "the task's own adapter alone (drop = single − fused, in points).",
        "",
        "| fusion | values changed | task | single | fused | drop |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for family, label in FUSIONS.items():
        got = [r for r in results["fusion"] if r["fusion"] == family]
        changed = results["fused_changed_values"][family]["changed_values"]
        for r in got:
            lines.append(f"| {label} | {changed:,} | {r['task']} | {_pct(r['single'])} | {_pct(r['fused'])} | "
                         f"{_pct(r['drop'])} |")
        mean = lambda key, g=got: sum(r[key] for r in g) / len(g)  # noqa: E731
        lines.append(f"| {label} | | **mean** | {_pct(mean('single'))} | {_pct(mean('fused'))} | "
                     f"**{_pct(mean('drop'))}** |")
    lines += [
        "",
        "**Orthogonality** of each pair of task adapters: AWOM = ‖A1ᵀA2‖ (l2 over all layers together), AWOR = "
        "1 − ‖A1ᵀA2‖₀ / m² (mean over layers, and pooled over all product entries), and the fraction of A1's "
        "changed entries that A2 changes too.",
        "",
        "| adapters | pair | AWOM | AWOR mean | AWOR pooled | shared entries |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results["orthogonality"]:
        lines.append(f"| {r['label']} | {r['a']} × {r['b']} | {r['awom_total']:.4g} | {r['awor_mean']:.4f} | "
                     f"{r['awor_pooled']:.4f} | {_pct(r['overlap_fraction_a'])}% |")
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, block: str) -> None:
    """Puts `block` between the result markers of `path`, keeping the text around them; creates the file if new."""
    wrapped = f"{START}\n{block}{END}"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + wrapped + rest.split(END, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Experiment: SHiRA's claims in miniature\n\n") + wrapped + "\n"
    path.write_text(text, encoding="utf-8")


def plot(results: dict[str, Any], path: Path) -> None:
    """Three panels: single-adapter accuracy, accuracy after fusion (single shown as outlines), AWOR per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["setup"]["tasks"]
    rows = {(r["task"], r["method"]): r["accuracy"] for r in results["single"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    series = [("base", [results["base"][t]["accuracy"] for t in tasks])]
    series += [(k, [rows[(t, k)] for t in tasks]) for k in KINDS]
    width = 0.8 / len(series)
    for i, (kind, accs) in enumerate(series):
        ax.bar([x + i * width for x in range(len(tasks))], [100 * a for a in accs], width, label=LABELS[kind])
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("Single adapter")
    ax.set_ylim(0, 135)  # head room for the legend above the bars
    ax.legend(fontsize=7, ncol=2, loc="upper center")

    ax = axes[1]
    width = 0.8 / len(FUSIONS)
    for i, (family, label) in enumerate(FUSIONS.items()):
        got = {r["task"]: r for r in results["fusion"] if r["fusion"] == family}
        xs = [x + i * width for x in range(len(tasks))]
        bars = ax.bar(xs, [100 * got[t]["fused"] for t in tasks], width, label=f"{label}: fused")
        ax.bar(xs, [100 * got[t]["single"] for t in tasks], width, fill=False, edgecolor=bars[0].get_facecolor(),
               linestyle="--", linewidth=1.2)
    ax.set_xticks([x + width * (len(FUSIONS) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_title(f"After fusion (dashed: adapter alone), weight {results['fusion'][0]['weight']:g} each")
    ax.set_ylim(0, 135)
    ax.legend(fontsize=7, loc="upper center")

    ax = axes[2]
    ortho = results["orthogonality"]
    labels = [f"{r['label']}\n{r['a']}×{r['b']}" for r in ortho]
    bars = ax.bar(range(len(ortho)), [r["awor_pooled"] for r in ortho], color="tab:gray")
    for bar, r in zip(bars, ortho, strict=True):
        ax.annotate(f"AWOM {r['awom_total']:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(ortho)), labels, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("AWOR (pooled)")
    ax.set_ylim(0, 1.1)
    ax.set_title("Orthogonality of adapter pairs")
    fig.suptitle(f"{Path(results['setup']['model']).name}: SHiRA vs LoRA, single adapter, fusion, orthogonality",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path, command: str) -> list[Path]:
    """experiment.json, experiment.md (results block) and experiment.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "experiment.json", out / "experiment.md", out / "experiment.png"]
    paths[0].write_text(json.dumps({"command": command, **results}, indent=2) + "\n", encoding="utf-8")
    update_markdown(paths[1], markdown_tables(results, command))
    plot(results, paths[2])
    return paths


def run_experiment_command(cfg: ExperimentConfig, *, out: Path, base: str | None, cache_dir: Path | None,
                           reuse: bool, threads: int | None, progress: bool) -> dict[str, Any]:
    """`shira experiment`: loads the base on CPU, runs the experiment, writes the outputs and prints the tables."""
    import torch

    from shira_core.models import load_base

    from .experiment import run_experiment

    cfg.validate()  # before the slow model load
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tokenizer, source = load_base(base, device="cpu", dtype="float32")
    print(f"base {source.label} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results = run_experiment(model, tokenizer, cfg, model_label=source.label, cache_dir=cache_dir, reuse=reuse,
                             progress=progress, log=lambda line: print(line, file=sys.stderr, flush=True))
    results["seconds"]["model_load"] = round(time.perf_counter() - t0 - results["seconds"]["total"], 1)
    command = cfg.command(out)  # reproduces from scratch; --reuse only skips training
    for path in write_outputs(results, out, command):
        print(f"wrote {path}", file=sys.stderr)
    print(markdown_tables(results, command))
    return results
