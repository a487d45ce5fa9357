"""Exceptions a user can cause. Each names the adapter, the layer and the numbers that disagree."""


class ShiraError(Exception):
    """Base class for every error shira_core raises on bad input."""


class AdapterFormatError(ShiraError):
    """The file is not a readable adapter: bad header, missing tensors, wrong dtypes."""


class LengthMismatchError(ShiraError):
    """A layer's indices and values have different lengths."""


class IndexOrderError(ShiraError):
    """A layer's indices are not sorted and unique."""


class IndexRangeError(ShiraError):
    """A layer's indices fall outside its weight."""


class NonFiniteValueError(ShiraError):
    """A layer's values contain NaN or infinity."""


class UnknownLayerError(ShiraError):
    """The adapter names a weight the base model does not have."""


class ShapeMismatchError(ShiraError):
    """The adapter's shape for a weight differs from the base model's."""


class BaseModelMismatchError(ShiraError):
    """The adapter was built for another base model."""


class FusionError(ShiraError):
    """A weighted set of adapters cannot be fused (empty set, bad weight, conflicting shapes)."""


class MaskError(ShiraError):
    """A mask request cannot be met (bad density, nothing left after exclusion, unknown kind)."""


class UnsupportedDtypeError(ShiraError):
    """A layer's values are in a dtype the engine does not handle (float8 and the like)."""


class NotAdaptableError(ShiraError):
    """The adapter changes a weight that exists but cannot be switched (not floating point, or under 2-D)."""
