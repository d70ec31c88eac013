"""The import-linter contracts hold on the tree: the layers (each imports only those below it) and
the core free of I/O libraries. Each breaks when a module imports up a layer, or a core module
imports the broker, HTTP or Redis client (directly or through another gateway module)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=120
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_the_contract(tree: Path) -> None:
    done = lint_imports(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("core/pipeline.py", "import aio_pika"),
        ("core/ratelimit.py", "import httpx"),
        ("core/batching.py", "import redis.asyncio"),
        ("providers/mobizon/codes.py", "import httpx"),
        ("core/retry.py", "from gateway.state import redis"),  # the Redis client, one step away
    ],
)
def test_a_core_module_importing_io_breaks_it(tree: Path, module: str, line: str) -> None:
    path = tree / "gateway" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "layers"),
    [
        ("core/pipeline.py", "from gateway.bus import settle", "gateway.core is not allowed to import gateway.bus"),
        ("state/base.py", "from gateway.core import retry", "gateway.state is not allowed to import gateway.core"),
        (
            "bus/publisher.py",
            "from gateway.dlr import desk",
            "gateway.bus is not allowed to import gateway.dlr",
        ),  # one layer, two parts
        ("obs/metrics.py", "from gateway import config", "gateway.obs is not allowed to import gateway.config"),
    ],
)
def test_an_import_up_a_layer_or_across_one_breaks_the_layers(tree: Path, module: str, line: str, layers: str) -> None:
    path = tree / "gateway" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert "Layers: each imports only the layers below it" in done.stdout
    assert layers in done.stdout
