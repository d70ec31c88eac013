"""Dedupe, claim and rate-limit state behind one interface (`Store`), with two backends."""

from gateway.state.base import Claim, ClaimState, Grant, Store, StoredResult

__all__ = ["Claim", "ClaimState", "Grant", "Store", "StoredResult"]
