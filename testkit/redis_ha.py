"""Redis deployments of the tests' own: a three-master Cluster, and a master, a replica and three
Sentinels. Every process is a `redis-server` on 127.0.0.1 without persistence."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Self

from testkit.services import free_ports, port_open, wait_until


def cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout


class ServerDied(RuntimeError):
    """A `redis-server` exited while starting (a port taken after all, a bad option)."""


class RedisDeployment:
    ATTEMPTS = 3

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[tuple[Path, str]] = []  # each server's log, and its first arguments
        self.url = ""

    def start(self) -> Self:
        """Start the deployment; a server that dies on the way (its port taken between the check and
        its bind) costs another try on fresh ports, not the test session."""
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                self._start()
            except ServerDied:
                self.stop()
                if attempt == self.ATTEMPTS:
                    raise
            else:
                return self
        raise AssertionError("unreachable")

    def _start(self) -> None:
        raise NotImplementedError

    def _server(self, *args: str) -> None:
        log_path = self.root / f"redis-{len(self.logs)}.log"
        self.logs.append((log_path, " ".join(args[:2])))
        with log_path.open("ab") as log:
            self.procs.append(subprocess.Popen(["redis-server", *args], stdout=log, stderr=subprocess.STDOUT))

    def _listening(self, ports: list[int], what: str) -> None:
        """Wait until `ports` accept connections; fail at once, with the server's own words, when one
        of the servers has exited."""

        def ready() -> bool:
            for proc, (log, args) in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise ServerDied(f"{what}: redis-server {args} exited {proc.returncode}: {tail}")
            return all(port_open(p) for p in ports)

        wait_until(ready, what)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)
        self.procs.clear()
        self.logs.clear()  # the files stay (appended to by the next try)


class RedisCluster(RedisDeployment):
    def _start(self) -> None:
        ports = free_ports(3, offset=10000)
        for port in ports:
            self._server(
                *("--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"),
                *("--cluster-config-file", str(self.root / f"nodes-{port}.conf"), "--dir", str(self.root)),
                *("--save", "", "--appendonly", "no"),
            )
        self._listening(ports, "cluster nodes")
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"]
        subprocess.run(create, capture_output=True, timeout=60, check=True)
        wait_until(lambda: all("cluster_state:ok" in cli(p, "cluster", "info") for p in ports), "cluster state ok")
        self.url = f"redis+cluster://127.0.0.1:{ports[0]}/0"


class RedisSentinels(RedisDeployment):
    SERVICE = "smsgw"

    def _start(self) -> None:
        master, replica, *sentinels = free_ports(5)
        self.sentinels = sentinels
        self._server("--port", str(master), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        self._listening([master], "master")
        self._server(
            *("--port", str(replica), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--replicaof", "127.0.0.1", str(master)),
        )
        for port in sentinels:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 3000\n"
            )
            self._server(str(conf), "--sentinel")
        self._listening([replica, *sentinels], "replica and sentinels")
        wait_until(lambda: "master_link_status:up" in cli(replica, "info", "replication"), "replication")
        wait_until(
            lambda: all("slaves=1" in cli(p, "info", "sentinel") for p in sentinels), "sentinels see the replica"
        )
        wait_until(
            lambda: all("sentinels=3" in cli(p, "info", "sentinel") for p in sentinels), "sentinels see each other"
        )
        hosts = ",".join(f"127.0.0.1:{p}" for p in sentinels)
        self.url = f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def master_port(self) -> int:
        addr = cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", self.SERVICE).split()
        return int(addr[1])

    def failover(self) -> None:
        cli(self.sentinels[0], "sentinel", "failover", self.SERVICE)
