"""What every operator command shares: exit codes, settings, connections, output."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import click

from gateway.config import Settings, load_settings
from gateway.errors import BrokerRefused, BrokerUnavailable, ConfigError
from gateway.state import Store

# Exit codes (docs/operations.md, "Operator CLI").
OK = 0
FAILED = 1  # the answer is "no": drift found, the outcome was not accepted, a letter not found
USAGE = 2  # bad arguments or configuration (click's own usage errors exit 2 as well)
TIMEOUT = 3  # no outcome within --wait
UNREACHABLE = 4  # the broker, the store or the management API did not answer


class Fail(click.ClickException):
    """A one-line error and an exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code

    def show(self, file: Any = None) -> None:
        click.echo(f"gateway: {self.format_message()}", err=True)


def settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise Fail(f"configuration error: {exc}", USAGE) from None


@asynccontextmanager
async def broker(s: Settings, timeout_s: float = 10.0) -> AsyncIterator[Any]:
    """One plain (not robust) connection: a command that loses the broker fails instead of waiting."""
    from aiormq.exceptions import AMQPError, ChannelAccessRefused, ChannelNotFoundEntity, ChannelPreconditionFailed

    from gateway.bus.connect import connect

    for name in ("aiormq", "aio_pika"):  # their own error logs would repeat the one line below
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        connection = await connect(s.amqp_url.get_secret_value(), timeout_s=timeout_s)
    except BrokerRefused as exc:  # the same line and exit code as `gateway run` gives
        raise Fail(f"configuration error: GATEWAY_AMQP_URL: {exc}", USAGE) from None
    except BrokerUnavailable as exc:
        raise Fail(f"cannot reach RabbitMQ: {exc}", UNREACHABLE) from None
    except Exception as exc:  # noqa: BLE001 - a failure the bus layer does not sort: still one line
        raise Fail(f"cannot reach RabbitMQ: {_reason(exc)}", UNREACHABLE) from None
    async with connection:
        try:
            yield connection
        except ChannelNotFoundEntity as exc:
            text = str(exc.args[0] if exc.args else exc)[:200]
            raise Fail(f"{text}: the bus is not declared yet (gateway topology declare)") from None
        except (ChannelPreconditionFailed, ChannelAccessRefused) as exc:  # a refusal is an answer: exit 1
            raise Fail(f"the broker refused: {str(exc.args[0] if exc.args else exc)[:300]}") from None
        except (AMQPError, ConnectionError) as exc:  # the broker went away mid-command: nothing is lost
            raise Fail(f"RabbitMQ: {_reason(exc)}", UNREACHABLE) from None


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def state_store(s: Settings) -> Store:
    """The state store the gateways share; a URL or file it refuses is a configuration error."""
    from gateway.app import open_store
    from gateway.errors import StoreRefused

    try:
        return open_store(s)
    except StoreRefused as exc:
        where = "GATEWAY_REDIS_URL" if s.redis_url is not None else "GATEWAY_STATE_PATH"
        raise Fail(f"configuration error: {where}: {exc}", USAGE) from None


def management_url(s: Settings) -> str:
    from gateway.bus.broker_api import default_url

    if s.management_url is not None:
        return s.management_url.get_secret_value()
    return default_url(s.amqp_url.get_secret_value())


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str | None) -> datetime | None:
    """`--since`: a duration back from now (`90s`, `15m`, `2h`, `7d`) or an RFC 3339 time."""
    if text is None:
        return None
    if m := _DURATION.match(text.strip()):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: float(m.group(1))})
    try:
        ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("a duration like 30m, 2h, 7d, or an RFC 3339 time", param_hint="--since") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console = Console(soft_wrap=True)
    if not console.is_terminal:  # piped (grep, a log): one line per row, never folded
        console = Console(width=1000, soft_wrap=True)
    console.print(t)


def confirm(question: str, yes: bool) -> None:
    """Go on when `--yes` was given or the operator answers yes on a terminal. Without a terminal
    to ask, exit 2 (a usage error: a job must say `--yes`); answered no, exit 1, nothing changed."""
    if yes:
        return
    if not sys.stdin.isatty():
        die(f"{question[:-1].lower()} needs --yes: there is no terminal to ask", USAGE)
    if not click.confirm(question, default=False, err=True):
        die("not confirmed: nothing was changed", FAILED)


def die(message: str, code: int = FAILED) -> NoReturn:
    raise Fail(message, code)


def stderr(message: str) -> None:
    print(message, file=sys.stderr)
