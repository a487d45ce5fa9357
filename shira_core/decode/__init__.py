"""The decode step on the CPU: Linear layers that stream their weights once per step (decode.linear), and a
Llama-family step in a few native calls a layer (decode.step)."""

from .linear import DecodeLinear, load, use_decode_linears
from .step import DecodeStep

__all__ = ["DecodeLinear", "DecodeStep", "load", "use_decode_linears"]
