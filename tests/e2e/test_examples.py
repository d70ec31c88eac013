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


FILES = {
    "python": "python/send_sms.py",
    "node": "node/send_sms.js",
    "php": "php/send_sms.php",
    "go": "go/send_sms.go",
    "shell": "shell/send_sms.sh",
}


def header_command(path: Path) -> str:
    """The first run command in the example's header, as a user would copy it."""
    for line in path.read_text().splitlines()[:30]:
        text = line.strip().lstrip("/#").strip()
        if "SMS_TO=" in text:
            return text
    raise AssertionError(f"{path} names no command in its header")


def install(language: str) -> list[str]:
    """The header's install step, done by the test's own means (apt, npm ci from the lock file);
    the folders of the commands it brings, for PATH."""
    if language == "python":
        return [str(Path(sys.executable).parent)]  # `python` is this environment's, which has aio-pika
    if language == "node":
        npm_install(EXAMPLES / "node")
        return [str(Path(require("node")).parent)]
    if language == "shell":
        return [str(Path(require("amqp-publish")).parent), str(Path(require("amqp-consume")).parent)]
    return [str(Path(require(language)).parent)]


@pytest.mark.parametrize("language", ["python", "node", "php", "go", "shell"])
def test_example_producer_gets_its_outcome(language: str, ring: tuple[Sandbox, str], tmp_path: Path) -> None:
    sandbox, account = ring
    path = EXAMPLES / FILES[language]
    line = header_command(path)
    assert "SMS_ACCOUNT=demo " in line, line
    line = line.replace("SMS_ACCOUNT=demo ", f"SMS_ACCOUNT={account} ")  # the test's own account
    uid = f"example-{language}-{tmp_path.name}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "PATH": os.pathsep.join([*install(language), os.environ.get("PATH", "")]),
        "GOCACHE": str(tmp_path / "gocache"),
        "SMS_UNIQUE_ID": uid,
    }
    done = subprocess.run(
        ["sh", "-c", line], cwd=path.parent, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    OUTCOME.validate(outcome)
    assert (outcome["unique_id"], outcome["account"], outcome["status"]) == (uid, account, "accepted")
    assert outcome["lane"] == "urgent"  # a one-time code: each example publishes to the urgent lane
    assert sandbox.sends_of(account, uid) == 1
