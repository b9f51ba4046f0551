# make demo   run the tutorial's example through the whole local stack
# make test   lint, type-check and run the whole test suite
# Both set everything up first: .venv with the packages, node_modules (the dashboard's charts,
# npm ci), and redis-server if missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: demo test lint typecheck pytest test-cpu-kernels bench soak setup redis-server chromium compose-secrets clean

demo: setup
	$(BIN)/gradstream up --demo --port 0

test: setup chromium lint typecheck pytest

setup: $(STAMP) redis-server $(NODE_STAMP)

# The dashboard's charts (Apache ECharts) from the npm registry, as package-lock.json pins them;
# the API serves node_modules/echarts/dist/echarts.min.js. npm ci runs again only when the lock
# changes.
$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found (the dashboard's charts come from" \
	  "the npm registry). Install Node.js 20+ (Debian/Ubuntu: sudo apt-get install nodejs npm)" \
	  "and run make again." >&2; exit 1; }
	npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

# torch is pinned in pyproject.toml to the CPU build this machine keeps on disk; see README
# for the CUDA build on GPU nodes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# tests/test_failover.py's sentinels are this binary too (`redis-server sentinel.conf --sentinel`).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server not found. Install it (Debian/Ubuntu: sudo apt-get install redis-server;" \
	         "macOS: brew install redis) and run make again." >&2; \
	    exit 1; \
	  fi; }

# The dashboard's browser test drives Debian's chromium through chromedriver.
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver (Debian packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "chromium and chromedriver not found (the dashboard test needs them). Install them" \
	         "(Debian/Ubuntu: sudo apt-get install chromium chromium-driver) and run make again." >&2; \
	    exit 1; \
	  fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collected no tests: that is a failure here, not a pass. The test files
# run on PYTEST_WORKERS processes (pytest-xdist), a file's tests on one of them, as its module
# fixtures (stacks of its own) expect; each process starts its own session stack. Most tests
# wait on other processes (workers, Redis, uvicorn), so two halve the suite's time on 2 cores.
PYTEST_WORKERS ?= 2
pytest: $(STAMP) redis-server
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

# Not part of `make test`: the test files that compare numbers (to an oracle, across steppers,
# a resume against an uninterrupted run), again under torch's portable kernels and its AVX2
# ones, as on another CPU (README, "Testing on other CPUs"). The workers the tests start
# inherit ATEN_CPU_CAPABILITY.
NUMERIC_TESTS := tests/test_training.py tests/test_batched.py tests/test_group_steps.py \
	tests/test_compiled.py tests/test_optimizers.py tests/test_resume.py \
	tests/test_sweep_resume.py tests/test_explain.py tests/test_results.py tests/test_sweeps.py \
	tests/test_eval.py tests/test_end_to_end.py tests/test_datasets.py tests/test_storage.py \
	tests/test_faults.py tests/test_member_results.py tests/test_group_cancel.py \
	tests/test_sweep_scale.py tests/test_compiled_optimizers.py tests/test_sparse.py \
	tests/test_group_compiled_shape.py
CPU_CAPABILITIES ?= default avx2
test-cpu-kernels: $(STAMP) redis-server
	@for capability in $(CPU_CAPABILITIES); do \
	  echo "ATEN_CPU_CAPABILITY=$$capability"; \
	  ATEN_CPU_CAPABILITY=$$capability $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile \
	    $(NUMERIC_TESTS) || exit 1; \
	done

# Benchmarks (not part of `make test`); figures in bench/RESULTS.md.
bench: setup
	$(BIN)/python bench/step_loop.py
	$(BIN)/python bench/streaming.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/worker_memory.py
	$(BIN)/python bench/archive.py

# Not part of `make test`: jobs while workers are killed at random; 0 duplicates, 0 gaps.
soak: setup
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

# The secrets docker-compose.yml mounts (never committed): a Redis password and one API key.
compose-secrets:
	@mkdir -p secrets && chmod 700 secrets
	@test -s secrets/redis_password || python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > secrets/redis_password
	@test -s secrets/api_keys || python3 -c 'import secrets; print("default:" + secrets.token_urlsafe(24))' > secrets/api_keys
	@chmod 600 secrets/redis_password secrets/api_keys
	@echo "secrets/redis_password and secrets/api_keys ready; the API key: $$(cut -d: -f2- secrets/api_keys | head -1)"

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache *.egg-info
