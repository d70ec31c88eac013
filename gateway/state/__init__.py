"""Dedupe, claim, rate-limit and delivery-report state behind one interface (`Store`, made of one
protocol per concern: `ClaimStore`, `RateStore`, `PauseStore`, `ReportStore`), with two backends."""

from gateway.state.base import (
    Claim,
    ClaimState,
    ClaimStore,
    Grant,
    PauseStore,
    RateStore,
    ReportStore,
    SendStore,
    Store,
    StoredResult,
)

__all__ = [
    "Claim",
    "ClaimState",
    "ClaimStore",
    "Grant",
    "PauseStore",
    "RateStore",
    "ReportStore",
    "SendStore",
    "Store",
    "StoredResult",
]
