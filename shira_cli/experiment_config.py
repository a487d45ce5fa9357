"""The settings of `shira experiment` and what its phases share: the adapter kinds, labels and fusions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """One phase's tqdm bar, counted in jobs."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="job", dynamic_ncols=True)


