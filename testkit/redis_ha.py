"""Redis deployments of the tests' own: a three-master Cluster, and a master, a replica and three
Sentinels. Every process is a `redis-server` on 127.0.0.1 without persistence."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from testkit.services import port_open


def _ports(n: int, bus_offset: int = 0) -> list[int]:
    """`n` free ports (and, with `bus_offset`, free port + offset: a cluster's bus ports)."""
    found: list[int] = []
    candidate = 21000 + secrets.randbelow(20000)
    while len(found) < n:
        candidate += 1
        if candidate > 50000:
            candidate = 21000
        if not port_open(candidate) and not (bus_offset and port_open(candidate + bus_offset)):
            found.append(candidate)
    return found


def _wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout} s")
        time.sleep(0.1)


def cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout


class RedisDeployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = ""

    def _server(self, *args: str) -> None:
        with (self.root / f"redis-{len(self.procs)}.log").open("ab") as log:
            self.procs.append(subprocess.Popen(["redis-server", *args], stdout=log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


class RedisCluster(RedisDeployment):
    def start(self) -> RedisCluster:
        ports = _ports(3, bus_offset=10000)
        for port in ports:
            self._server(
                *("--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"),
                *("--cluster-config-file", str(self.root / f"nodes-{port}.conf"), "--dir", str(self.root)),
                *("--save", "", "--appendonly", "no"),
            )
        _wait(lambda: all(port_open(p) for p in ports), "cluster nodes")
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"]
        subprocess.run(create, capture_output=True, timeout=60, check=True)
        _wait(lambda: all("cluster_state:ok" in cli(p, "cluster", "info") for p in ports), "cluster state ok")
        self.url = f"redis+cluster://127.0.0.1:{ports[0]}/0"
        return self


class RedisSentinels(RedisDeployment):
    SERVICE = "smsgw"

    def start(self) -> RedisSentinels:
        master, replica, *sentinels = _ports(5)
        self.sentinels = sentinels
        self._server("--port", str(master), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        _wait(lambda: port_open(master), "master")
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
        _wait(lambda: all(port_open(p) for p in [replica, *sentinels]), "replica and sentinels")
        _wait(lambda: "master_link_status:up" in cli(replica, "info", "replication"), "replication")
        _wait(lambda: all("slaves=1" in cli(p, "info", "sentinel") for p in sentinels), "sentinels see the replica")
        _wait(lambda: all("sentinels=3" in cli(p, "info", "sentinel") for p in sentinels), "sentinels see each other")
        hosts = ",".join(f"127.0.0.1:{p}" for p in sentinels)
        self.url = f"redis+sentinel://{hosts}/{self.SERVICE}/0"
        return self

    def master_port(self) -> int:
        addr = cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", self.SERVICE).split()
        return int(addr[1])

    def failover(self) -> None:
        cli(self.sentinels[0], "sentinel", "failover", self.SERVICE)
