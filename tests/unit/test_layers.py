"""The import-linter contract that keeps the core free of I/O libraries holds on the tree, and
breaks when a core module imports the broker, HTTP or Redis client (directly or through another
gateway module)."""

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
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("pipeline.py", "import aio_pika"),
        ("ratelimit.py", "import httpx"),
        ("batching.py", "import redis.asyncio"),
        ("providers/mobizon/codes.py", "import httpx"),
        ("retry.py", "from gateway import topology"),  # aio-pika, one step away
    ],
)
def test_a_core_module_importing_io_breaks_it(tree: Path, module: str, line: str) -> None:
    path = tree / "gateway" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout
