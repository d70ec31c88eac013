"""Processes: the sandbox (and its control API) and gateways, as `python -m gateway` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.config import env_name
from gateway.providers.base import provider_ref
from testkit.services import free_port


class Sandbox:
    """The sandbox's control API over HTTP."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def ledger(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"{self.url}/_sandbox/ledger", timeout=10).json()
        return doc

    def fault(self, **rule: Any) -> int:
        response = httpx.post(f"{self.url}/_sandbox/faults", json=rule, timeout=10)
        response.raise_for_status()
        return int(response.json()["id"])

    def faults(self) -> list[dict[str, Any]]:
        """The armed fault rules (a rule with a `count` leaves the list once it has fired that often)."""
        doc: list[dict[str, Any]] = httpx.get(f"{self.url}/_sandbox/faults", timeout=10).json()
        return doc

    def configure(self, **config: Any) -> dict[str, Any]:
        """Sandbox settings (duplicate control, Mobizon's host and limits, the delivery lifecycle)."""
        response = httpx.post(f"{self.url}/_sandbox/config", json=config, timeout=10)
        response.raise_for_status()
        doc: dict[str, Any] = response.json()
        return doc

    def poll_times(self) -> dict[str, list[float]]:
        """When each provider message id's status was polled."""
        doc: dict[str, list[float]] = httpx.get(f"{self.url}/_sandbox/polls", timeout=10).json()
        return doc

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_sandbox/faults", timeout=10).raise_for_status()

    def sends_of(self, account: str, uid: str) -> int:
        return int(self.ledger()["by_unique_id"].get(provider_ref(account, uid), 0))


def gateway_env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    for key, value in settings.items():
        env[env_name(key)] = value if isinstance(value, str) else json.dumps(value)
    return env


class Process:
    """A `gateway` subprocess with its output in a log file (read it when a test fails)."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
        *,
        command: list[str] | None = None,
    ) -> None:
        """`python -m gateway <args>`, or any `command`."""
        self.log_path = log_path
        self._log = log_path.open("ab")
        argv = command if command is not None else [sys.executable, "-m", "gateway", *args]
        self.popen = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, port: int, path: str = "/readyz", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited with {self.popen.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready on :{port}{path} after {timeout}s:\n{self.log()[-3000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)

    def close(self) -> None:
        self.kill()
        self._log.close()


def start_sandbox(tmp: Path) -> tuple[Process, Sandbox]:
    port = free_port()
    proc = Process(["sandbox", "--port", str(port)], gateway_env(), tmp / f"sandbox-{port}.log")
    proc.wait_http(port, "/_sandbox/ledger")
    return proc, Sandbox(port)


def start_gateway(tmp: Path, accounts: list[dict[str, Any]], **settings: Any) -> tuple[Process, int]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    settings.setdefault("state_path", str(tmp / "state.sqlite3"))
    env = gateway_env(accounts=accounts, http_port=port, **settings)
    proc = Process(["run"], env, tmp / f"gateway-{port}.log")
    proc.wait_http(port)
    return proc, port
