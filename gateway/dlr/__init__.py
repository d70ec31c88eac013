"""Delivery reports: webhooks as hints, status polls, exactly one final event per accepted SMS,
and the tracking rebuilt after a store loss."""
