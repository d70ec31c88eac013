"""Dedupe, claim and rate-limit state behind one interface (`Store`), with two backends."""

from gateway.state.base import Claim, ClaimState, Store, StoredResult

__all__ = ["Claim", "ClaimState", "Store", "StoredResult"]
