"""TLS to RabbitMQ and Redis, against a RabbitMQ node and a redis-server of the test's own with
certificates the test generates (trustme): the gateway consumes and publishes over `amqps://`
(with a client certificate, the node requiring one) and keeps its state over `rediss://`, both
verifying the server against the CA bundle; a wrong CA bundle ends start-up with one line."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

from testkit import (
    Bus,
    Process,
    Sandbox,
    account_doc,
    free_port,
    free_ports,
    gateway_env,
    new_account_name,
    port_open,
    request,
    wait_until,
)
from tests.chaos.harness import RabbitNode

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@dataclass
class Tls:
    amqps_port: int
    redis_port: int
    ca: str
    client_cert: str
    client_key: str
    wrong_ca: str  # a CA bundle that did not sign the servers' certificates

    def amqp(self, ca: str | None = None) -> str:
        """amqps:// with the CA bundle and the client certificate (the node requires one)."""
        return (
            f"amqps://guest:guest@127.0.0.1:{self.amqps_port}/?cafile={quote(ca or self.ca)}"
            f"&certfile={quote(self.client_cert)}&keyfile={quote(self.client_key)}"
        )

    def redis(self, ca: str | None = None) -> str:
        """rediss:// with the CA bundle, server verification required."""
        return f"rediss://127.0.0.1:{self.redis_port}/0?ssl_ca_certs={quote(ca or self.ca)}&ssl_cert_reqs=required"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    root = tmp_path_factory.mktemp("tls")
    # The node runs as the rabbitmq user, which cannot enter pytest's private temporary directory.
    node_root = Path(tempfile.mkdtemp(prefix="smsgw-tls-"))
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("sms-gateway")
    certs = node_root / "tlsnode" / "certs"  # inside the node's directory: it is handed to the rabbitmq user
    certs.mkdir(parents=True)
    ca.cert_pem.write_to_path(certs / "ca.pem")
    server.cert_chain_pems[0].write_to_path(certs / "server.pem")
    server.private_key_pem.write_to_path(certs / "server.key")
    client.cert_chain_pems[0].write_to_path(root / "client.pem")
    client.private_key_pem.write_to_path(root / "client.key")
    other.cert_pem.write_to_path(root / "wrong-ca.pem")
    amqps_port, redis_port = free_ports(1, offset=20000)[0], free_port()  # node: AMQPS port + 20000
    conf = "\n".join(
        [
            "listeners.tcp = none",
            f"listeners.ssl.default = 127.0.0.1:{amqps_port}",
            f"ssl_options.cacertfile = {certs / 'ca.pem'}",
            f"ssl_options.certfile = {certs / 'server.pem'}",
            f"ssl_options.keyfile = {certs / 'server.key'}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "loopback_users = none",
            "",
        ]
    )
    node = RabbitNode("tlsnode", amqps_port, node_root, conf=conf)
    node.start()
    redis = subprocess.Popen(
        [
            "redis-server",
            *("--port", "0", "--tls-port", str(redis_port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(certs / "server.pem"), "--tls-key-file", str(certs / "server.key")),
            *("--tls-ca-cert-file", str(certs / "ca.pem"), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: port_open(redis_port), "redis-server with TLS", timeout=20, interval=0.05)
        yield Tls(
            amqps_port,
            redis_port,
            str(certs / "ca.pem"),
            str(root / "client.pem"),
            str(root / "client.key"),
            str(root / "wrong-ca.pem"),
        )
    finally:
        redis.kill()
        redis.wait(10)
        with contextlib.suppress(Exception):
            node.stop()
        shutil.rmtree(node_root, ignore_errors=True)


async def test_the_gateway_works_over_amqps_and_rediss(
    tmp_path: Path, tls: Tls, sandbox_process: tuple[Process, Sandbox]
) -> None:
    _, sandbox = sandbox_process
    name = new_account_name()
    port = free_port()
    env = gateway_env(
        amqp_url=tls.amqp(), redis_url=tls.redis(), accounts=[account_doc(name, sandbox.port)], http_port=port
    )
    proc = Process(["run"], env, tmp_path / "gateway.log")
    try:
        proc.wait_http(port, timeout=60)
        async with Bus.open([name], url=tls.amqp()) as bus:
            await bus.publish(name, request("tls-1"))
            await bus.wait_for(outcomes=1, timeout=30)
        (doc,) = bus.outcome_docs()
        assert doc["status"] == "accepted"
        assert sandbox.sends_of(name, "tls-1") == 1
    finally:
        assert proc.terminate() == 0
        proc.close()


@pytest.mark.parametrize("which", ["amqp_url", "redis_url"])
def test_a_wrong_ca_bundle_ends_start_up_with_one_line(tmp_path: Path, tls: Tls, which: str) -> None:
    settings = {
        "amqp_url": tls.amqp(tls.wrong_ca if which == "amqp_url" else None),
        "redis_url": tls.redis(tls.wrong_ca if which == "redis_url" else None),
    }
    env = gateway_env(state_path=str(tmp_path / "s.sqlite3"), http_port=0, sandbox_port=free_port(), **settings)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--sandbox"], env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"start-up did not end: {str(exc.stderr)[-1500:]}") from None
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    line = json.loads(done.stderr.strip().splitlines()[-1])  # JSON logs: the error is a JSON line too
    assert line["event"] == "configuration_error", line
    last = line["error"]
    assert last.startswith(f"GATEWAY_{which.upper()}: TLS: "), last
    # OpenSSL's reason for the failed check: its verify message, or the alert the server sent
    reasons = ("self-signed certificate", "unable to get local issuer", "certificate verify failed", "unknown ca")
    assert any(reason in last.lower() for reason in reasons), last
