"""Helpers the tests and the benchmarks share (the `bench/` scripts are no tests, so the helpers
live here and not under tests/): the local services, the bus as a producer sees it, and the
sandbox and gateway processes."""

from testkit.bus import Bus, Received, account_doc, new_account_name, request
from testkit.processes import Process, Sandbox, gateway_env, start_gateway, start_sandbox
from testkit.services import (
    AMQP_URL,
    AMQP_VHOST,
    REDIS_URL,
    ROOT,
    close_broker_connections,
    consumers_on,
    delete_account_queues,
    eventually,
    free_port,
    free_ports,
    port_open,
    rabbitmqctl,
    wait_until,
)

__all__ = [
    "AMQP_URL",
    "AMQP_VHOST",
    "REDIS_URL",
    "ROOT",
    "Bus",
    "Process",
    "Received",
    "Sandbox",
    "account_doc",
    "close_broker_connections",
    "consumers_on",
    "delete_account_queues",
    "eventually",
    "free_port",
    "free_ports",
    "gateway_env",
    "new_account_name",
    "port_open",
    "rabbitmqctl",
    "request",
    "start_gateway",
    "start_sandbox",
    "wait_until",
]
