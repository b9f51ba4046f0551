"""A Redis that fails over: a primary, a replica (`replicaof`) and three sentinels, each a real
redis-server process of a Stack on free ports, with passwords (Redis's and the sentinels'),
AOF and maxmemory/noeviction like every Redis the tests start.

The sentinels' timeouts are short (a primary silent for 1 s is down, 2 of 3 agree), so that a
failover takes a few seconds. `cut_replication` makes the replica miss what the primary
writes from then on, so that a failover after it loses the primary's last writes for
certain, which is what asynchronous replication can do at any failover.
"""

import secrets
import signal
import subprocess

import redis

from cli.stack import Stack, free_port, redis_server_binary, wait_until

MASTER = "gradstream"
QUORUM = 2


class ReplicatedRedis:
    """A primary, a replica and three sentinels, started on `stack` (stopped with it)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.password = secrets.token_urlsafe(16)
        self.sentinel_password = secrets.token_urlsafe(16)
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        """Primary, then its replica (once in sync), then the sentinels (once they all know
        the replica and each other, a failover can happen)."""
        auth = {"requirepass": self.password, "masterauth": self.password}
        # A replica syncs at once, not after the default 5 s wait for more replicas.
        self.processes[self.primary_port] = self.stack.start_redis_server(
            "redis-a", self.primary_port, repl_diskless_sync_delay="0", **auth
        )
        self.processes[self.replica_port] = self.stack.start_redis_server(
            "redis-b",
            self.replica_port,
            replicaof=f"127.0.0.1 {self.primary_port}",
            repl_diskless_sync_delay="0",
            **auth,
        )
        wait_until(lambda: self._link_up(self.replica_port), 30, "replica in sync")
        for port in self.sentinel_ports:
            self._start_sentinel(port)
        wait_until(self._sentinels_agree, 30, "sentinels know the replica and each other")

    def env(self) -> dict[str, str]:
        """The settings that point gradstream's processes at the sentinels."""
        return {
            "GRADSTREAM_REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
            "GRADSTREAM_REDIS_MASTER": MASTER,
            "GRADSTREAM_REDIS_SENTINEL_PASSWORD": self.sentinel_password,
        }

    @property
    def url(self) -> str:
        """A URL carrying Redis's password; its host is the first primary's (with sentinels
        set, only the password and database are read from it)."""
        return f"redis://:{self.password}@127.0.0.1:{self.primary_port}/0"

    def client(self, port: int) -> "redis.Redis":
        return redis.Redis(port=port, password=self.password, socket_connect_timeout=1)

    def primary(self) -> int:
        """The port of the primary the sentinels name now."""
        sentinel = redis.Redis(port=self.sentinel_ports[0], password=self.sentinel_password)
        try:
            _, port = sentinel.sentinel_get_master_addr_by_name(MASTER)
        finally:
            sentinel.close()
        return int(port)

    def kill_primary(self) -> int:
        """SIGKILL the primary (no shutdown, no last write to anyone); its port."""
        port = self.primary()
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        return port

    def wait_for_failover(self, old: int, timeout: float = 30) -> int:
        """Until the sentinels name another primary and it takes writes; its port."""
        wait_until(lambda: self.primary() != old, timeout, "sentinels' new primary")
        new = self.primary()
        wait_until(lambda: self._role(new) == "master", timeout, f"{new} promoted")
        return new

    def cut_replication(self) -> None:
        """From now on the replica receives nothing of the primary's writes: it drops its link
        and cannot authenticate to make a new one (what it holds stays consistent, as after
        any replication lag). It stays a candidate: the sentinels see a link down for
        moments only, and promote it when the primary goes."""
        replica = self.client(self.replica_port)
        try:
            replica.config_set("masterauth", "not-the-password")
            replica.client_kill_filter(_type="master")
        finally:
            replica.close()

    def _start_sentinel(self, port: int) -> None:
        config = self.stack.run_dir / f"sentinel-{port}.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"dir {self.stack.run_dir}",
                    "maxmemory 64mb",
                    "maxmemory-policy noeviction",
                    f"requirepass {self.sentinel_password}",
                    f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} {QUORUM}",
                    f"sentinel auth-pass {MASTER} {self.password}",
                    f"sentinel down-after-milliseconds {MASTER} 1000",
                    f"sentinel failover-timeout {MASTER} 5000",
                    "",
                ]
            )
        )
        argv = [redis_server_binary(), str(config), "--sentinel"]
        self.processes[port] = self.stack.spawn(f"sentinel-{port}", argv, self.stack.env())

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            sentinel = redis.Redis(port=port, password=self.sentinel_password)
            try:
                master = sentinel.sentinel_master(MASTER)
                replicas = sentinel.sentinel_slaves(MASTER)
            finally:
                sentinel.close()
            if master["num-other-sentinels"] < len(self.sentinel_ports) - 1:
                return False
            if not any(r["port"] == self.replica_port and not r["is_sdown"] for r in replicas):
                return False
        return True

    def _link_up(self, port: int) -> bool:
        client = self.client(port)
        try:
            return bool(client.info("replication").get("master_link_status") == "up")
        finally:
            client.close()

    def _role(self, port: int) -> str:
        client = self.client(port)
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()
