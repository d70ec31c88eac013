"""`python -m bench.micro [n]`: CPU per message of the gateway's own per-message steps, without a
broker, a store or a provider: what a change to them saves, where a drain's run-to-run spread
(several percent) would hide it. Run it from two checkouts in turn (PYTHONPATH=<tree>) to compare.

Steps: decoding the request, preparing it (the number normalized), opening and closing the
delivery's span and gauge, the decision and its outcome body, the stored result and the
delivery-report record as the Redis store writes them, and the outcome counter."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from gateway import contract as c
from gateway.bus.settle import Delivery, Settler
from gateway.config import Account
from gateway.core import decisions as dec
from gateway.obs import tracing
from gateway.state.base import Tracked


class _Message:
    headers: dict[str, Any] = {}


def main(n: int) -> None:
    tracing.setup_tracing()  # the SDK tracer, not recording, as the gateway runs by default
    tracing.tracer.cache_clear()
    account = Account(name="bench", provider="serwersms", base_url="http://127.0.0.1:9", token=SecretStr("dummy"))
    bodies = [
        json.dumps(
            {"unique_id": f"b-{i}-{secrets.token_hex(3)}", "to": f"+4850{i:07d}", "text": f"Your code is {i:04d}"}
        ).encode()
        for i in range(n)
    ]
    requests = [c.decode_request(b, message_id=None, max_bytes=65536) for b in bodies]
    reqs = [r for r in requests if isinstance(r, c.SendRequest)]
    items = [dec.prepare(account, r) for r in reqs]
    now = datetime.now(UTC)
    message: Any = _Message()
    count = Settler._count

    def decode() -> None:
        for b in bodies:
            c.decode_request(b, message_id=None, max_bytes=65536)

    def prepare() -> None:
        for r in reqs:
            dec.prepare(account, r)

    def delivery() -> None:
        for _ in reqs:
            Delivery.begin(message, "bench").close("accepted")

    def outcome() -> None:
        for r in reqs:
            f = dec.finish(c.Status.ACCEPTED, "serwersms", at=now, attempts=1)
            c.outcome_body(unique_id=r.unique_id, account="bench", to=r.to, status=f.status, provider="serwersms",
                           provider_message_id="8931c3c014", parts=1, attempts=1)  # fmt: skip

    def records() -> None:
        result = dec.finish(c.Status.ACCEPTED, "serwersms", at=now, attempts=1).result
        for r in reqs:
            result.to_json()
            Tracked("8931c3c014", r.unique_id, r.to, None, "serwersms", 1.0).to_json()

    def counted() -> None:
        d = Delivery(message, "bench", label="bench")
        decision = dec.finish(c.Status.ACCEPTED, "serwersms", at=now, attempts=1)
        for _ in reqs:
            count(d, decision)

    steps: list[tuple[str, Callable[[], None]]] = [
        ("decode", decode),
        ("prepare", prepare),
        ("delivery span+gauge", delivery),
        ("decision+outcome", outcome),
        ("store records", records),
        ("outcome counter", counted),
    ]
    assert len(items) == n
    total = 0.0
    for name, fn in steps:
        fn()  # warm
        best = min(_timed(fn) for _ in range(3))
        total += best / n * 1e6
        print(f"{name:<22} {best / n * 1e6:7.2f} us/msg")
    print(f"{'total':<22} {total:7.2f} us/msg")


def _timed(fn: Callable[[], None]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
