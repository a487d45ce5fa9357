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
    NotAdaptableError,
    ShapeMismatchError,
    ShiraError,
    UnknownLayerError,
    UnsupportedDtypeError,
)
from .fingerprint import BaseFingerprint
from .fusion import fuse, fuse_linear, fuse_ties
from .io import adapter_from_bytes, adapter_to_bytes, load_adapter, save_adapter
from .masks import MASKS, build_masks
from .peft_export import peft_to_bytes, save_peft_adapter
from .peft_interop import load_peft_adapter, peft_from_bytes
from .switcher import ScatterPlan, Switcher, SwitchResult

__all__ = [
    "adapter_from_bytes", "adapter_to_bytes", "AdapterFormatError", "BaseFingerprint", "BaseModelMismatchError",
    "build_masks", "fuse", "fuse_linear", "fuse_ties", "FusionError", "IndexOrderError", "IndexRangeError",
    "LengthMismatchError", "load_adapter", "load_peft_adapter", "MaskError", "MASKS", "NonFiniteValueError",
    "NotAdaptableError", "peft_from_bytes", "peft_to_bytes", "save_adapter", "save_peft_adapter", "ScatterPlan",
    "ShapeMismatchError", "ShiraError", "SparseAdapter", "SparseDelta", "Switcher", "SwitchResult",
    "UnknownLayerError", "UnsupportedDtypeError",
]
__version__ = "0.1.0"
