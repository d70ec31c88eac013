"""The producer examples in examples/, each run as a user would run it, against the real broker
and a running gateway: one request published, its outcome received (reply_to with the example's
own correlation_id, RabbitMQ's direct reply-to in Node.js, a queue bound to sms.outcomes in PHP),
the outcome valid against contract/outcome.schema.json, the SMS sent once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from testkit import ROOT, Sandbox, account_doc, delete_account_queues, new_account_name, start_gateway
from testkit import start_sandbox as start_sandbox_process
from testkit.toolchains import npm_install, require

# The first run on a machine installs Node.js, PHP, Go and the AMQP tools (apt, up to 15 min) and
# npm packages: the test's bound is above the installs' own.
pytestmark = [pytest.mark.e2e, pytest.mark.toolchains, pytest.mark.timeout(1800)]

EXAMPLES = ROOT / "examples"
OUTCOME = Draft202012Validator(json.loads((ROOT / "contract" / "outcome.schema.json").read_text()))


@pytest.fixture(scope="module")
def ring(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, str]]:
    """One sandbox and one gateway for all the examples."""
    import asyncio

    tmp = tmp_path_factory.mktemp("examples")
    sandbox_proc, sandbox = start_sandbox_process(tmp)
    name = new_account_name("ex")
    gateway, _port = start_gateway(tmp, [account_doc(name, sandbox.port)])
    try:
        yield sandbox, name
    finally:
        gateway.close()
        sandbox_proc.close()
        asyncio.run(delete_account_queues([name]))


def command(language: str, tmp: Path) -> tuple[list[str], Path, dict[str, str]]:
    extra: dict[str, str] = {}
    if language == "python":
        return [sys.executable, "send_sms.py"], EXAMPLES / "python", extra
    if language == "node":
        npm_install(EXAMPLES / "node")
        return [require("node"), "send_sms.js"], EXAMPLES / "node", extra
    if language == "php":
        return [require("php"), "send_sms.php"], EXAMPLES / "php", extra
    if language == "go":
        go = require("go")
        extra = {"GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(tmp / "gocache")}
        binary = tmp / "send_sms"
        built = subprocess.run(
            [go, "build", "-o", str(binary), "send_sms.go"],
            cwd=EXAMPLES / "go", env={**os.environ, **extra}, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
        return [str(binary)], EXAMPLES / "go", extra
    require("amqp-publish")
    require("amqp-consume")
    return ["sh", "send_sms.sh"], EXAMPLES / "shell", extra


@pytest.mark.parametrize("language", ["python", "node", "php", "go", "shell"])
def test_example_producer_gets_its_outcome(language: str, ring: tuple[Sandbox, str], tmp_path: Path) -> None:
    sandbox, account = ring
    argv, cwd, extra = command(language, tmp_path)
    uid = f"example-{language}-{tmp_path.name}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        **extra,
        "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2f",
        "SMS_ACCOUNT": account,
        "SMS_TO": "+48500600700",
        "SMS_UNIQUE_ID": uid,
    }
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    OUTCOME.validate(outcome)
    assert (outcome["unique_id"], outcome["account"], outcome["status"]) == (uid, account, "accepted")
    assert sandbox.sends_of(account, uid) == 1
