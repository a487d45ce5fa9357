"""GGUF files for the llama.cpp side of `shira bench peer`: the base model's linear shapes, read from its GGUF, and
PEFT LoRA adapters written as llama.cpp LoRA adapters.

The adapter layout follows llama.cpp's convert_lora_to_gguf.py: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and per target weight two tensors, `blk.N.attn_q.weight.lora_a` (PEFT's lora_A, r x in)
and `.lora_b` (lora_B, out x r). llama.cpp stores a llama model's q and k rows permuted for its rope, so lora_B
of q_proj and k_proj gets the same permutation (convert_hf_to_gguf.py's LlamaModel.permute).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# The seven projections of a llama decoder layer, in PEFT's module names.
LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_PEFT_PREFIX = "base_model.model."


def _arch(name: str):
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ValueError(f"unknown GGUF architecture {name!r}")


def _field(reader, key: str):
    import gguf

    field = reader.fields[key]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode()
    return field.parts[field.data[0]].tolist()[0]


class BaseLayout:
    """What the adapters need to know about a base GGUF: its architecture, head counts, every linear weight's
    shape (HF name -> (out, in)) and its parameter count."""

    def __init__(self, path: Path):
        import gguf

        reader = gguf.GGUFReader(path)
        self.arch: str = _field(reader, "general.architecture")
        self.layers = int(_field(reader, f"{self.arch}.block_count"))
        self.n_head = int(_field(reader, f"{self.arch}.attention.head_count"))
        self.n_head_kv = int(_field(reader, f"{self.arch}.attention.head_count_kv"))
        self.parameters = sum(int(t.n_elements) for t in reader.tensors)
        # Reader shapes are GGML's (ne0 = in, ne1 = out); PyTorch's are (out, in).
        found = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
        names = gguf.get_tensor_name_map(_arch(self.arch), self.layers)
        self.linear_shapes: dict[str, tuple[int, int]] = {}
        for layer in range(self.layers):
            for proj in LLAMA_PROJECTIONS:
                hf = f"model.layers.{layer}.{proj}.weight"
                ne = found.get(names.get_name(hf, try_suffixes=(".weight",)) or "")
                if ne is not None:
                    self.linear_shapes[hf] = (ne[1], ne[0])
        if not self.linear_shapes:
            raise ValueError(f"{path}: no llama-style projection weights found (architecture {self.arch})")

    def shira_entries(self, density: float) -> int:
        """Trainable entries of a SHiRA adapter of `density` over every linear weight (lm_head excluded)."""
        return sum(round(density * out * inp) for out, inp in self.linear_shapes.values())

    def lora_entries(self, rank: int) -> int:
        """Trainable entries of a rank-`rank` LoRA on the same weights: r * (in + out) each."""
        return sum(rank * (out + inp) for out, inp in self.linear_shapes.values())


def random_peft_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT LoRA state dict (base_model.model.<module>.lora_A/B.weight) with small random values in both A and
    B, so that the adapter changes the output and no kernel can skip it."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp) in shapes.items():
        module = _PEFT_PREFIX + name.removesuffix(".weight")
        state[f"{module}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / inp**0.5
        state[f"{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
    return state


def permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for a q or k projection: within each head, the two rotary halves interleaved."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_lora_gguf(path: Path, state: dict[str, torch.Tensor], alpha: float, layout: BaseLayout) -> Path:
    """Writes a PEFT LoRA state dict as a llama.cpp LoRA adapter for the base `layout` describes.

    Args:
        path: the .gguf file to write.
        state: PEFT keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` and its lora_B).
        alpha: PEFT's lora_alpha; llama.cpp scales by alpha / rank as PEFT does.
        layout: the base model's layout (its architecture and head counts).
    Returns:
        path.
    """
    import gguf

    names = gguf.get_tensor_name_map(_arch(layout.arch), layout.layers)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state.items():
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if key.endswith(suffix):
                module = key.removeprefix(_PEFT_PREFIX).removesuffix(suffix)
                pairs.setdefault(module, {})[part] = tensor.detach().float().cpu().numpy()
                break
        else:
            raise ValueError(f"{key}: not a PEFT LoRA weight (expected a .lora_A.weight or .lora_B.weight key)")
    writer = gguf.GGUFWriter(path, layout.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for module, ab in pairs.items():
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or set(ab) != {"A", "B"}:
            raise ValueError(f"{module}: no GGUF tensor for it, or lora_A/lora_B missing (have {sorted(ab)})")
        lora_b = ab["B"]
        if layout.arch == "llama" and module.endswith("q_proj"):
            lora_b = permute_rope_rows(lora_b, layout.n_head)
        elif layout.arch == "llama" and module.endswith("k_proj"):
            lora_b = permute_rope_rows(lora_b, layout.n_head_kv)
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(ab["A"]))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(lora_b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_random_loras(directory: Path, layout: BaseLayout, count: int, rank: int) -> list[Path]:
    """`count` random rank-`rank` LoRAs (alpha = rank, so scale 1) written as GGUF adapters in `directory`."""
    return [write_lora_gguf(directory / f"lora-{k}.gguf", random_peft_lora(layout.linear_shapes, rank, seed=200 + k),
                            alpha=rank, layout=layout) for k in range(count)]
