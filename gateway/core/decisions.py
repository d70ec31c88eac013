"""What the pipeline decides for each request, as values: `Job` (a request and what its copy says
of earlier attempts), and the decisions `Finish` (an outcome, maybe a dead letter), `Retry` (send
again later) and `Wait` (another worker holds the id), with the rules that make them from a
provider's answer (`decide`) or from what admission found (`invalid`, `expired`, `poison`, ...);
and admission's own step, a request made ready to send (`prepare`). No I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from gateway import contract as c
from gateway import segments
from gateway.config import Account
from gateway.contract import DeadReason, InvalidRequest, OutcomeError, PolicyCode, SendRequest, Status
from gateway.core.retry import RetryPolicy
from gateway.errors import InvalidNumber
from gateway.numbers import country_of, normalize
from gateway.providers.base import Action, ItemResult, Outbound, ProviderError, Verdict, provider_ref
from gateway.segments import Transliterate
from gateway.state import StoredResult


@dataclass(eq=False, slots=True)
class Job:
    """One request as the pipeline knows it: what the copy says of earlier attempts (from the
    consumer), then what admission read from the body."""

    attempts: int = 0  # provider attempts made by earlier copies
    waits: int = 0  # times earlier copies waited for another worker's claim (or for the store)
    waiting_since: float | None = None  # when an earlier copy first found another worker's claim
    sent_at: float | None = None  # an earlier ambiguous attempt's time, for the lookup window
    redelivered: bool = False
    own: bool = False  # a copy the gateway published itself for this request (x-gateway-own)
    replay: bool = False  # a re-driven dead letter: an earlier rejected/failed/expired result is sent again
    unique_id: str | None = None
    to: str | None = None
    meta: dict[str, Any] | None = None
    request: SendRequest | None = None
    item: Outbound | None = None
    attempt_at: float | None = None  # when this copy's provider attempt started
    published_at: float | None = None  # the producer's AMQP timestamp (epoch seconds), when it set one
    valid_until: float | None = None  # an urgent request's deadline, set at its first admission (lanes.py)
    app_id: str | None = None  # the producing application (AMQP app_id): whose budget it draws from
    # The configured accounts an earlier attempt may have reached (the copy's x-gateway-via); this
    # copy's own attempt replaces them with the account it went through (core/routes.py).
    maybe_at: tuple[str, ...] = ()

    @property
    def ours(self) -> bool:
        """Seen by this gateway before (a redelivery, a retry copy, a wait copy of either), not a
        producer's second copy."""
        return self.redelivered or self.own or self.attempts > 0

    @property
    def seen_before(self) -> bool:
        """A copy whose id the gateway may have claimed and sent before without recording it: a
        redelivery (a crash or a lost channel mid-batch) or a wait copy (another worker's claim).
        Retry copies are not: an ambiguous one carries `sent_at` and is always reconciled, any other
        one follows an attempt that surely did not reach the provider."""
        return self.redelivered or self.waits > 0

    @property
    def phone(self) -> str | None:
        return self.item.phone if self.item is not None else self.to


# -- decisions ---------------------------------------------------------------------------------


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
        return _STATUS.get(self.result.status) or Status(self.result.status)


@dataclass(frozen=True, slots=True)
class Retry:
    """Send again after `delay_ms`; `ambiguous` means the next attempt reconciles first."""

    delay_ms: int
    attempts: int
    error: ProviderError
    ambiguous: bool


@dataclass(frozen=True, slots=True)
class Wait:
    """Another worker holds this id (or the store failed): look again after `delay_ms`, without
    counting an attempt. `since` is when the copy first found another worker's claim (None: it has
    not); `own` marks the copy the gateway's own; `unsent` False means an attempt of this copy may
    have reached the provider (its result could not be stored), so the next copy reconciles."""

    delay_ms: int
    since: float | None = None
    own: bool = False
    unsent: bool = True


@dataclass(frozen=True, slots=True)
class Defer:
    """Not yet, by the lane's policy (a bulk request inside its recipient's quiet hours): the copy
    waits `delay_ms` in the broker and is admitted again. Nothing was claimed or sent, and neither an
    attempt nor a wait is counted."""

    delay_ms: int
    reason: str


Decision = Finish | Retry | Wait | Defer

_STATUS = {str(x): x for x in Status}  # a dict lookup: `Status(value)` goes through the enum's metaclass

_DEAD_FOR = {
    Status.REJECTED: DeadReason.REJECTED,
    Status.EXPIRED: DeadReason.EXPIRED,
    Status.INVALID: DeadReason.INVALID,
}


def finish(
    status: Status,
    provider: str | None,
    *,
    at: datetime,
    attempts: int,
    item: ItemResult | None = None,
    error: OutcomeError | None = None,
    dead: DeadReason | None = None,
    store: bool = True,
    via: str | None = None,
) -> Finish:
    error = error if error is not None else (item.error if item is not None else None)
    result = StoredResult(
        status=str(status),
        provider=provider,
        provider_message_id=item.provider_message_id if item else None,
        parts=item.parts if item else None,
        error=error,
        attempts=attempts,
        at=c.rfc3339(at),
        via=via,
    )
    return Finish(
        result,
        dead=dead if dead is not None else _DEAD_FOR.get(status),
        store=store,
        pause_account=bool(item and item.error and item.error.action is Action.ACCOUNT),
    )


def invalid(problem: InvalidRequest, at: datetime) -> Finish:
    error = OutcomeError(problem.code, "InvalidRequest", problem.message, retryable=False)
    return finish(Status.INVALID, None, at=at, attempts=0, error=error, store=False)


def expired(provider: str, attempts: int, at: datetime, *, validity: bool = False) -> Finish:
    """`validity`: the deadline was the urgent lane's validity, not the request's own `expires_at`."""
    what = "the urgent lane's validity" if validity else "expires_at"
    error = OutcomeError("expired", "Expired", f"{what} passed before the provider took it", False)
    return finish(Status.EXPIRED, provider, at=at, attempts=attempts, error=error)


def poison(attempts: int, crash: str, at: datetime) -> Finish:
    """A message that crashed its handler too often: failed, dead-lettered, not stored."""
    error = OutcomeError("poison", crash, "the handler crashed on this message", False)
    return finish(Status.FAILED, None, at=at, attempts=attempts, error=error, dead=DeadReason.POISON, store=False)


def refused(refusal: Refusal, at: datetime) -> Finish:
    """Refused by the account's rules: `rejected` with the rule's code, no dead letter (a refusal
    by policy is not a fault) and no stored result (a later copy meets the rules as they are then)."""
    error = OutcomeError(str(refusal.code), "PolicyRefusal", refusal.message, retryable=False)
    result = StoredResult(status=str(Status.REJECTED), provider=None, error=error, attempts=0, at=c.rfc3339(at))
    return Finish(result, dead=None, store=False)


def unknown_account(routing_key: str, at: datetime) -> Finish:
    error = OutcomeError("unknown_account", "UnknownAccount", f"no account named {routing_key[:200]!r}", False)
    return finish(Status.INVALID, None, at=at, attempts=0, error=error, dead=DeadReason.UNKNOWN_ACCOUNT, store=False)


def decide(
    item: ItemResult, attempts_made: int, policy: RetryPolicy, provider: str, at: datetime, via: str | None = None
) -> Decision:
    """What to do with one message after a provider attempt (`attempts_made` includes this one)
    through the configured account `via`."""
    if item.verdict is Verdict.ACCEPTED:
        return finish(Status.ACCEPTED, provider, at=at, attempts=attempts_made, item=item, via=via)
    if item.verdict is Verdict.REJECTED:
        return finish(Status.REJECTED, provider, at=at, attempts=attempts_made, item=item, via=via)
    if item.error is None:  # an adapter that failed without saying why: retry it as ambiguous
        item = replace(item, error=_UNEXPLAINED)
    assert item.error is not None
    if item.verdict is Verdict.UNDECIDED or policy.exhausted(attempts_made):
        return finish(
            Status.FAILED,
            provider,
            at=at,
            attempts=attempts_made,
            item=item,
            dead=DeadReason.RETRIES_EXHAUSTED,
            via=via,
        )
    return Retry(
        delay_ms=policy.delay_ms(attempts_made),
        attempts=attempts_made,
        error=item.error,
        ambiguous=item.verdict is Verdict.AMBIGUOUS,
    )


_UNEXPLAINED = ProviderError("internal", "Unexplained", "no error given with the verdict", True, Action.AMBIGUOUS)


def already_done(stored: StoredResult, *, ours: bool, at: datetime) -> Finish:
    """A copy found a stored result. Our own redelivery gets the original outcome again (its first
    publish may have been lost in a crash); any other copy gets `duplicate` carrying the original."""
    if ours:
        status = Status(stored.status)
        dead = DeadReason.RETRIES_EXHAUSTED if status is Status.FAILED else _DEAD_FOR.get(status)
        return Finish(stored, dead=dead, store=False)
    dup = replace(stored, status=str(Status.DUPLICATE), attempts=0, at=c.rfc3339(at))
    return Finish(dup, store=False, original=stored)


# -- admission ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the account's rules refuse before any send (`PolicyCode`)."""

    code: PolicyCode
    message: str


def prepare(account: Account, request: SendRequest) -> Outbound | InvalidRequest | Refusal:
    """The request as the provider will get it: the number in E.164, the text transliterated as the
    account says and counted in parts; or why it is not sent (invalid, or refused by a rule that
    needs no store: the country allow-list, the parts limit)."""
    try:
        phone = normalize(request.to, account.default_country)
    except InvalidNumber as exc:
        return InvalidRequest("invalid_number", str(exc), request.unique_id, request.to, request.meta)
    if account.allowed_countries is not None:
        country = country_of(phone)
        if country not in account.allowed_countries:
            where = country or "no country"
            return Refusal(PolicyCode.COUNTRY_BLOCKED, f"{where} is not among the account's allowed countries")
    text, mapped = segments.transliterate(request.text, account.transliterate)
    seg = segments.count(text)
    if account.max_parts is not None and seg.parts > account.max_parts:
        message = f"the text needs {seg.parts} parts in {seg.encoding}, the account allows {account.max_parts}"
        return InvalidRequest("too_many_parts", message, request.unique_id, request.to, request.meta)
    return Outbound(
        unique_id=request.unique_id,
        provider_ref=provider_ref(account.name, request.unique_id),
        phone=phone,
        text=text,
        encoding=seg.encoding,
        parts=seg.parts,
        transliterated=mapped,
        parts_saved=segments.count(request.text).parts - seg.parts if mapped is not Transliterate.OFF else 0,
        sender=request.sender or account.sender,
        flash=request.flash,
        test=request.test,
        send_at=request.send_at,
        template=request.template,
        vars=tuple(sorted((k, str(v)) for k, v in request.vars.items())) if request.template else (),
    )


def is_expired(request: SendRequest, now: datetime) -> bool:
    return request.expires_at is not None and request.expires_at <= now
