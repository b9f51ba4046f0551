"""`/metrics` in Prometheus's text format: the service's state read from Redis at each scrape
(jobs and sweeps by status, queue depth, live workers, steps, member-steps and flushes so far,
finished jobs not archived yet)
and this API process's event streams (clients and their lag)."""

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from services.events import JobStreams
from services.queue import CPU_QUEUE, GPU_QUEUE
from services.store import Store


class ServiceCollector(Collector):
    def __init__(self, store: Store, streams: JobStreams, hot_retention_s: float) -> None:
        self.store, self.streams = store, streams
        self.hot_retention_s = hot_retention_s

    def collect(self) -> Iterator[Metric]:
        stats = self.store.service_stats((CPU_QUEUE, GPU_QUEUE))
        by_status = GaugeMetricFamily("gradstream_jobs", "Jobs by status", labels=["status"])
        for status, count in stats.jobs.items():
            by_status.add_metric([status.value], count)
        yield by_status
        sweeps = GaugeMetricFamily("gradstream_sweeps", "Sweeps by status", labels=["status"])
        for sweep_status, count in stats.sweeps.items():
            sweeps.add_metric([sweep_status.value], count)
        yield sweeps
        queued = GaugeMetricFamily(
            "gradstream_queue_depth", "Messages waiting in a worker queue", labels=["queue"]
        )
        for queue, count in stats.queue_depth.items():
            queued.add_metric([queue], count)
        yield queued
        live: dict[str, int] = {}
        for worker in self.store.list_workers():
            live[worker.device] = live.get(worker.device, 0) + 1
        workers = GaugeMetricFamily("gradstream_workers", "Live workers", labels=["device"])
        for device, count in sorted(live.items()):
            workers.add_metric([device], count)
        yield workers
        yield CounterMetricFamily(
            "gradstream_steps",
            "Training steps stored (rate: steps per second)",
            value=stats.counters.get("steps", 0),
        )
        yield CounterMetricFamily(
            "gradstream_member_steps",
            "Sweep members' steps stored by group flushes (rate: member-steps per second)",
            value=stats.counters.get("member_steps", 0),
        )
        yield CounterMetricFamily(
            "gradstream_flushes",
            "Chunks of steps flushed by workers",
            value=stats.counters.get("flushes", 0),
        )
        in_redis, overdue = self.store.archive_backlog(self.hot_retention_s)
        yield GaugeMetricFamily(
            "gradstream_unarchived_jobs",
            "Finished jobs whose steps are still in Redis (the hot window)",
            value=in_redis,
        )
        yield GaugeMetricFamily(
            "gradstream_archive_overdue_jobs",
            "Finished jobs past the hot window not archived yet (growing: the archivers fail "
            "or fall behind)",
            value=overdue,
        )
        clients, lag, held = self.streams.watching()
        yield GaugeMetricFamily(
            "gradstream_sse_clients", "Event-stream clients of this API process", value=clients
        )
        yield GaugeMetricFamily(
            "gradstream_sse_max_lag", "Most events queued for one client of this process", value=lag
        )
        yield GaugeMetricFamily(
            "gradstream_sse_max_client_bytes",
            "Most bytes one client of this process holds (queued and in flight; the budget is "
            "GRADSTREAM_SSE_WATCHER_BYTES)",
            value=held,
        )
        in_use, most = self.streams.connections()
        connections = GaugeMetricFamily(
            "gradstream_sse_redis_connections",
            "This process's Redis connections for event streams: in use (a watched running job "
            "or sweep holds one) and the most (GRADSTREAM_SSE_REDIS_CONNECTIONS)",
            labels=["state"],
        )
        connections.add_metric(["in_use"], in_use)
        connections.add_metric(["max"], most)
        yield connections
        yield CounterMetricFamily(
            "gradstream_sse_backlog_reads",
            "Backlog pages this process read from Redis (shared by the watchers that need them)",
            value=self.streams.backlog_reads,
        )


def registry(store: Store, streams: JobStreams, hot_retention_s: float) -> CollectorRegistry:
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(ServiceCollector(store, streams, hot_retention_s))
    return collectors
