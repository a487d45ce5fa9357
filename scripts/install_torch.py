"""Installs torch into the running interpreter's environment, the CPU build unless told otherwise.

PyPI's Linux torch wheel is a CUDA build that pulls several GB of CUDA libraries, which a CPU machine
never uses. So, unless TORCH_INDEX_URL is given:
- with an NVIDIA driver (`nvidia-smi`), the default index (a CUDA build);
- otherwise PyTorch's CPU index, when it answers;
- otherwise a CPU wheel that pip finds locally (its find-links), never PyPI's CUDA build.

Usage: python scripts/install_torch.py SPEC [INDEX_URL]    (the Makefile passes TORCH_SPEC, TORCH_INDEX_URL)
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *args])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: list[str]) -> int:
    spec = argv[1] if len(argv) > 1 else "torch"
    index = argv[2] if len(argv) > 2 else ""
    if importlib.util.find_spec("torch") is not None:
        return 0
    if index:
        print(f"torch: {spec} from {index}")
        return pip(spec, "--index-url", index, "--extra-index-url", "https://pypi.org/simple")
    if shutil.which("nvidia-smi"):
        print(f"torch: {spec}, the default (CUDA) build: this machine has an NVIDIA driver")
        return pip(spec)
    if answers(CPU_INDEX):
        print(f"torch: {spec}, the CPU build from {CPU_INDEX}")
        return pip(spec, "--index-url", CPU_INDEX, "--extra-index-url", "https://pypi.org/simple")
    # Local wheels only for torch itself; its pure-Python dependencies come from the usual index.
    print(f"torch: {CPU_INDEX} does not answer; looking for a local CPU wheel of {spec}")
    if pip("--no-index", "--no-deps", spec) != 0:
        print(
            "torch: no CPU build found. Set TORCH_INDEX_URL to a wheel index you can reach (or TORCH_SPEC to a "
            "wheel file), e.g. make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128",
            file=sys.stderr,
        )
        return 1
    return pip(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
