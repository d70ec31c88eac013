"""Property-based against the real broker and an in-process gateway: generated bodies, AMQP
properties and headers, to a configured account and an unknown one. Every message ends with an
outcome or a dead letter, and the worker goes on (a normal request after them is accepted)."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import contract as c
from testkit import Bus, new_account_name, request
from tests.conftest import InProcess
from tests.unit.test_fuzz_contract import documents

pytestmark = pytest.mark.integration

header_values = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.text(max_size=30),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=3),
)
headers = st.dictionaries(st.text(min_size=1, max_size=20), header_values, max_size=4)
short_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(documents)
    uid_mode = draw(st.sampled_from(["ours", "none", "garbage"]))
    return {
        "doc": doc,
        "uid_mode": uid_mode,
        "raw": draw(st.one_of(st.none(), st.binary(max_size=200))),  # sometimes not JSON at all
        "good_shape": draw(st.booleans()),
        "ghost": draw(st.integers(0, 9)) == 0,
        "headers": draw(headers),
        "content_type": draw(st.one_of(st.none(), short_text)),
        "priority": draw(st.one_of(st.none(), st.integers(0, 9))),
        "type": draw(st.one_of(st.none(), short_text)),
        "app_id": draw(st.one_of(st.none(), short_text)),
        "correlation_id": draw(st.one_of(st.none(), short_text)),
    }


def _body(i: int, m: dict[str, Any]) -> bytes:
    if m["raw"] is not None:
        return bytes(m["raw"])
    doc = dict(m["doc"])
    if m["good_shape"]:  # a plausible request with fuzzed extras, so deeper paths are reached too
        doc.setdefault("to", "+48500600700")
        doc.setdefault("text", "fuzz {x}")
        doc.setdefault("vars", {"x": "1"})
    if m["uid_mode"] == "ours":
        doc["unique_id"] = f"fz{i}"
    elif m["uid_mode"] == "none":
        doc.pop("unique_id", None)
    return json.dumps(doc, ensure_ascii=True, allow_nan=True).encode()


async def _run(tmp: Path, batch: list[dict[str, Any]]) -> None:
    world = InProcess(tmp)
    await world.start_sandbox()
    name, ghost = new_account_name("fz"), new_account_name("ghost")
    try:
        await world.gateway([world.account(name)], poison_deliveries=2)
        async with Bus.open([name, ghost]) as bus:
            exchange = await bus.channel.get_exchange(c.SEND_EXCHANGE, ensure=False)
            for i, m in enumerate(batch):
                message = aio_pika.Message(
                    _body(i, m),
                    message_id=f"fz{i}",  # the unique_id when the body has none
                    headers={**m["headers"], "fz": i},
                    content_type=m["content_type"],
                    priority=m["priority"],
                    type=m["type"],
                    app_id=m["app_id"],
                    correlation_id=m["correlation_id"],
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await exchange.publish(message, routing_key=ghost if m["ghost"] else name)
            await bus.publish(name, request("after-fuzz"))
            expected = {f"fz{i}" for i in range(len(batch))}

            def accounted() -> set[str]:
                by_outcome = {d["unique_id"] for d in bus.outcome_docs()}
                by_dead = {f"fz{d.headers['fz']}" for d in bus.dead if "fz" in d.headers}
                return (by_outcome | by_dead) & expected

            for _ in range(300):
                if accounted() == expected and "after-fuzz" in {d["unique_id"] for d in bus.outcome_docs()}:
                    break
                await asyncio.sleep(0.1)
            missing = expected - accounted()
            assert not missing, f"no outcome nor dead letter for {sorted(missing)[:10]}"
            after = [d for d in bus.outcome_docs() if d["unique_id"] == "after-fuzz"]
            assert [d["status"] for d in after] == ["accepted"]
            for d in bus.outcomes:  # every outcome is strict JSON
                json.loads(d.body, parse_constant=lambda x: pytest.fail(f"{x} in an outcome"))
    finally:
        await world.close()


@given(st.lists(messages(), min_size=15, max_size=30))
@settings(
    max_examples=4,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
def test_fuzzed_messages_each_end_with_an_outcome_or_a_dead_letter(services: None, batch: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(Path(tmp), batch))
