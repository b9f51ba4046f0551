"""A worker's own metrics, recorded by the step loop of whichever pool process runs a job.

In a worker started with `--metrics-port`, PROMETHEUS_MULTIPROC_DIR is set before anything
imports prometheus_client, so every pool process writes its values there and the worker's main
process serves them all (prometheus-client's multiprocess mode). Elsewhere (the API, tests)
they are plain in-process metrics.
"""

from prometheus_client import Counter, Histogram

STEPS = Counter("gradstream_worker_steps", "Training steps this worker recorded and flushed")
FLUSHES = Counter("gradstream_worker_flushes", "Chunks this worker flushed to Redis")
FLUSH_SECONDS = Histogram(
    "gradstream_worker_flush_seconds",
    "Time to pack and write one chunk of steps (one Lua script)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
)
JOBS = Counter("gradstream_worker_attempts", "Attempts this worker ran, by outcome", ["outcome"])
