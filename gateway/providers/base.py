"""What every provider adapter speaks: outbound items, per-item verdicts, one error type.

Error tree (what an adapter can report for one message):

    ItemResult.verdict
      ACCEPTED    the provider took it (provider_message_id, parts)
      REJECTED    refused for good: the code table says permanent
      RETRY       not sent, safe to send again (e.g. connection refused, throttled)
      AMBIGUOUS   the request may have reached the provider: reconcile (lookup) before any resend
      UNDECIDED   a lookup could not tell whether it was sent: give up (`failed`), never resend blindly

An account-level code (bad credentials, blocked account, exhausted quota) is a REJECTED or RETRY
verdict whose error has `pause_account=True`: the pipeline pauses the account's consumption.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum, StrEnum
from typing import Protocol

from gateway.contract import OutcomeError


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


@dataclass(frozen=True, slots=True)
class ProviderError:
    code: str
    type: str
    message: str
    retryable: bool
    pause_account: bool = False
    throttle: bool = False

    def to_outcome(self) -> OutcomeError:
        return OutcomeError(self.code, self.type, self.message, self.retryable)


@dataclass(frozen=True, slots=True)
class ItemResult:
    verdict: Verdict
    provider_message_id: str | None = None
    parts: int | None = None
    error: ProviderError | None = None
    provider_status: str | None = None

    @classmethod
    def from_rule(cls, code: str, rule: CodeRule, message: str | None = None) -> ItemResult:
        verdict = {
            Action.PERMANENT: Verdict.REJECTED,
            Action.ACCOUNT: Verdict.REJECTED,
            Action.RETRYABLE: Verdict.RETRY,
            Action.ALREADY_ACCEPTED: Verdict.AMBIGUOUS,
            Action.SPLIT: Verdict.RETRY,
            Action.THROTTLE: Verdict.RETRY,
            Action.AMBIGUOUS: Verdict.AMBIGUOUS,
            Action.REDIRECT: Verdict.RETRY,
        }[rule.action]
        error = ProviderError(
            code=code,
            type=rule.type,
            message=message or rule.meaning,
            retryable=verdict in (Verdict.RETRY, Verdict.AMBIGUOUS),
            pause_account=rule.action is Action.ACCOUNT,
            throttle=rule.action is Action.THROTTLE,
        )
        return cls(verdict, error=error)

    def with_error_message(self, message: str) -> ItemResult:
        return self if self.error is None else replace(self, error=replace(self.error, message=message))


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


class LookupFailed(Exception):
    """The provider could not say whether a message exists; nothing may be resent on this basis."""


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

    async def close(self) -> None: ...
