"""The benchmark still runs end to end (a few thousand messages); its figures are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_benchmark_smoke_run_completes_and_reports_every_contender(tmp_path: Path, services: None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((tmp_path / "smoke.json").read_text())
    contenders = set(doc["medians"])
    assert {
        "raw broker (relay, outcomes unconsumed)",
        "ceiling (aio-pika relay)",
        "gateway @0ms",
        "gateway @200ms",
        "gateway @500ms",
    } <= contenders
    assert {c for c in contenders if c.startswith("celery")} == {
        "celery prefork @0ms",
        "celery threads-32 @0ms",
        "celery prefork @200ms",
        "celery threads-32 @200ms",
    }
    assert all(v["msgs_per_s"] and v["msgs_per_s"] > 0 for v in doc["medians"].values())
    assert [x["label"] for x in doc["latency"]] == ["10%", "50%", "relay 10%", "relay 50%"]
    assert all(x["p50_ms"] > 0 for x in doc["latency"])  # the relay's outcomes carry the send time too
    assert "(the relay at the same rate: p50" in doc["table"]
    for when in ("before", "after"):  # the broker's state is part of every run's record
        state = doc["broker"][when]
        assert state["queues"] > 0
        assert state["memory_mb"] > 0
        assert isinstance(state["quorum_log_mb"], float)
    assert all(v["min_msgs_per_s"] <= v["msgs_per_s"] <= v["max_msgs_per_s"] for v in doc["medians"].values())
    assert "of the ceiling (target >= 0.9)" in doc["table"]
    assert doc["shared_rate_limit"]["messages"] > 0
    assert (tmp_path / "smoke.png").stat().st_size > 1000


@pytest.mark.timeout(600)
def test_lanes_benchmark_smoke_run_reports_both_modes(services: None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.lanes", "--backlog", "1000", "--seconds", "3", "--latency-ms", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["lanes off (one queue)", "lanes on"]
    assert all(r["urgent_answered"] == r["urgent_sent"] > 0 for r in rows)
