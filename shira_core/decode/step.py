"""One decode step of a Llama-family model on the CPU, in ~15 calls a layer instead of transformers' ~100.

transformers' forward spends about as long dispatching small ops as reading the weights in a one-row decode step
of SmolLM2-135M (~5,900 op calls a step). DecodeStep runs the same arithmetic: RMSNorm with the residual add,
rotary embedding and attention of one query over the cache in the native kernels
(csrc/decode_ops.cpp), and every Linear through its own module, so DecodeLinear and the RowCorrector's wrapped
forwards apply as they do in transformers' forward. Plain DecodeLinear layers that share an input (q, k and v;
gate and up) run in one kernel call.

The KV cache stays a transformers DynamicCache (prefill, RowBatch's joins and drops use it as before), but each
layer's keys and values become views of a buffer with room to grow: a step writes one column instead of copying
the whole cache (`torch.cat`). Where a layer's tensors were replaced (a join, a drop, a truncation) the next step
moves them into a new buffer once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from .linear import DecodeLinear, load

FAMILIES = {"llama", "mistral", "qwen2"}
GROWTH = 64  # cache columns added when a buffer is full


@dataclass(frozen=True)
class _Linears:
    """Linear modules that share an input, with their weights and biases looked up once (the Parameter objects
    stay the same when the Switcher re-homes their data)."""

    modules: tuple[nn.Module, ...]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]

    @classmethod
    def of(cls, *modules: nn.Module) -> _Linears:
        return cls(modules, [m.weight for m in modules], [m.bias for m in modules])


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's parts, looked up once: (weight, eps) of each norm, and the Linear modules by input."""

    attn_norm: tuple[torch.Tensor, float]
    qkv: _Linears
    o: _Linears
    mlp_norm: tuple[torch.Tensor, float]
    gate_up: _Linears
    down: _Linears

    @classmethod
    def of(cls, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return cls((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                   _Linears.of(attn.q_proj, attn.k_proj, attn.v_proj), _Linears.of(attn.o_proj),
                   (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                   _Linears.of(mlp.gate_proj, mlp.up_proj), _Linears.of(mlp.down_proj))


class DecodeStep:
    """Decode steps for a Llama-family model (see `for_model`). Call from the thread that owns the model."""

    def __init__(self, model: nn.Module, kernel: ModuleType) -> None:
        self.model = model
        self.kernel = kernel
        config = model.config
        self.inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.layers = [_Layer.of(layer) for layer in self.inner.layers]
        self.final_norm = (self.inner.norm.weight, self.inner.norm.variance_epsilon)
        self.head = _Linears.of(model.lm_head)
        # cache layer -> (key buffer, value buffer, the keys and values views last handed to it)
        self._buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_model(cls, model: nn.Module) -> DecodeStep | None:
        """A DecodeStep where the model is a CPU Llama, Mistral or Qwen2 model this module computes exactly (no
        sliding window, SiLU MLP, plain RMSNorm) and the kernel runs here; None otherwise (use the model's forward)."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in FAMILIES:
            return None
        if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)
        ):
            return None
        if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return None
        weight = next(model.parameters())
        if weight.device.type != "cpu" or not hasattr(getattr(model, "model", None), "rotary_emb"):
            return None
        kernel = load()
        return cls(model, kernel) if kernel is not None else None

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """Logits [rows, vocab] for one new token per row.

        Args:
            tokens, positions: [rows] the tokens fed and their position ids.
            mask: [rows, cached + 1] 1 for real tokens, 0 for left padding, the new token's column included.
            cache: the rows' DynamicCache; each layer gains the new token's keys and values.
        """
        k = self.kernel
        rows = tokens.shape[0]
        x = self.inner.embed_tokens(tokens[:, None])  # [rows, 1, hidden]
        cos, sin = self.inner.rotary_emb(x, positions[:, None])  # [rows, 1, head_dim]
        cos, sin = cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous()
        mask = mask.to(torch.long)
        residual = None
        for i, layer in enumerate(self.layers):
            h = k.add_rms_norm(x, residual, *layer.attn_norm)
            q, key, value = self._linears(layer.qkv, h)
            q = q.view(rows, self.heads, self.head_dim)
            key = key.view(rows, self.kv_heads, self.head_dim)
            k.rope(q, cos, sin)
            k.rope(key, cos, sin)
            keys, values = self._append(cache.layers[i], key, value.view(rows, self.kv_heads, self.head_dim))
            o = k.attention(q, keys, values, mask, self.scale)
            h = k.add_rms_norm(x, self._linears(layer.o, o.view(rows, 1, -1))[0], *layer.mlp_norm)
            gate, up = self._linears(layer.gate_up, h)
            residual = self._linears(layer.down, F.silu(gate).mul_(up))[0]  # as transformers: act(gate) * up
        h = k.add_rms_norm(x, residual, *self.final_norm)
        return self._linears(self.head, h)[0][:, -1]

    def _linears(self, group: _Linears, h: torch.Tensor) -> list[torch.Tensor]:
        """Each module's output for h: in one kernel call where they are DecodeLinear layers without a wrapped forward
        (each layer's `correction` then runs on its output), else through the modules."""
        modules = group.modules
        if all(type(m) is DecodeLinear and "forward" not in m.__dict__ for m in modules):
            outs = self.kernel.linears(h, group.weights, group.biases)
            for m, out in zip(modules, outs, strict=True):
                if m.correction is not None:
                    m.correction(m, h, out)
            return outs
        return [m(h) for m in modules]

    def _append(self, layer, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new column into the layer's buffer (moving the layer into a new one when it was replaced or is
        full) and returns the layer's keys and values, views [rows, kv_heads, cached + 1, head_dim]."""
        held = self._buffers.get(layer)
        length = layer.keys.shape[-2] if layer.is_initialized and layer.keys.numel() else 0
        if held is None or held[2] is not layer.keys or held[3] is not layer.values or length >= held[0].shape[-2]:
            rows = key.shape[0]
            room = length + GROWTH
            kbuf = key.new_empty(rows, self.kv_heads, room, self.head_dim)
            vbuf = value.new_empty(rows, self.kv_heads, room, self.head_dim)
            if length:
                kbuf[:, :, :length].copy_(layer.keys)
                vbuf[:, :, :length].copy_(layer.values)
            elif not layer.is_initialized:
                layer.lazy_initialization(key[:, :, None], value[:, :, None])
        else:
            kbuf, vbuf = held[0], held[1]
        kbuf.select(2, length).copy_(key)
        vbuf.select(2, length).copy_(value)
        layer.keys, layer.values = kbuf.narrow(2, 0, length + 1), vbuf.narrow(2, 0, length + 1)
        self._buffers[layer] = (kbuf, vbuf, layer.keys, layer.values)
        return layer.keys, layer.values
