"""shira_core: sparse high-rank adapters in pure PyTorch.

Build, store, switch and fuse SHiRA adapters. No HTTP, no Redis, no environment variables.
"""

from .delta import SparseAdapter, SparseDelta
from .errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    FusionError,
    IndexOrderError,
    IndexRangeError,
    LengthMismatchError,
    MaskError,
    NonFiniteValueError,
    ShapeMismatchError,
    ShiraError,
    UnknownLayerError,
)
from .fingerprint import BaseFingerprint
from .fusion import fuse, fuse_linear, fuse_ties
from .io import adapter_from_bytes, adapter_to_bytes, load_adapter, save_adapter
from .masks import MASKS, build_masks
from .peft_interop import load_peft_adapter, peft_from_bytes, peft_to_bytes, save_peft_adapter
from .switcher import Switcher, SwitchPlan, SwitchResult

__all__ = [
    "AdapterFormatError", "BaseFingerprint", "BaseModelMismatchError", "FusionError", "IndexOrderError",
    "IndexRangeError", "LengthMismatchError", "MASKS", "MaskError", "NonFiniteValueError", "ShapeMismatchError",
    "ShiraError", "SparseAdapter", "SparseDelta", "SwitchPlan", "SwitchResult", "Switcher", "UnknownLayerError",
    "adapter_from_bytes", "adapter_to_bytes", "build_masks", "fuse", "fuse_linear", "fuse_ties", "load_adapter",
    "load_peft_adapter", "peft_from_bytes", "peft_to_bytes", "save_adapter", "save_peft_adapter",
]
__version__ = "0.1.0"
