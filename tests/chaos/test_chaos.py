"""The CI-sized chaos suite: real gateway processes against the suite's own RabbitMQ node and Redis,
faults injected, and the ledger checked after each scenario. `make chaos` runs the full size.

A scenario fails when a request is lost (no outcome and no dead letter), reached the provider
twice, or when the consumers did not come back by themselves; with delivery reports on, when an
accepted SMS has no delivery event or more than one, or a request of the gateway's own was answered
`duplicate`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import HEADER, RabbitNode, RedisServer, infrastructure
from tests.chaos.scenarios import CI, CI_SCENARIOS, SINGLE_NODE

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.chaos,
    # aiormq leaves sockets of connections the broker closed to the garbage collector.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.timeout(420),
]


@pytest.fixture(scope="module")
def chaos_infra(services: None) -> Iterator[tuple[Path, list[RabbitNode], RedisServer]]:
    with infrastructure(1) as infra:
        yield infra


@pytest.mark.parametrize("name", CI_SCENARIOS)
async def test_chaos_scenario_loses_nothing_and_sends_nothing_twice(
    name: str, chaos_infra: tuple[Path, list[RabbitNode], RedisServer]
) -> None:
    root, nodes, redis_server = chaos_infra
    led = await SINGLE_NODE[name](root, nodes, redis_server, CI)
    print(HEADER, led.row(), *led.notes, sep="\n")
    assert led.published > 0
    assert led.lost == 0, led.notes
    assert led.sent_twice == 0, led.notes
    assert led.over_budget == 0, led.notes
    assert led.consumers_restored, led.notes
    assert led.reports_missing == 0, led.notes  # with reports on: one delivery event per accepted SMS
    assert led.reports_twice == 0, led.notes
    assert led.own_duplicates == 0, led.notes
    assert led.reports_early == 0, led.notes  # no final event before the request's `accepted`
    assert led.failed_allowed or led.failed == 0, led.notes
    assert led.extra["log_lines_not_json"] == 0, "a gateway wrote a line that is not JSON under GATEWAY_LOG_FORMAT=json"
    assert led.accepted + led.rejected + led.failed + led.invalid + led.other == led.published
