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
