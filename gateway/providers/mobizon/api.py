"""One Mobizon API call: the form encoding, the JSON envelope, and the wrong-host redirect.

`https://{host}/service/{Module}/{Method}?apiKey=...&output=json&api=v1`, parameters as an
`application/x-www-form-urlencoded` body in PHP bracket notation; every answer is HTTP 200 with
`{"code", "data", "message"}`. A code whose table action is REDIRECT (13, wrong regional host)
names the right host in `data`: followed once per call, and remembered for the life of the client.
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.config import Account
from gateway.obs.logs import get_logger
from gateway.providers.base import Action, CodeTable, ItemResult, Outbound
from gateway.providers.http import decode_json, make_client, traced_post
from gateway.providers.mobizon.codes import NAME, TABLE, is_redirect, number

log = get_logger("gateway.providers.mobizon")


def digits(phone: str) -> str:
    return phone.lstrip("+")


def ident(value: Any) -> str | None:
    """Ids come as strings or integers."""
    if value is None or isinstance(value, bool):
        return None
    return str(value)


def flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """PHP bracket notation: {"data": {"text": "x"}} -> data[text]=x; lists -> name[0]=..."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}[{k}]" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            flatten(f"{prefix}[{i}]", v, out)
    elif value is not None:
        out.append((prefix, "1" if value is True else "0" if value is False else str(value)))
    return out


def options(item: Outbound) -> dict[str, Any]:
    """The message's `params` (single send) or campaign `data` fields: send time and flash."""
    params: dict[str, Any] = {}
    if item.send_at is not None:
        params["deferredToTs"] = item.send_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if item.flash:
        params["mclass"] = 0
    return params


def redirect_host(data: Any) -> str | None:
    """Code 13's `data` names the right host: a string, or an object holding one (shape unknown)."""
    if isinstance(data, str) and data.strip():
        return data.strip()
    if isinstance(data, dict):
        for key in ("domain", "host", "server", "apiServer", "url"):
            if isinstance(data.get(key), str) and data[key].strip():
                return str(data[key]).strip()
        for value in data.values():
            if isinstance(value, str) and "." in value:
                return value.strip()
    return None


class MobizonApi:
    """The account's HTTP client, its current host, and a gate of `concurrency` calls in flight."""

    def __init__(
        self, account: Account, client: httpx.AsyncClient | None = None, *, proxy_from_env: bool = False
    ) -> None:
        if account.api_key is None:
            raise ValueError(f"account {account.name!r}: Mobizon needs api_key")
        self.account = account.name
        self._base = account.base_url
        self._client = client or make_client(
            account.base_url,
            account.http_timeout_s,
            max(account.concurrency, account.max_concurrency),
            proxy_from_env=proxy_from_env,
        )
        self._query = {"output": "json", "api": "v1", "apiKey": account.api_key.get_secret_value()}
        self.gate = asyncio.Semaphore(account.concurrency)

    def __repr__(self) -> str:
        return f"MobizonApi(account={self.account!r})"

    async def call(self, method: str, params: dict[str, Any]) -> tuple[Any, ItemResult | None]:
        """(`{code, data, message}` document, None) or (None, the failure for every item of the call).
        Raises httpx.HTTPError for transport failures."""
        for redirected in (False, True):
            response = await traced_post(
                self._client,
                f"{self._base}/service/{method}",
                account=self.account,
                provider=NAME,
                form=flatten("", params, []),
                params=self._query,
            )
            doc, failure = decode_json(response)
            if failure is not None:
                return None, failure
            if not isinstance(doc, dict) or "code" not in doc:
                return None, ItemResult.failure("bad_response", "BadResponse", "answer has no code", Action.AMBIGUOUS)
            if is_redirect(doc["code"]) and not redirected:
                host = redirect_host(doc.get("data"))
                if host is not None:
                    self._follow(host)
                    continue
            return doc, None
        return doc, None

    def _follow(self, host: str) -> None:
        scheme = urlsplit(self._base).scheme or "https"
        target = host if "://" in host else f"{scheme}://{host}"
        log.warning("mobizon_host_moved", account=self.account, host=urlsplit(target).netloc)
        self._base = target.rstrip("/")

    @staticmethod
    def failure(doc: dict[str, Any], table: CodeTable = TABLE) -> ItemResult:
        """The answer's code as a result, logged with the raw answer when the table lacks it."""
        return table.classify(doc.get("code"), str(doc.get("message") or ""), answer=doc)

    async def close(self) -> None:
        await self._client.aclose()


def succeeded(doc: dict[str, Any], ok: set[int]) -> bool:
    return number(doc.get("code")) in ok
