"""The lock files pin every dependency pyproject.toml names, at versions its ranges allow, with
hashes (the image and `make install` install from them with --require-hashes)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    found = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", text, re.MULTILINE))
    entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text)
    for entry in entries[1:]:
        assert "--hash=sha256:" in entry, entry.splitlines()[0]
    return {canonicalize_name(k): v for k, v in found.items()}


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", []), ("requirements-dev.lock", ["dev", "bench"])])
def test_every_dependency_is_pinned_within_its_range(lock: str, extras: list[str]) -> None:
    pinned = pins(lock)
    wanted = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in {lock}: run make lock"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{lock}: {req.name}=={pinned[name]} not {req}"


@pytest.mark.parametrize("variable", ["GATEWAY_HTTP__PORT", "GATEWAY_HTTP_PORT"])
def test_the_image_health_check_asks_the_configured_port(variable: str) -> None:
    """The Dockerfile's HEALTHCHECK command, run as the image runs it, against a port that answers
    /healthz: the configured one, by either name."""
    import http.server
    import json
    import os
    import subprocess
    import sys
    import threading

    line = next(x for x in (ROOT / "Dockerfile").read_text().splitlines() if x.strip().startswith('CMD ["python"'))
    argv = json.loads(line.strip().removeprefix("CMD "))
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server.RequestHandlerClass = Healthz
    threading.Thread(target=server.handle_request, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env[variable] = str(server.server_address[1])
    try:
        done = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30)
    finally:
        server.server_close()
    assert done.returncode == 0, done.stderr
