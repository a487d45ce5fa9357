"""Training SHiRA adapters, the two ways of the paper's section 3.3.

- Gradient masks (grad_mask): hooks keep each target weight's gradient only at the mask, so any loop,
  HF Trainer included, trains SHiRA. One call: ``handle = attach_gradient_masks(model, masks)``.
- Sparse parameters (sparse_params): only the nnz values are parameters; the base stays frozen and gets
  no dense gradient or optimizer state.

Both give the same SparseAdapter. calibration collects the gradients the grad and snip masks need; data reads
instruction JSONL; loop.train_adapter ties it together for `shira train`, and loop.train_epochs is the recipe
(seeded batches, AdamW, clipping) it shares with the LoRA baseline.
"""

from .calibration import causal_lm_loss, collect_gradients, masks_for
from .data import Encoded, Example, TrainingDataError, collate, encode, encode_all, iter_batches, parse_jsonl
from .evaluate import EvalResult, evaluate
from .grad_mask import GradientMaskHandle, attach_gradient_masks, extract_adapter
from .loop import METHODS, EpochStats, TrainConfig, TrainingConfigError, TrainResult, train_adapter, train_epochs
from .sparse_params import SparseParams, attach_sparse_params

__all__ = [
    "METHODS", "Encoded", "EpochStats", "EvalResult", "Example", "GradientMaskHandle", "SparseParams",
    "TrainConfig", "TrainResult", "TrainingConfigError", "TrainingDataError", "attach_gradient_masks",
    "attach_sparse_params", "causal_lm_loss", "collate", "collect_gradients", "encode", "encode_all", "evaluate",
    "extract_adapter", "iter_batches", "masks_for", "parse_jsonl", "train_adapter", "train_epochs",
]
