#!/usr/bin/env bash
# The GPU machine's checks in one call: the CUDA tests (tests/gpu), the GPU benchmarks (single
# jobs: bench/gpu_bench.py; sweeps' groups: bench/gpu_sweeps.py) and, on its 16 cores, the
# scale-out benchmark (bench/scale_out.py), in under 9 minutes on an H100 machine.
#
#   bench/gpu_check.sh prepare   here: fetch what the GPU machine lacks into .whl and .redis
#   bench/gpu_check.sh           there, from the repository root, with .whl and .redis carried
#
# The GPU machine has Python 3.12 with PyTorch but none of our other packages and no Redis:
# `prepare` downloads our packages' wheels (the versions in .venv) and copies this machine's
# redis-server with its libraries. Outputs go to $OUT (or bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine's image lacks (it has torch, numpy, httpx, anyio, click, rich, ...).
PACKAGES='fastapi|starlette|pydantic|pydantic_core|pydantic-settings|python-dotenv|typing-inspection'
PACKAGES+='|annotated-types|uvicorn|celery|kombu|billiard|vine|amqp|click-didyoumean'
PACKAGES+='|click-plugins|click-repl|prompt_toolkit|wcwidth|redis|typing_extensions|typer|click|tzlocal'
PACKAGES+='|opentelemetry-api|importlib_metadata|zipp|annotated-doc'
# The API opens the archive (services/archive.py) through fsspec at start; pyarrow, loaded
# only to archive or read archived steps, is left out (55 MB: over what the GPU machine takes).
PACKAGES+='|fsspec'

if [ "${1:-}" = prepare ]; then
    set -e
    rm -rf .whl .redis
    pins=$(.venv/bin/pip freeze | grep -iE "^($PACKAGES)==")
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pins
    mkdir -p .redis/lib
    binary=$(readlink -f "$(command -v redis-server)")
    cp "$binary" .redis/lib/redis-server.bin
    for lib in $(ldd "$binary" | awk '/=>/ {print $3}'); do
        case $(basename "$lib") in libc.so*|libm.so*|libstdc++*|libgcc_s*) ;; *) cp -L "$lib" .redis/lib/ ;; esac
    done
    printf '%s\n' '#!/bin/sh' 'here=$(dirname "$(readlink -f "$0")")' \
        'LD_LIBRARY_PATH="$here/lib" exec "$here/lib/redis-server.bin" "$@"' >.redis/redis-server
    chmod +x .redis/redis-server
    echo "prepared: $(ls .whl | wc -l) wheels in .whl, redis-server in .redis ($(du -sh .whl .redis | awk '{print $1}' | xargs))"
    exit 0
fi

out=${OUT:-bench/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
command -v redis-server >/dev/null || export PATH=$PWD/.redis:$PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
redis-server --version

echo "== CUDA tests (tests/gpu)"
timeout 200 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rA -s tests/gpu \
    2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}

echo "== GPU benchmark, single jobs (bench/gpu_bench.py)"
timeout 90 python3 bench/gpu_bench.py --cases 1000x10 100000x10 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}

echo "== GPU benchmark, sweeps (bench/gpu_sweeps.py)"
timeout 120 python3 bench/gpu_sweeps.py 2>&1 | tee "$out/gpu_sweeps.log"
sweeps=${PIPESTATUS[0]}

echo "== scale-out (bench/scale_out.py)"
timeout 150 python3 bench/scale_out.py 2>&1 | tee "$out/scale_out.log"
scale=${PIPESTATUS[0]}

echo "== tests exit $tests, bench exit $bench, sweeps exit $sweeps, scale-out exit $scale"
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -1
grep -E "us/step|bare eager" "$out/gpu_bench.log"
[ "$tests" = 0 ] && [ "$bench" = 0 ] && [ "$sweeps" = 0 ] && [ "$scale" = 0 ]
