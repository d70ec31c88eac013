"""The decisions of the pipeline, as values. No I/O here: the consumer carries decisions out.

request --prepare--> Outbound | Invalid
claim state + provider verdict --decide--> Finish (outcome, maybe dead letter) | Retry | Wait
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.config import Account
from gateway.contract import DeadReason, InvalidRequest, OutcomeError, SendRequest, Status
from gateway.numbers import InvalidNumber, normalize
from gateway.providers import provider_ref
from gateway.providers.base import ItemResult, Outbound, ProviderError, Verdict
from gateway.retry import RetryPolicy
from gateway.state import StoredResult


@dataclass(frozen=True, slots=True)
class Finish:
    """A terminal outcome. `store` says whether it becomes the dedupe record for the id."""

    result: StoredResult
    dead: DeadReason | None = None
    store: bool = True
    original: StoredResult | None = None  # set on `duplicate`: the first copy's result
    pause_account: bool = False

    @property
    def status(self) -> Status:
        return Status(self.result.status)


@dataclass(frozen=True, slots=True)
class Retry:
    """Send again after `delay_ms`; `ambiguous` means the next attempt reconciles first."""

    delay_ms: int
    attempts: int
    error: ProviderError
    ambiguous: bool


@dataclass(frozen=True, slots=True)
class Wait:
    """Another worker holds this id: look again after `delay_ms`, without counting an attempt."""

    delay_ms: int


Decision = Finish | Retry | Wait

_DEAD_FOR = {
    Status.REJECTED: DeadReason.REJECTED,
    Status.EXPIRED: DeadReason.EXPIRED,
    Status.INVALID: DeadReason.INVALID,
}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def finish(
    status: Status,
    provider: str | None,
    *,
    attempts: int,
    item: ItemResult | None = None,
    error: OutcomeError | None = None,
    dead: DeadReason | None = None,
    store: bool = True,
) -> Finish:
    if item is not None and item.error is not None and error is None:
        error = item.error.to_outcome()
    result = StoredResult(
        status=str(status),
        provider=provider,
        provider_message_id=item.provider_message_id if item else None,
        parts=item.parts if item else None,
        error=error.as_dict() if error else None,
        attempts=attempts,
        at=now_rfc3339(),
    )
    return Finish(
        result,
        dead=dead if dead is not None else _DEAD_FOR.get(status),
        store=store,
        pause_account=bool(item and item.error and item.error.pause_account),
    )


def invalid(problem: InvalidRequest) -> Finish:
    error = OutcomeError(problem.code, "InvalidRequest", problem.message, retryable=False)
    return finish(Status.INVALID, None, attempts=0, error=error, store=False)


def prepare(account: Account, request: SendRequest) -> Outbound | InvalidRequest:
    try:
        phone = normalize(request.to, account.default_country)
    except InvalidNumber as exc:
        return InvalidRequest("invalid_number", str(exc), request.unique_id, request.to, request.meta)
    return Outbound(
        unique_id=request.unique_id,
        provider_ref=provider_ref(account.name, request.unique_id),
        phone=phone,
        text=request.text,
        sender=request.sender or account.sender,
        flash=request.flash,
        test=request.test,
        send_at=request.send_at,
        template=request.template,
        vars=tuple(sorted((k, str(v)) for k, v in request.vars.items())) if request.template else (),
    )


def is_expired(request: SendRequest, now: datetime) -> bool:
    return request.expires_at is not None and request.expires_at <= now


def expired(provider: str, attempts: int) -> Finish:
    error = OutcomeError("expired", "Expired", "expires_at passed before the provider took it", False)
    return finish(Status.EXPIRED, provider, attempts=attempts, error=error)


def decide(item: ItemResult, attempts_made: int, policy: RetryPolicy, provider: str) -> Decision:
    """What to do with one message after a provider attempt (`attempts_made` includes this one)."""
    if item.verdict is Verdict.ACCEPTED:
        return finish(Status.ACCEPTED, provider, attempts=attempts_made, item=item)
    if item.verdict is Verdict.REJECTED:
        return finish(Status.REJECTED, provider, attempts=attempts_made, item=item)
    assert item.error is not None
    if item.verdict is Verdict.UNDECIDED or policy.exhausted(attempts_made):
        return finish(
            Status.FAILED,
            provider,
            attempts=attempts_made,
            item=item,
            dead=DeadReason.RETRIES_EXHAUSTED,
        )
    return Retry(
        delay_ms=policy.delay_ms(attempts_made),
        attempts=attempts_made,
        error=item.error,
        ambiguous=item.verdict is Verdict.AMBIGUOUS,
    )


def already_done(stored: StoredResult, *, ours: bool) -> Finish:
    """A copy found a stored result. Our own redelivery gets the original outcome again (its first
    publish may have been lost in a crash); any other copy gets `duplicate` carrying the original."""
    if ours:
        status = Status(stored.status)
        dead = DeadReason.RETRIES_EXHAUSTED if status is Status.FAILED else _DEAD_FOR.get(status)
        return Finish(stored, dead=dead, store=False)
    dup = StoredResult(
        status=str(Status.DUPLICATE),
        provider=stored.provider,
        provider_message_id=stored.provider_message_id,
        parts=stored.parts,
        error=stored.error,
        attempts=0,
        at=now_rfc3339(),
    )
    return Finish(dup, store=False, original=stored)
