"""Redis deployments of the tests' own: a three-master Cluster, and a master, a replica and three
Sentinels. Every process is a `redis-server` on 127.0.0.1 without persistence."""

from __future__ import annotations

import subprocess
from pathlib import Path

from testkit.services import free_ports, port_open, wait_until


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
        ports = free_ports(3, offset=10000)
        for port in ports:
            self._server(
                *("--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"),
                *("--cluster-config-file", str(self.root / f"nodes-{port}.conf"), "--dir", str(self.root)),
                *("--save", "", "--appendonly", "no"),
            )
        wait_until(lambda: all(port_open(p) for p in ports), "cluster nodes")
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"]
        subprocess.run(create, capture_output=True, timeout=60, check=True)
        wait_until(lambda: all("cluster_state:ok" in cli(p, "cluster", "info") for p in ports), "cluster state ok")
        self.url = f"redis+cluster://127.0.0.1:{ports[0]}/0"
        return self


class RedisSentinels(RedisDeployment):
    SERVICE = "smsgw"

    def start(self) -> RedisSentinels:
        master, replica, *sentinels = free_ports(5)
        self.sentinels = sentinels
        self._server("--port", str(master), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        wait_until(lambda: port_open(master), "master")
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
        wait_until(lambda: all(port_open(p) for p in [replica, *sentinels]), "replica and sentinels")
        wait_until(lambda: "master_link_status:up" in cli(replica, "info", "replication"), "replication")
        wait_until(
            lambda: all("slaves=1" in cli(p, "info", "sentinel") for p in sentinels), "sentinels see the replica"
        )
        wait_until(
            lambda: all("sentinels=3" in cli(p, "info", "sentinel") for p in sentinels), "sentinels see each other"
        )
        hosts = ",".join(f"127.0.0.1:{p}" for p in sentinels)
        self.url = f"redis+sentinel://{hosts}/{self.SERVICE}/0"
        return self

    def master_port(self) -> int:
        addr = cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", self.SERVICE).split()
        return int(addr[1])

    def failover(self) -> None:
        cli(self.sentinels[0], "sentinel", "failover", self.SERVICE)
