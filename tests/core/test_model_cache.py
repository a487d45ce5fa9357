"""The converted-model cache: a GGUF base loads from its safetensors copy with the same weights and tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from shira_core import model_cache
from shira_core.models import bundled_gguf, load_base

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours, ünïcode."}]


def test_the_cached_load_equals_the_direct_load(data_dir):
    cache = data_dir / "models"
    direct, direct_tok, source = load_base(None, "cpu", "float32")  # converts from the GGUF file, no cache
    load_base(None, "cpu", "float32", cache)  # writes the copy unless an earlier test did
    copy = model_cache.cached_copy(cache, bundled_gguf(), torch.float32)
    assert model_cache.is_complete(copy)
    cached, cached_tok, cached_source = load_base(None, "cpu", "float32", cache)
    assert cached_source == source  # still named for its source
    ours, theirs = direct.state_dict(), cached.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    assert cached.generation_config.eos_token_id == direct.generation_config.eos_token_id
    for tok in (direct_tok, cached_tok):
        assert tok.pad_token == tok.eos_token
    text = direct_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert cached_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == text
    assert cached_tok(text).input_ids == direct_tok(text).input_ids


def test_a_changed_source_file_gets_a_new_copy(tmp_path):
    gguf = tmp_path / "model.gguf"
    shutil.copyfile(bundled_gguf(), gguf)
    first = model_cache.cached_copy(tmp_path, gguf, torch.float32)
    first.mkdir()
    (first / model_cache.MARKER).write_text("{}")
    assert model_cache.cached_copy(tmp_path, gguf, torch.float32) == first
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    moved = model_cache.cached_copy(tmp_path, gguf, torch.float32)
    assert moved != first and not model_cache.is_complete(moved)
    with gguf.open("ab") as f:  # grown
        f.write(b"\0")
    assert model_cache.cached_copy(tmp_path, gguf, torch.float32) not in (first, moved)
    assert model_cache.cached_copy(tmp_path, gguf, torch.bfloat16) != model_cache.cached_copy(
        tmp_path, gguf, torch.float32)


def test_an_unwritable_cache_only_costs_the_conversion(tmp_path, tiny_llama, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    model = tiny_llama()

    class Tok:
        def save_pretrained(self, directory):
            raise AssertionError("not reached")

    assert not model_cache.write_copy(blocked / "copy", model, Tok(), {})
    assert "not writable" in caplog.text


def test_a_written_copy_is_readable_by_other_users(tmp_path, tiny_llama):
    """A copy made by `make install` or an image build (root) is loaded by a server running as another user."""

    class Tok:
        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    copy = tmp_path / "copy"
    assert model_cache.write_copy(copy, tiny_llama(), Tok(), {"k": 1})
    assert copy.stat().st_mode & 0o755 == 0o755
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in copy.iterdir())


def test_another_dtype_casts_the_fp32_copy_instead_of_converting_again(data_dir, caplog):
    cache = data_dir / "models"
    fp32, _, _ = load_base(None, "cpu", "float32", cache)
    assert not model_cache.is_complete(model_cache.cached_copy(cache, bundled_gguf(), torch.bfloat16))
    with caplog.at_level("INFO", logger="shira_core.models"):
        bf16, _, _ = load_base(None, "cpu", "bfloat16", cache)
    assert "from its converted copy" in caplog.text and "written" not in caplog.text
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.model.layers[3].mlp.up_proj.weight, fp32.model.layers[3].mlp.up_proj.weight.bfloat16())
    assert not model_cache.is_complete(model_cache.cached_copy(cache, bundled_gguf(), torch.bfloat16))
