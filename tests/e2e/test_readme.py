"""The README's promise, from a fresh clone: `make run`, then a request published as shown comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from testkit import ROOT, free_port

pytestmark = pytest.mark.e2e


def test_fresh_clone_make_run_answers_the_readme_request(tmp_path: Path, services: None) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    readme = (clone / "README.md").read_text()
    assert "make run" in readme
    send_line = next(line.strip() for line in readme.splitlines() if line.strip().startswith(".venv/bin/gateway send"))

    http_port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "VIRTUAL_ENV"))}
    env.update(GATEWAY_HTTP__PORT=str(http_port), GATEWAY_SANDBOX_PORT=str(sandbox_port), PYTHON=sys.executable)
    log = (tmp_path / "make-run.log").open("wb")
    run = subprocess.Popen(
        ["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600  # the first `make run` creates the venv and installs
        while time.monotonic() < deadline:
            assert run.poll() is None, (tmp_path / "make-run.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("make run did not become ready:\n" + (tmp_path / "make-run.log").read_text()[-3000:])

        sent = subprocess.run(
            ["/bin/sh", "-c", send_line], cwd=clone, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("accepted  unique_id="), sent.stdout + sent.stderr
        assert "published" in sent.stderr
        assert "to account demo" in sent.stderr
    finally:
        os.killpg(run.pid, signal.SIGTERM)  # as Ctrl-C would: make and the gateway both get it
        run.wait(60)
        log.close()
    output = (tmp_path / "make-run.log").read_text()
    assert '"clean": true' in output, output[-3000:]  # the gateway drained and stopped by itself
