"""The docs follow the code: the configuration reference is what the settings say, every page the
README links exists, and the README stays short."""

from __future__ import annotations

import re

from gateway.config import GROUPS, Settings, env_name
from gateway.ops import settings_doc
from testkit import ROOT

DOCS = ROOT / "docs"


def test_the_configuration_reference_is_what_the_settings_say() -> None:
    """Run `make docs` after adding or describing a setting; this fails until the page is updated."""
    page = (DOCS / "configuration.md").read_text()
    assert settings_doc.render(page) == page, "docs/configuration.md is stale: run `make docs`"
    for name in Settings.model_fields:
        if name not in GROUPS:
            assert f"`{env_name(name)}`" in page
    for group, model in GROUPS.items():
        for name in model.model_fields:
            assert f"`{env_name(f'{group}.{name}')}`" in page


def test_a_setting_without_a_description_would_show() -> None:
    for name, info in Settings.model_fields.items():
        assert name in GROUPS or info.description, name


def test_every_link_between_the_readme_and_the_docs_leads_somewhere() -> None:
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().exists(), f"{page.name} links {target}"


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
