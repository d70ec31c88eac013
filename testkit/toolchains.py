"""The other languages' toolchains the contract tests and producer examples need: installed by
the test set-up when missing (npm packages into the example's own folder, Debian packages with
apt-get), and failing loudly when they cannot be."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# command -> the Debian packages that bring it (and the libraries the examples import)
DEBIAN = {
    "node": ["nodejs", "npm"],
    "npm": ["npm"],
    "php": ["php-cli", "php-amqplib"],
    "go": ["golang-go", "golang-github-rabbitmq-amqp091-go-dev"],
    "amqp-publish": ["amqp-tools"],
    "amqp-consume": ["amqp-tools"],
}
# files whose absence means the library part of a package is missing although its command exists
LIBRARIES = {
    "php": Path("/usr/share/php/PhpAmqpLib"),
    "go": Path("/usr/share/gocode/src/github.com/rabbitmq/amqp091-go"),
}


def require(command: str) -> str:
    """The command's path, after installing its Debian packages when it (or its library) is missing."""
    path = shutil.which(command)
    library = LIBRARIES.get(command)
    if path is None or (library is not None and not library.exists()):
        packages = DEBIAN[command]
        done = _apt("install", "-y", "-q", "--no-install-recommends", *packages)
        if done.returncode != 0:  # stale package lists: refresh them once
            _apt("update", "-q")
            done = _apt("install", "-y", "-q", "--no-install-recommends", *packages)
        if done.returncode != 0:
            raise RuntimeError(f"cannot install {packages} for {command}: {done.stderr[-2000:]}")
        path = shutil.which(command)
    if path is None:
        raise RuntimeError(f"{command} is not installed and could not be: install {' '.join(DEBIAN[command])}")
    return path


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=900, check=False)


def npm_install(folder: Path) -> None:
    """`npm ci` from the folder's committed lock file, once (node_modules/ is not committed)."""
    if (folder / "node_modules" / ".package-lock.json").exists():
        return
    require("node")
    npm = require("npm")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"npm ci in {folder} failed: {done.stderr[-2000:]}")
