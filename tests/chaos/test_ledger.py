"""The ledger itself must be able to fail: a lost request, a double send and an accepted request
the provider never saw are each counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.providers.base import provider_ref
from tests.chaos.harness import Observer, Seen, World


class FakeSandbox:
    def __init__(self, sends: dict[str, int]) -> None:
        self.sends = sends

    def ledger(self) -> dict[str, Any]:
        return {"by_unique_id": self.sends}


def test_ledger_counts_lost_double_and_phantom_sends(tmp_path: Path) -> None:
    world = World(tmp_path, None, None, ["acc"])  # type: ignore[arg-type]
    world.keys = {"acc/ok", "acc/lost", "acc/twice", "acc/phantom", "acc/bad"}
    observer = Observer("amqp://unused/", ["acc"])
    observer.seen.update(
        {
            "acc/ok": Seen(outcomes=[(1.0, "accepted")]),
            "acc/twice": Seen(outcomes=[(1.0, "accepted"), (2.0, "accepted")]),
            "acc/phantom": Seen(outcomes=[(1.0, "accepted")]),
            "acc/bad": Seen(outcomes=[(1.0, "invalid")], dead=["invalid"]),
        }
    )
    world.observer = observer
    world.sandbox = FakeSandbox(  # type: ignore[assignment]
        {provider_ref("acc", "ok"): 1, provider_ref("acc", "twice"): 2, provider_ref("acc", "lost"): 1}
    )
    led = world.ledger("fake")
    assert (led.published, led.accepted, led.invalid, led.dead_lettered) == (5, 3, 1, 1)
    assert led.lost == 1
    assert led.sent_twice == 1
    assert any("phantom" in note and "no send" in note for note in led.notes)
    assert not led.ok


def test_ledger_counts_missing_repeated_and_early_delivery_events_and_own_duplicates(tmp_path: Path) -> None:
    world = World(tmp_path, None, None, ["acc"])  # type: ignore[arg-type]
    world.check_reports = True
    world.keys = {"acc/one", "acc/none", "acc/two", "acc/dup", "acc/early"}
    observer = Observer("amqp://unused/", ["acc"])
    observer.seen.update(
        {
            "acc/one": Seen(outcomes=[(1.0, "accepted"), (2.0, "delivered")]),
            "acc/none": Seen(outcomes=[(1.0, "accepted")]),
            "acc/two": Seen(outcomes=[(1.0, "accepted"), (2.0, "delivered"), (3.0, "delivered")]),
            "acc/dup": Seen(outcomes=[(1.0, "accepted"), (1.5, "duplicate"), (2.0, "undelivered")]),
            "acc/early": Seen(outcomes=[(1.0, "delivered"), (2.0, "accepted")]),
        }
    )
    world.observer = observer
    world.sandbox = FakeSandbox({provider_ref("acc", k): 1 for k in ("one", "none", "two", "dup", "early")})  # type: ignore[assignment]
    led = world.ledger("fake")
    assert (led.reports_missing, led.reports_twice, led.reports_early, led.own_duplicates) == (1, 1, 1, 1)
    assert led.lost == 0
    assert led.sent_twice == 0
    assert not led.ok
    assert "1 / 1 / 1 / 1" in led.row()
