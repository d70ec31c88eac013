"""The state store contract shared by the Redis and SQLite backends.

Dedupe record per (account, unique_id), one of:
- in flight: a worker (`owner`) holds a claim until `lease_until`; nobody else may send it.
- unknown:   a send may or may not have reached the provider; the next claim must reconcile.
- done:      the terminal result, kept for the dedupe window; copies get `duplicate`.

`claim_and_acquire` decides atomically, for each id of a batch:
- NEW:       nothing was known; the caller now holds the claim and may send.
- DONE:      a result exists (returned).
- BUSY:      another live claim holds it; the caller must not send (wait and look again).
- RECONCILE: the record was unknown, or a claim whose lease ran out (a crashed worker); the caller
             now holds the claim and must ask the provider what happened before sending.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class ClaimState(StrEnum):
    NEW = "new"
    DONE = "done"
    BUSY = "busy"
    RECONCILE = "reconcile"


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A terminal result as later copies report it (the `duplicate` outcome carries it)."""

    status: str
    provider: str | None
    provider_message_id: str | None = None
    parts: int | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    at: str | None = None

    def to_json(self) -> str:
        doc = {
            "status": self.status,
            "provider": self.provider,
            "provider_message_id": self.provider_message_id,
            "parts": self.parts,
            "error": self.error,
            "attempts": self.attempts,
            "at": self.at,
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StoredResult:
        return cls(**json.loads(text))


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    result: StoredResult | None = None


class Store(Protocol):
    async def claim_and_acquire(
        self, account: str, uids: list[str], owner: str, lease_s: float, rate: float, burst: int
    ) -> tuple[dict[str, Claim], int, float]:
        """Claim every id of a batch at once (see the module docstring), then take tokens from the
        account's bucket (as `acquire`) for the NEW claims, in one atomic step and one round trip:
        (claims, tokens granted, seconds until 1 more)."""
        ...

    async def peek(self, account: str, uids: list[str]) -> dict[str, StoredResult]:
        """Terminal results already known for these ids (ids without one are left out)."""
        ...

    async def complete(self, account: str, results: dict[str, StoredResult], ttl_s: float) -> None:
        """Store terminal results for the dedupe window; this ends the claims."""
        ...

    async def mark_unknown(self, account: str, uids: list[str], ttl_s: float) -> None:
        """The send may have happened: whoever claims next must reconcile first."""
        ...

    async def release(self, account: str, uids: list[str], owner: str) -> None:
        """The send surely did not happen: forget our claims so a retry starts clean."""
        ...

    async def acquire(self, key: str, want: int, rate: float, burst: int) -> tuple[int, float]:
        """Token bucket shared by every process using this store: (granted now, seconds until 1 more)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
