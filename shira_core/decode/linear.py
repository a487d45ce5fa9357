"""Linear layers for serving on the CPU, through the native kernel in csrc/decode_linear.cpp.

`use_decode_linears(model)` turns a model's nn.Linear modules into DecodeLinear, a subclass whose forward runs the
kernel when autograd is off, for every one-token-per-row pass (a decode step) and for prefills, except 16-bit
prefills on a CPU with AVX512-BF16, which stay on nn.Linear's forward (oneDNN). The weights are read where they are,
so the Switcher's in-place scatters and the RowCorrector's corrections work unchanged. A row's output does not
depend on the other rows of the pass (see the source), so batched decoding equals decoding alone bit for bit; it
differs from PyTorch's products in the last bits.

Prefills of SmolLM2-135M's layers on 2 cores, 44-token prompts, kernel against PyTorch:
- Zen 4 (AVX512-BF16): fp32, 1 prompt 94 ms against 131, 8 prompts 627 against 619; bf16, 1 prompt 100 against
  80 and 8 prompts 643 against 290. oneDNN's bf16 products (larger register tiles, packed weights, the same dot
  instructions) win as soon as there are many rows, so bf16 prefills stay there.
- Zen 3 (AVX2 only; 40 of the 210 layers, median of 5): bf16 1 prompt 64 against 246 ms, 2 prompts 101 against
  415: without native bf16 PyTorch's products are 4x slower, so they run on the kernel. fp32 1 prompt 54 against
  65, 4 prompts 183 against 120; they stay on the kernel all the same, so that a prompt rounds alike alone and
  beside others.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from .. import native

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("decode_linear.cpp", "decode_ops.cpp")]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32 = torch.float32


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (`linear(x, weight, bias)`, `isa()`, and decode.step's ops), or None where they cannot
    be built or this CPU has neither AVX-512 nor AVX2."""
    try:
        module = native.build(SOURCES, "shira_decode_linear")
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers: all mean PyTorch's linear
        log.warning("decode-linear kernel unavailable, using PyTorch's linear: %s", e)
        return None
    if not module.supported():
        log.info("decode-linear kernel: this CPU has neither AVX-512 nor AVX2; using PyTorch's linear")
        return None
    return module


class DecodeLinear(nn.Linear):
    """An nn.Linear whose decode steps (and most prefills: see the module) run the decode kernel (bound by
    `use_decode_linears`).

    `correction`, when set on a layer, is called as correction(layer, x, out) after every pass and may add to
    `out` in place: the RowCorrector's per-row corrections for mixed batches. A hook rather than a wrapped
    forward, so DecodeStep can run q, k and v (or gate and up) in one kernel call and still correct each.
    """

    kernel: ModuleType | None = None
    prefills: frozenset[torch.dtype] = frozenset()  # weight dtypes whose prefills run the kernel (see the module)
    correction: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel is not None and not torch.is_grad_enabled()
        if kernel and ((x.dim() == 3 and x.shape[1] == 1) or self.weight.dtype in self.prefills):
            out = self.kernel.linear(x, self.weight, self.bias)
        else:
            out = F.linear(x, self.weight, self.bias)
        if self.correction is not None:
            self.correction(self, x, out)
        return out


def use_decode_linears(model: nn.Module) -> int:
    """Makes the model's CPU nn.Linear layers DecodeLinear where the kernel runs here; returns how many it has. A
    model with no such layer (on CUDA) never loads, or builds, the kernel."""
    bound = [m for m in model.modules() if type(m) is DecodeLinear]  # bound before (an engine started again)
    fresh = [m for m in model.modules() if type(m) is nn.Linear and _fits(m)]
    if not (bound or fresh):
        return 0
    kernel = load()
    if kernel is None:
        return 0
    for module in fresh:
        module.__class__ = DecodeLinear
    DecodeLinear.kernel = kernel
    DecodeLinear.prefills = prefill_dtypes(kernel.isa())
    log.info("decode steps run %d Linear layers on the %s decode kernel", len(bound) + len(fresh), kernel.isa())
    return len(bound) + len(fresh)


def prefill_dtypes(isa: str) -> frozenset[torch.dtype]:
    """The weight dtypes whose prefills the kernel runs on a CPU of this ISA: all, except the 16-bit ones where the
    CPU has bf16 dot products (oneDNN uses them too, with larger tiles)."""
    return frozenset({FP32} if isa == "avx512-bf16" else DTYPES)


def _fits(module: nn.Linear) -> bool:
    """Whether the kernel takes this layer: CPU, a dtype it reads, contiguous weight and bias of one dtype."""
    w, b = module.weight, module.bias
    if w.device.type != "cpu" or w.dtype not in DTYPES or not w.is_contiguous():
        return False
    return b is None or (b.dtype == w.dtype and b.is_contiguous())
