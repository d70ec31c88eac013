"""The configuration reference (docs/configuration.md) from the settings' own descriptions.

The page is written by hand except between `<!-- generated:NAME -->` and `<!-- /generated -->`,
where this module writes the tables: `python -m gateway.ops.settings_doc docs/configuration.md`
(`make docs`). A test regenerates the page and fails when it differs, so a setting added,
renamed or re-described without `make docs` cannot go unnoticed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.config import GROUPS, Account, Settings, env_name

_BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n).*?(<!-- /generated -->)", re.S)


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value: Any = info.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool | list | dict):
        value = json.dumps(value)
    return f"`{value}`"


def _row(name: str, info: FieldInfo) -> str:
    text = (info.description or "").replace("|", "\\|")
    return f"| `{name}` | {_default(info)} | {text} |"


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        if name in GROUPS:
            continue
        rows.append(_row(env_name(name), info))
    for group, model in GROUPS.items():
        for name, info in model.model_fields.items():
            rows.append(_row(env_name(f"{group}.{name}"), info))
    return "\n".join(rows)


def accounts_table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [_row(name, info) for name, info in Account.model_fields.items()]
    return "\n".join(rows)


TABLES = {"settings": settings_table, "accounts": accounts_table}


def render(page: str) -> str:
    """The page with each generated block written afresh."""

    def block(m: re.Match[str]) -> str:
        return f"{m.group(1)}{TABLES[m.group(2)]()}\n{m.group(3)}"

    return _BLOCK.sub(block, page)


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "docs/configuration.md")
    path.write_text(render(path.read_text()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
