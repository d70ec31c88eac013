"""`gateway trace`: where is one request, and what became of it? The support team's question
("did +48 500 600 700 get order 1812's code, and when?") answered from the state store the
gateways share and the dead-letter queue, without reading logs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import click

from gateway.cli import common as x
from gateway.config import Account
from gateway.state import ClaimState
from gateway.state.base import Trail


@click.command()
@click.argument("unique_id", required=False)
@click.option("--to", "number", default=None, help="Every request to this number within the dedupe window.")
@click.option("--account", default=None, help="Look in this account only (default: every configured one).")
@click.option("--show-number", is_flag=True, help="Print numbers in full (masked by default).")
@click.option("--sandbox", is_flag=True, help="With the sandbox's demo account when none is configured.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per request found, in an array.")
def trace(
    unique_id: str | None, number: str | None, account: str | None, show_number: bool, sandbox: bool, as_json: bool
) -> int:
    """Where a request is and how it ended: its stored result (status, attempts, provider and the
    provider's message id), its delivery status and time, and where it is now (in flight,
    waiting for a retry, dead-lettered, or finished). Exit 1 when nothing is known of it.

    \b
      gateway trace order-1812-otp
      gateway trace --to +48500600700 --account otp
    """
    from gateway.app import resolve_accounts
    from gateway.errors import InvalidNumber
    from gateway.numbers import normalize

    if (unique_id is None) == (number is None):
        raise x.Fail("give a UNIQUE_ID or --to NUMBER (one of them)", x.USAGE)
    s = x.settings()
    accounts = resolve_accounts(s, sandbox=sandbox)
    if account is not None:
        accounts = [a for a in accounts if a.name == account]
        if not accounts:
            raise x.Fail(f"no account {account!r} is configured", x.USAGE)

    async def go() -> list[dict[str, Any]]:
        from gateway.ops import deadletters as dl

        store = x.state_store(s)
        found: list[dict[str, Any]] = []
        try:
            wanted: list[tuple[Account, str]] = []
            for a in accounts:
                if number is None:
                    assert unique_id is not None
                    wanted.append((a, unique_id))
                    continue
                try:
                    e164 = normalize(number, a.default_country)
                except InvalidNumber as exc:
                    raise x.Fail(f"--to: {exc}", x.USAGE) from None
                uids = await _store_call(store.by_number(a.name, e164, window_s=a.dedupe_window_s))
                wanted += [(a, uid) for uid in uids]
            trails = [(a, uid, await _store_call(store.trail(a.name, uid))) for a, uid in wanted]
        finally:
            await store.close()
        # The dead-letter queue is read whole (a queue has no index): only when a letter can exist,
        # that is for a request not known to have been accepted and not in flight now.
        ids = {uid for _, uid, trail in trails if _may_have_letters(trail)}
        letters: list[Any] = []
        if ids:
            async with x.broker(s) as connection:
                keep = dl.Filter(account=account)
                letters = [letter for letter in await dl.listing(connection, keep) if letter.unique_id in ids]
        for a, uid, trail in trails:
            mine = [letter for letter in letters if letter.unique_id == uid and letter.account == a.name]
            doc = _describe(a.name, uid, trail, mine, show_number)
            if doc["where"] != "unknown" or number is not None:
                found.append(doc)
        return found

    found = asyncio.run(go())
    if as_json:
        x.emit_json(found)
    elif not found:
        what = f"unique_id {unique_id}" if unique_id is not None else "this number"
        click.echo(
            f"nothing is known of {what}: not received, not consumed yet (see `gateway accounts`), or older "
            "than the dedupe window"
        )
    for doc in [] if as_json else found:
        _print(doc)
    return x.OK if found else x.FAILED


async def _store_call(call: Any) -> Any:
    try:
        return await asyncio.wait_for(call, 10)
    except Exception as exc:  # noqa: BLE001 - one line, exit 4
        raise x.Fail(f"cannot read the state store: {type(exc).__name__}: {exc}"[:300], x.UNREACHABLE) from None


def _may_have_letters(trail: Trail) -> bool:
    claim = trail.claim
    if claim is None:
        return True
    if claim.state is ClaimState.BUSY:
        return False
    return claim.result is None or claim.result.status != "accepted"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _describe(account: str, uid: str, trail: Trail, letters: list[Any], show_number: bool) -> dict[str, Any]:
    from gateway.numbers import mask

    doc: dict[str, Any] = {"account": account, "unique_id": uid, "where": "unknown"}
    claim, retry, delivery = trail.claim, trail.retry, trail.delivery
    if claim is not None and claim.state is ClaimState.DONE and claim.result is not None:
        doc["where"] = "finished"
        doc["result"] = claim.result.as_dict()
    elif claim is not None and claim.state is ClaimState.BUSY:
        doc["where"] = "in_flight"
        doc["claimed_by"] = claim.owner
        doc["lease_left_s"] = round(claim.lease_left_s or 0.0, 1)
    elif retry is not None:
        # Released for the retry, or marked unknown (the attempt may have reached the provider): then
        # the next copy asks the provider before it sends.
        doc["where"] = "waiting_for_retry"
        doc["reconcile_first"] = claim is not None
    elif claim is not None:
        doc["where"] = "reconciling"  # sent, its answer not stored: the next copy asks the provider
    if retry is not None:
        doc["last_retry"] = {
            "attempts": retry.attempts,
            "code": retry.code,
            "message": retry.message,
            "at": _iso(retry.at),
            "retry_at": _iso(retry.retry_at),
        }
    if delivery is not None:
        to = delivery.tracked.to
        doc["to"] = to if show_number else mask(to)
        doc["delivery"] = {
            "state": delivery.state,
            "status": delivery.final_status,
            "status_at": delivery.final_at,
            "polls": delivery.polls,
            "next_poll_at": _iso(delivery.next_poll_at) if delivery.state != "final" else None,
        }
    if letters:
        if doc["where"] in ("unknown", "waiting_for_retry"):
            doc["where"] = "dead_lettered"
        doc["dead_letters"] = [letter.row() for letter in letters]
        if show_number:
            for row, letter in zip(doc["dead_letters"], letters, strict=True):
                row["to"] = letter.to
    return doc


WHERE = {
    "finished": "finished",
    "in_flight": "in flight now",
    "reconciling": "sent, its answer not stored: the next copy asks the provider before anything is resent",
    "waiting_for_retry": "waiting for a retry",
    "dead_lettered": "dead-lettered",
    "unknown": "not known",
}


def _print(doc: dict[str, Any]) -> None:
    lines = [f"{doc['unique_id']}  account={doc['account']}  {WHERE[doc['where']]}"]
    if "result" in doc:
        r = doc["result"]
        err = r.get("error") or {}
        text = f"  result: {r['status']} at {r['at']}, {r['attempts']} attempt(s) via {r['provider']}"
        if r.get("provider_message_id"):
            text += f", provider message id {r['provider_message_id']}"
        if err:
            text += f"; error {err.get('code')} {err.get('message')}"
        lines.append(text)
    if "claimed_by" in doc:
        lines.append(f"  claimed by {doc['claimed_by']}, lease {doc['lease_left_s']} s left")
    if "last_retry" in doc:
        t = doc["last_retry"]
        lines.append(
            f"  last retry: attempt {t['attempts']} failed at {t['at']} ({t['code']} {t['message']}); "
            f"next copy due {t['retry_at']}"
            + (", which first asks the provider whether it got this one" if doc.get("reconcile_first") else "")
        )
    if "delivery" in doc:
        d = doc["delivery"]
        if d["status"]:
            lines.append(f"  delivery: {d['status']} at {d['status_at']} (to {doc.get('to')})")
        else:
            lines.append(
                f"  delivery: no final status yet ({d['state']}, {d['polls']} poll(s), next {d['next_poll_at']})"
            )
    for letter in doc.get("dead_letters", []):
        lines.append(
            f"  dead letter {letter['id']}: {letter['reason']} {letter['code']} at {letter['at']}"
            f" (gateway dlq show {letter['id']})"
        )
    click.echo("\n".join(lines))
