"""What every provider adapter speaks: outbound items, per-item verdicts, one error type.

Error tree (what an adapter can report for one message):

    ItemResult.verdict
      ACCEPTED    the provider took it (provider_message_id, parts)
      REJECTED    refused for good: the code table says permanent
      RETRY       not sent, safe to send again (e.g. connection refused, throttled)
      AMBIGUOUS   the request may have reached the provider: reconcile (lookup) before any resend
      UNDECIDED   a lookup could not tell whether it was sent: give up (`failed`), never resend blindly

Every error is a `ProviderError`: the contract's error record (code, type, message, retryable)
plus the `Action` of the provider's code table that produced it. The pipeline acts on the action,
never on a provider's literal codes:
    ACCOUNT   the account pauses            THROTTLE  the whole account slows down (state store)
    SPLIT     the items are sent again in two halves (`send_split`), down to single messages
    REDIRECT  followed inside the adapter (wrong regional host); a RETRY if it persists
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from gateway.contract import OutcomeError, Status
from gateway.obs.logs import get_logger
from gateway.segments import Encoding, Transliterate

if TYPE_CHECKING:
    from gateway.config import Account

log = get_logger("gateway.providers")
T = TypeVar("T")
R = TypeVar("R")


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"
    AMBIGUOUS = "ambiguous"
    UNDECIDED = "undecided"


class Action(Enum):
    """What a provider code means for the message (one column of each provider's code table)."""

    PERMANENT = "permanent"  # rejected, dead-lettered
    RETRYABLE = "retryable"  # retried through the broker
    ACCOUNT = "account"  # permanent for this message, and the account pauses
    ALREADY_ACCEPTED = "already_accepted"  # the provider has it already: reconcile, never resend
    SPLIT = "split"  # the request was too large: send it again in smaller pieces
    THROTTLE = "throttle"  # rate limited: retried, and the whole account slows down
    AMBIGUOUS = "ambiguous"  # the provider failed mid-way: reconcile, then retry
    REDIRECT = "redirect"  # wrong regional host: the adapter follows it once; if it persists, retry later


@dataclass(frozen=True, slots=True)
class CodeRule:
    type: str
    meaning: str
    action: Action


# What each action means for the one message: the verdict, and whether the error is retryable.
VERDICT_OF = {
    Action.PERMANENT: Verdict.REJECTED,
    Action.ACCOUNT: Verdict.REJECTED,
    Action.RETRYABLE: Verdict.RETRY,
    Action.ALREADY_ACCEPTED: Verdict.AMBIGUOUS,
    Action.SPLIT: Verdict.RETRY,
    Action.THROTTLE: Verdict.RETRY,
    Action.AMBIGUOUS: Verdict.AMBIGUOUS,
    Action.REDIRECT: Verdict.RETRY,
}


@dataclass(frozen=True, slots=True)
class ProviderError(OutcomeError):
    """One provider or transport error: the outcome's error record and the table's action."""

    action: Action = Action.PERMANENT

    @property
    def pause_account(self) -> bool:
        return self.action is Action.ACCOUNT

    @property
    def throttle(self) -> bool:
        return self.action is Action.THROTTLE

    @property
    def split(self) -> bool:
        return self.action is Action.SPLIT


@dataclass(frozen=True, slots=True)
class ItemResult:
    verdict: Verdict
    provider_message_id: str | None = None
    parts: int | None = None
    error: ProviderError | None = None

    @classmethod
    def failure(cls, code: str, type_: str, message: str, action: Action) -> ItemResult:
        verdict = VERDICT_OF[action]
        retryable = verdict in (Verdict.RETRY, Verdict.AMBIGUOUS)
        return cls(verdict, error=ProviderError(code, type_, message, retryable, action))

    @classmethod
    def from_rule(cls, code: str, rule: CodeRule, message: str | None = None) -> ItemResult:
        return cls.failure(code, rule.type, message or rule.meaning, rule.action)


UNKNOWN_TYPE = "Unknown"  # the error type of every code outside a provider's table


class CodeTable:
    """A provider's code table: every known code with its rule, and the rule of the unknown ones
    (logged with the raw answer, so a new code is seen the first time it comes)."""

    def __init__(self, provider: str, rules: Mapping[int, CodeRule], unknown: CodeRule) -> None:
        self.provider = provider
        self.rules = rules
        self.unknown = unknown

    def rule(self, code: Any) -> CodeRule | None:
        try:
            return self.rules.get(int(code))
        except (TypeError, ValueError):
            return None

    def classify(self, code: Any, message: str | None = None, *, answer: Any = None) -> ItemResult:
        rule = self.rule(code)
        if rule is None:
            rule = self.unknown
            if answer is not None:
                log.warning(f"{self.provider}_unknown_code", code=str(code)[:20], body=str(answer)[:500])
        return ItemResult.from_rule(str(code), rule, message or None)

    def __contains__(self, code: object) -> bool:
        return code in self.rules

    def __iter__(self) -> Any:
        return iter(self.rules)

    def __getitem__(self, code: int) -> CodeRule:
        return self.rules[code]


@dataclass(frozen=True, slots=True)
class Outbound:
    """One SMS as the provider will see it: number normalized, text rendered, ids derived."""

    unique_id: str  # the producer's id (dedupe key within the account)
    provider_ref: str  # deterministic provider-safe id derived from (account, unique_id)
    phone: str  # E.164 with the leading +
    text: str
    sender: str | None
    flash: bool = False
    test: bool = False
    send_at: datetime | None = None
    template: str | None = None  # the text before rendering, when it had placeholders
    vars: tuple[tuple[str, str], ...] = ()  # the placeholder values, sorted by name
    attempted_at: float | None = None  # epoch seconds of an earlier attempt whose fate is unknown
    encoding: Encoding = Encoding.GSM7  # what `text` needs (segments.py), after any transliteration
    parts: int = 1  # the parts `text` is sent in, counted locally
    transliterated: Transliterate = Transliterate.OFF  # the mapping that made `text` GSM-7, if any
    parts_saved: int = 0  # how many fewer parts than the text as written


def provider_ref(account: str, unique_id: str) -> str:
    """Deterministic provider-safe id for (account, unique_id): 32 lowercase letters and digits.

    SerwerSMS accepts [a-zA-Z0-9]{3,50}; the same request always maps to the same id, so a resend
    after a crash is recognisable at the provider and can be looked up there.
    """
    digest = hashlib.sha256(f"{account}\x00{unique_id}".encode()).hexdigest()
    return "g" + digest[:31]


def batch_key(item: Outbound) -> Hashable:
    """Both providers take one sender, flash flag, test flag and send time per request; SerwerSMS
    one encoding flag too (`utf`)."""
    return (item.sender, item.flash, item.test, item.send_at, item.encoding)


async def fan_out(items: Sequence[T], one: Callable[[T], Awaitable[R]], concurrency: int = 8) -> list[R]:
    """`one` for every item, at most `concurrency` at a time, results in order (lookups)."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(item: T) -> R:
        async with gate:
            return await one(item)

    return list(await asyncio.gather(*(gated(x) for x in items)))


async def send_split(
    send: Callable[[Sequence[Outbound]], Awaitable[list[ItemResult]]], batch: Sequence[Outbound]
) -> list[ItemResult]:
    """Send, and send again in two halves the items a SPLIT code answered while there are several
    (a request too large for the provider: SerwerSMS 3110, Mobizon 12), down to single messages;
    a single message still answered SPLIT keeps its retryable result."""
    results = await send(batch)
    again = [i for i, r in enumerate(results) if r.error is not None and r.error.split]
    if len(again) < 2:
        return results
    half = len(again) // 2
    first, second = await asyncio.gather(
        send_split(send, [batch[i] for i in again[:half]]), send_split(send, [batch[i] for i in again[half:]])
    )
    out = list(results)
    for i, result in zip(again, first + second, strict=True):
        out[i] = result
    return out


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What a provider says of one accepted message's delivery (a webhook or a poll)."""

    provider_message_id: str
    status: str  # the provider's own word: DELIVRD, UNDELIV, delivered, sent, ...
    final: Status | None  # DELIVERED or UNDELIVERED once the status is final, else None
    reason: str | None = None  # why it was not delivered, when the provider says
    at: datetime | None = None  # when the provider says the status changed, when its clock is known


class StatusTable:
    """A provider's delivery statuses: which are final, and how. Unknown words are logged and are
    not final (a later poll or the tracking window decides)."""

    def __init__(self, provider: str, statuses: Mapping[str, Status | None]) -> None:
        self.provider = provider
        self.statuses = statuses

    def report(
        self, message_id: str, status: Any, reason: str | None = None, at: datetime | None = None
    ) -> StatusReport:
        word = str(status or "").strip()
        if word not in self.statuses:
            log.warning(f"{self.provider}_unknown_status", status=word[:40], provider_message_id=message_id[:64])
        return StatusReport(message_id, word, self.statuses.get(word), reason or None, at)


class WebhookEvent(Protocol):
    """One webhook as read by its provider's `WebhookFormat`: only `event_id` is trusted, and only
    as far as the provider signs it; the report is a hint (a poll decides)."""

    @property
    def event_id(self) -> str: ...

    @property
    def report(self) -> StatusReport | None:  # None: an event that is not a delivery report
        ...


class WebhookFormat(Protocol):
    """How a provider's delivery-report webhooks are read and checked."""

    def parse(self, body: bytes, content_type: str) -> WebhookEvent:
        """Read a body (raises BadWebhook)."""
        ...

    def verify(self, event: Any, secret: str) -> bool:
        """The event's signature holds for the account's webhook secret."""
        ...

    def created_at(self, event: Any) -> float | None:
        """When the provider created the event (epoch seconds), None when it cannot be read."""
        ...


class ProviderAdapter(Protocol):
    """One module per provider implements this; the pipeline knows nothing else about providers."""

    name: str
    max_batch: int

    def batch_key(self, item: Outbound) -> Hashable:
        """Items with equal keys may share one provider request."""
        ...

    async def send(self, batch: Sequence[Outbound]) -> list[ItemResult]:
        """Send a batch; one result per item, in order. Never raises for provider or transport errors."""
        ...

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        """What the provider knows of each item (None: never received). Raises LookupFailed."""
        ...

    max_status_ids: int

    async def statuses(self, message_ids: Sequence[str]) -> list[StatusReport]:
        """Delivery statuses of accepted messages, by provider message id, at most `max_status_ids`
        at once; ids the provider does not know are left out. Raises LookupFailed."""
        ...

    async def close(self) -> None: ...


class AdapterFactory(Protocol):
    def __call__(self, account: Account, *, proxy_from_env: bool = False) -> ProviderAdapter: ...


@dataclass(frozen=True, slots=True)
class Provider:
    """What the gateway needs of one provider, declared by its package and listed in the registry
    (providers/__init__.py): nothing outside the package names the provider otherwise."""

    name: str  # the accounts' `provider` key
    adapter: AdapterFactory
    webhooks: WebhookFormat | None = None  # how its delivery-report webhooks are read; None: not taken
