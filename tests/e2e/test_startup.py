"""Start-up as an operator meets it: configuration mistakes end with one line naming the variable
and exit code 2; an unreachable broker or Redis is retried (one log line per try, /readyz 503,
/healthz 200) and SIGTERM still ends the process cleanly."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from testkit import AMQP_URL, Process, free_port, gateway_env

pytestmark = pytest.mark.e2e

NO_TRACEBACK = "Traceback"


def gateway(tmp: Path, *args: str, **settings: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway <args>` with these GATEWAY_* settings, within 60 s."""
    defaults: dict[str, object] = {
        "state_path": str(tmp / "state.sqlite3"),
        "http_port": 0,
        "sandbox_port": free_port(),
    }
    env = gateway_env(**{**defaults, **settings})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"log_level": "LOUD"}, "GATEWAY_LOG_LEVEL"),
        ({"retry_schedule_s": "[1, x]"}, "GATEWAY_RETRY_SCHEDULE_S"),
        ({"retry_schedule_s": "1,-5"}, "GATEWAY_RETRY_SCHEDULE_S"),
        ({"max_attempts": "zero"}, "GATEWAY_MAX_ATTEMPTS"),
        ({"amqp_url": AMQP_URL.replace("guest:guest", "guest:wrong")}, "GATEWAY_AMQP_URL"),
        ({"amqp_url": AMQP_URL + "no-such-vhost"}, "GATEWAY_AMQP_URL"),
        ({"redis_url": "redis://:not-the-password@127.0.0.1:6379/0"}, "GATEWAY_REDIS_URL"),
        ({"redis_url": "redis://127.0.0.1:6379/0?no_such_option=1"}, "GATEWAY_REDIS_URL"),
        ({"accounts_file": "ACCOUNTS_YAML"}, "GATEWAY_ACCOUNTS_FILE"),
        ({"http_port": "BUSY"}, "GATEWAY_HTTP__PORT"),
        ({"sandbox_port": "BUSY"}, "GATEWAY_SANDBOX_PORT"),
        ({"amqp_url": "amqp//guest:not-the-password@127.0.0.1:5672/"}, "GATEWAY_AMQP_URL"),
        ({"redis_url": "redis//:not-the-password@127.0.0.1:6379"}, "GATEWAY_REDIS_URL"),
        ({"redis_url": "redis+sentinel://:not-the-password@127.0.0.1:26379"}, "GATEWAY_REDIS_URL"),
    ],
    ids=[
        "log-level",
        "schedule-json",
        "schedule-negative",
        "not-a-number",
        "password",
        "vhost",
        "redis-auth",
        "redis-option",
        "yaml",
        "web-port-in-use",
        "sandbox-port-in-use",
        "amqp-url-shape",
        "redis-url-shape",
        "sentinel-without-service",
    ],
)
def test_a_configuration_mistake_is_one_line_and_exit_2(
    tmp_path: Path, services: None, settings: dict[str, str], variable: str
) -> None:
    if settings.get("accounts_file") == "ACCOUNTS_YAML":
        path = tmp_path / "accounts.yaml"
        path.write_text("accounts:\n  - name: otp\n    provider: serwersms\n")
        settings = {"accounts_file": str(path)}
    with socket.socket() as taken:  # a port another process listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        settings = {k: busy if v == "BUSY" else v for k, v in settings.items()}
        done = gateway(tmp_path, "run", "--sandbox", log_format="json", **settings)
    assert done.returncode == 2, done.stderr[-2000:]
    assert NO_TRACEBACK not in done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stderr.strip().splitlines()]  # JSON asked for: every line
    last = lines[-1]
    assert last["event"] == "configuration_error"
    assert last["error"].startswith(variable)
    assert "not-the-password" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("command", "settings", "variable"),
    [
        (["dlq", "list"], {"amqp_url": AMQP_URL.replace("guest:guest", "guest:not-the-password")}, "GATEWAY_AMQP_URL"),
        (["dlq", "list"], {"amqp_url": AMQP_URL + "no-such-vhost"}, "GATEWAY_AMQP_URL"),
        (["config"], {"amqp_url": "amqp//guest:not-the-password@127.0.0.1:5672/"}, "GATEWAY_AMQP_URL"),
        (["config"], {"redis_url": "redis//:not-the-password@127.0.0.1:6379"}, "GATEWAY_REDIS_URL"),
        (["config"], {"redis_url": "redis+sentinel://:not-the-password@127.0.0.1:26379"}, "GATEWAY_REDIS_URL"),
        (["sandbox"], {"sandbox_port": "BUSY"}, "GATEWAY_SANDBOX_PORT"),
    ],
    ids=["password", "vhost", "amqp-url-shape", "redis-url-shape", "sentinel-without-service", "sandbox-port"],
)
def test_the_cli_reads_a_configuration_mistake_as_run_does(
    tmp_path: Path, services: None, command: list[str], settings: dict[str, str], variable: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        settings = {k: busy if v == "BUSY" else v for k, v in settings.items()}
        args = [*command, "--sandbox"] if command == ["config"] else command
        done = gateway(tmp_path, *args, **settings)
    assert done.returncode == 2, done.stdout + done.stderr
    assert NO_TRACEBACK not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"gateway: configuration error: {variable}: "), line
    assert "not-the-password" not in done.stdout + done.stderr


def test_a_comma_separated_retry_schedule_is_read(tmp_path: Path) -> None:
    done = gateway(tmp_path, "config", "--sandbox", retry_schedule_s="1, 5,30")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["retry_schedule_s"] == [1.0, 5.0, 30.0]


@pytest.mark.parametrize(
    ("settings", "event"),
    [
        ({"amqp_url": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}, "broker_unreachable"),
        ({"redis_url": f"redis://127.0.0.1:{free_port()}/0"}, "state_store_unreachable"),
    ],
    ids=["broker", "redis"],
)
def test_an_unreachable_service_is_retried_and_sigterm_still_ends_the_process(
    tmp_path: Path, services: None, settings: dict[str, str], event: str
) -> None:
    port = free_port()
    env = gateway_env(state_path=str(tmp_path / "state.sqlite3"), http_port=port, sandbox_port=free_port(), **settings)
    proc = Process(["run", "--sandbox"], env, tmp_path / "gateway.log")
    try:
        proc.wait_http(port, "/healthz")
        deadline = time.monotonic() + 20
        while proc.log().count(f'"event": "{event}"') < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 503
        assert any(p.startswith("starting: waiting for the") for p in ready.json()["problems"])
        assert proc.terminate(timeout=20) == 0
    finally:
        proc.close()
    lines = [json.loads(line) for line in proc.log().splitlines()]  # every line is one JSON object
    tries = [x for x in lines if x["event"] == event]
    assert len(tries) >= 2
    assert [x["attempt"] for x in tries[:2]] == [1, 2]
    assert tries[0]["retry_in_s"] < tries[1]["retry_in_s"]  # backing off
    assert NO_TRACEBACK not in proc.log()


def test_a_misspelled_variable_is_warned_about_by_name(tmp_path: Path) -> None:
    port = free_port()
    env = gateway_env(sandbox_port=port, account_file="accounts.json")  # GATEWAY_ACCOUNTS_FILE is meant
    proc = Process(["sandbox"], env, tmp_path / "sandbox.log")
    try:
        proc.wait_http(port, "/_sandbox/ledger")  # GATEWAY_SANDBOX_PORT is honoured
    finally:
        assert proc.terminate() == 0
        proc.close()
    warnings = [json.loads(line) for line in proc.log().splitlines() if "unknown_setting" in line]
    assert [w["variable"] for w in warnings] == ["GATEWAY_ACCOUNT_FILE"]


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert done.stdout.startswith("gateway 0.")


SECRET = "hunter2-secret"


@pytest.mark.parametrize(
    "settings",
    [
        {"amqp_url": f"amqp//guest:{SECRET}@127.0.0.1:5672/"},  # malformed: retried, logged each time
        {"amqp_url": f"amqp://guest:{SECRET}@127.0.0.1:5672/"},  # refused login
        {"amqp_url": f"amqps://guest:{SECRET}@127.0.0.1:5672/"},  # TLS to a plain port
        {"redis_url": f"redis://:{SECRET}@127.0.0.1:6379/0"},  # a password Redis does not have
        {"redis_url": f"rediss+sentinel://:{SECRET}@127.0.0.1:6379/mymaster"},  # TLS asked for: used
    ],
    ids=["malformed-url", "refused-login", "amqp-tls", "redis-auth", "sentinel-tls"],
)
def test_start_up_failures_are_json_lines_that_never_show_the_secret(
    tmp_path: Path, services: None, settings: dict[str, str]
) -> None:
    env = gateway_env(
        state_path=str(tmp_path / "state.sqlite3"), http_port=0, sandbox_port=free_port(), log_format="json", **settings
    )
    proc = Process(["run", "--sandbox"], env, tmp_path / "gateway.log")
    try:
        deadline = time.monotonic() + 15
        while proc.popen.poll() is None and time.monotonic() < deadline and proc.log().count("\n") < 8:
            time.sleep(0.2)
        if proc.popen.poll() is None:
            assert proc.terminate(timeout=20) == 0
    finally:
        proc.close()
    log = proc.log()
    assert SECRET not in log
    lines = [json.loads(line) for line in log.splitlines()]  # every line is one JSON object
    failures = [x for x in lines if x["level"] in ("error", "warning")]
    assert failures, log[-2000:]
    if settings.get("redis_url", "").startswith("rediss+sentinel"):
        # Not a plain connection to the plain port: TLS was tried and failed, or the address is no Sentinel.
        assert any("SSL" in json.dumps(x) or "TLS" in json.dumps(x) for x in failures), log[-2000:]
