"""Prometheus metrics, served on `/metrics`. Labels are bounded: account, lane, status, code, reason.

Provider codes are a closed table per provider plus a few transport codes, so `code` stays small.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# No `_created` sample beside each counter and histogram: nothing reads them, and they would double
# the lines of every account's primed series in each scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

OUTCOMES = Counter(
    "sms_outcomes",
    "Terminal outcomes published, by account, status and provider or gateway error code",
    ["account", "status", "code"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "sms_retries",
    "Copies parked in the delayed-retry queues: `retry` after a failed attempt, `wait` for another "
    "worker's in-flight claim",
    ["account", "kind"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "sms_dead_letters", "Dead letters published, by reason", ["account", "reason"], registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "sms_batch_size",
    "Messages per provider request",
    ["account"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
    registry=REGISTRY,
)
PROVIDER_LATENCY = Histogram(
    "sms_provider_request_seconds",
    "Provider HTTP request latency, by operation and result (ok, error, transport)",
    ["account", "provider", "operation", "result"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "sms_failovers",
    "Requests sent through another configured account than their first route (via), by why: paused, open, "
    "drained (the first route's state) or unsent (it refused or could not take this request)",
    ["account", "via", "reason"],
    registry=REGISTRY,
)
ROUTE_STATE = Gauge(
    "sms_route_state",
    "1 for the circuit state each sending account's route is in, in this process: closed, open, half_open",
    ["account", "state"],
    registry=REGISTRY,
)
ROUTE_OPEN_SINCE = Gauge(
    "sms_route_open_since_seconds",
    "Epoch seconds the route's circuit left closed (0 while closed): the alert's how long",
    ["account"],
    registry=REGISTRY,
)
ROUTE_DRAINED = Gauge(
    "sms_route_drained",
    "1 while a country is drained from a sending account's route for its undelivered share",
    ["account", "country"],
    registry=REGISTRY,
)
POLICY_REFUSALS = Counter(
    "sms_policy_refusals",
    "Requests the account's rules refused before any send (outcome rejected), by lane and code: "
    "opted_out, quota_exceeded, country_blocked, velocity_blocked, frequency_capped",
    ["account", "lane", "code"],
    registry=REGISTRY,
)
OPTOUT_CHANGES = Counter(
    "sms_optout_changes",
    "Changes applied to the opt-out registry, by scope (an account, or all), action (add, remove) and "
    "where they came from (bus, cli, import)",
    ["scope", "action", "via"],
    registry=REGISTRY,
)
PARTS = Counter(
    "sms_parts",
    "SMS parts the provider accepted, by encoding (gsm7, ucs2) as counted locally",
    ["account", "encoding"],
    registry=REGISTRY,
)
PARTS_SAVED = Counter(
    "sms_parts_saved",
    "Parts that transliteration saved on accepted messages (the text as written would have needed more)",
    ["account"],
    registry=REGISTRY,
)
COST = Counter(
    "sms_cost",
    "What accepted messages cost: parts x the account's price_per_part (accounts with a price only), by "
    "producing application (the AMQP app_id: the applications named in app_budgets, every other one as `other`)",
    ["account", "app"],
    registry=REGISTRY,
)
VELOCITY_BLOCKED = Counter(
    "sms_velocity_blocked",
    "Requests refused by the fraud guard (a country's hourly cap), by country and number range (the "
    "calling code and two more digits)",
    ["account", "country", "range"],
    registry=REGISTRY,
)
BUDGET_USED = Gauge(
    "sms_budget_used_parts",
    "SMS parts counted against a budget in its current period, as this replica's last claim saw it "
    "(scope: account or app:<app_id>; period: day or month)",
    ["account", "scope", "period"],
    registry=REGISTRY,
)
BUDGET_LIMIT = Gauge(
    "sms_budget_limit_parts", "A budget's parts per period", ["account", "scope", "period"], registry=REGISTRY
)
RATE_LIMIT_WAIT = Counter(
    "sms_rate_limit_wait_seconds", "Time batches spent waiting for rate-limit tokens", ["account"], registry=REGISTRY
)
RATE_FACTOR = Gauge(
    "sms_rate_factor",
    "Share of the configured rate in use (below 1 while the provider throttles)",
    ["account"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "sms_queue_wait_seconds",
    "Time a request waited in its queue: from the producer's AMQP timestamp to its first consumption",
    ["account", "lane"],
    buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 3600, 7200),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("sms_in_flight", "Messages consumed and not yet settled", ["account"], registry=REGISTRY)
INFLIGHT_LIMIT = Gauge(
    "sms_inflight_limit",
    "provider calls the account's lane may have in flight now (adaptive)",
    ["account", "lane"],
    registry=REGISTRY,
)
INFLIGHT = Gauge("sms_inflight_batches", "provider calls in flight", ["account", "lane"], registry=REGISTRY)
PREFETCH = Gauge(
    "sms_consumer_prefetch",
    "requests the broker may deliver ahead (follows the in-flight limit)",
    ["account", "lane"],
    registry=REGISTRY,
)
LOOP_LAG = Gauge(
    "sms_event_loop_lag_seconds",
    "How late the process's event loop ran a short timer, on average over the last quarter second",
    registry=REGISTRY,
)
ADMISSION_LIMIT = Gauge(
    "sms_admission_limit",
    "Batches the process lets run at once across all accounts while its event loop is saturated "
    "(0: not saturated, no limit)",
    registry=REGISTRY,
)
ADMISSION_HELD = Counter(
    "sms_admission_held",
    "Times a lane's batch waited for its fair turn because the process was saturated",
    registry=REGISTRY,
)
PAUSED = Gauge(
    "sms_account_paused",
    "1 while the consumption of the account's lane is paused",
    ["account", "lane"],
    registry=REGISTRY,
)
LANE_OUTCOMES = Counter(
    "sms_lane_outcomes",
    "Terminal outcomes published, by account, lane and status (the send classes' throughput)",
    ["account", "lane", "status"],
    registry=REGISTRY,
)
CONSUMER_RESTORED = Counter(
    "sms_consumer_restored",
    "Consumers started again after the broker connection or the consumer was lost",
    ["queue"],
    registry=REGISTRY,
)
PUBLISHER_REPLACED = Counter(
    "sms_publisher_channel_replaced",
    "Publishing channels replaced after a publish was not confirmed within publish_timeout_s",
    registry=REGISTRY,
)
CONSUMER_LIVE = Gauge(
    "sms_consumer_live", "1 while a live consumer is registered on the queue", ["queue"], registry=REGISTRY
)
STORE_EPOCH_RESETS = Counter(
    "sms_store_epoch_resets",
    "Times this process found the state store empty after having used it (Redis failover or restart "
    "without persistence); new claims are reconciled for a while after",
    ["account"],
    registry=REGISTRY,
)
DLR_EVENTS = Counter(
    "sms_dlr_events", "Final delivery events published, by status", ["account", "status"], registry=REGISTRY
)
DLR_REPORTS = Counter(
    "sms_dlr_reports",
    "Delivery reports received, by source (webhook, poll, window) and what became of them",
    ["account", "source", "result"],
    registry=REGISTRY,
)
DLR_REJECTED = Counter(
    "sms_dlr_webhooks_rejected",
    "Webhook requests answered 4xx or 503, by reason (no account label: the path is the caller's)",
    ["provider", "reason"],
    registry=REGISTRY,
)
DLR_POLL_LAG = Gauge(
    "sms_dlr_poll_lag_seconds",
    "Age of the oldest accepted message still without a final delivery status",
    ["account"],
    registry=REGISTRY,
)
DLR_POLLS = Counter("sms_dlr_polls", "Status polls made, one per provider call", ["account"], registry=REGISTRY)


def prime_account(account: str, dead_reasons: list[str], final_statuses: list[str], lanes: list[str]) -> None:
    """Zero samples for an account's series that alerts and panels read, so a quiet account shows 0
    instead of no data until its first event."""
    for lane in lanes:
        PAUSED.labels(account, lane).set(0)
        LANE_OUTCOMES.labels(account, lane, "accepted").inc(0)
    IN_FLIGHT.labels(account).set(0)
    RATE_LIMIT_WAIT.labels(account).inc(0)
    for encoding in ("gsm7", "ucs2"):
        PARTS.labels(account, encoding).inc(0)
    for kind in ("retry", "wait", "defer"):
        RETRIES.labels(account, kind).inc(0)
    for reason in dead_reasons:
        DEAD_LETTERS.labels(account, reason).inc(0)
    for status in final_statuses:
        DLR_EVENTS.labels(account, status).inc(0)


def render() -> bytes:
    """The exposition text. Its cost grows with the series (tens of microseconds each): /metrics
    renders it on a thread, so a scrape of a thousand accounts' series does not hold the loop."""
    return generate_latest(REGISTRY)


HTTP_CONNECTIONS = Gauge("sms_http_connections", "Open connections on the gateway's HTTP port", registry=REGISTRY)
HTTP_CLOSED = Counter(
    "sms_http_connections_closed",
    "Connections the HTTP port closed itself: `evicted` (the oldest still owing its request head, to "
    "make room under the cap), `refused` (over the cap, none to evict), `header_timeout` (no request "
    "head in time), `idle` (keep-alive idle too long)",
    ["reason"],
    registry=REGISTRY,
)
HTTP_ACCEPT_ERRORS = Counter(
    "sms_http_accept_errors",
    "Connections the HTTP port could not accept (the process ran out of files or memory)",
    registry=REGISTRY,
)
