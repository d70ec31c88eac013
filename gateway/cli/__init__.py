"""`gateway`: run the service, and operate it (send, dlq, topology, accounts, trace, optout).

Every operator command has `--json` for scripts, prints one-line errors, and exits with
0 ok, 1 the answer is no (drift, not accepted, not found), 2 usage or configuration,
3 timed out, 4 the broker, store or management API unreachable (`common`)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
import structlog

from gateway.cli import accounts, dlq, optout, send, topology, trace
from gateway.cli.common import USAGE, Fail
from gateway.config import Settings, load_settings, renamed_variables, unknown_variables
from gateway.errors import ConfigError, PortInUse
from gateway.obs.logs import (
    get_logger,
    register_secrets,
    setup_logging,
    setup_logging_from_environment,
    url_secrets,
)


def _settings() -> Settings:
    settings = load_settings()
    register_secrets(
        value
        for url in (settings.amqp_url, settings.redis_url, settings.management_url)
        if url is not None
        for value in url_secrets(url.get_secret_value())
    )
    setup_logging(settings.log_format, settings.log_level)
    for name in unknown_variables():
        get_logger("gateway").warning("unknown_setting", variable=name, hint="no such setting; misspelled?")
    for name, hint in renamed_variables():
        get_logger("gateway").warning("renamed_setting", variable=name, hint=hint)
    return settings


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("sms-gateway")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version(), "--version", prog_name="gateway", message="%(prog)s %(version)s")
def cli() -> None:
    """Outbound SMS gateway: RabbitMQ in, SerwerSMS / Mobizon out.

    Settings come from GATEWAY_* variables (see `gateway config`). Exit codes: 0 ok, 1 the answer
    is no (drift found, not accepted, not found), 2 usage or configuration error, 3 timed out,
    4 RabbitMQ, the state store or the management API unreachable.
    """


@cli.command()
@click.option(
    "--sandbox", is_flag=True, help="Also serve the sandbox provider; with no accounts, use its demo account."
)
def run(sandbox: bool) -> None:
    """Consume sms.send and deliver through the providers (the service)."""
    from gateway.app import resolve_accounts
    from gateway.app import run as run_gateway
    from gateway.obs.tracing import setup_tracing

    try:
        settings = _settings()
        setup_tracing()
        accounts_ = resolve_accounts(settings, sandbox=sandbox)
        register_secrets(
            s.get_secret_value()
            for a in accounts_
            for s in (a.password, a.token, a.api_key, a.webhook_secret)
            if s is not None
        )
        asyncio.run(run_gateway(settings, accounts_, sandbox=sandbox))
    except ConfigError as exc:
        # A log line like every other line of the service (JSON when asked for), exit code 2.
        if not structlog.is_configured():
            setup_logging_from_environment()
        get_logger("gateway").error("configuration_error", error=str(exc))
        sys.exit(USAGE)
    except Exception:  # noqa: BLE001 - anything that ends the process
        # Logged, not printed: with JSON logs asked for, the traceback is a field of one JSON line.
        get_logger("gateway").exception("gateway_crashed")
        sys.exit(1)


@cli.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="Default: GATEWAY_SANDBOX_PORT (8580).")
def sandbox_cmd(host: str, port: int | None) -> None:
    """Serve the sandbox provider API (both providers' wire formats)."""
    from gateway.sandbox.app import serve

    settings = _settings()
    try:
        asyncio.run(serve(host, port if port is not None else settings.sandbox_port))
    except PortInUse as exc:
        where = "--port" if port is not None else "GATEWAY_SANDBOX_PORT"
        raise Fail(f"configuration error: {where}: {exc} (choose another port)", USAGE) from None


@cli.command()
@click.option("--sandbox", is_flag=True, help="As `run --sandbox` would see it.")
def config(sandbox: bool) -> None:
    """Print the effective configuration as JSON, secrets masked."""
    from gateway.app import resolve_accounts

    settings = load_settings()
    doc: dict[str, Any] = settings.model_dump(mode="json", exclude={"accounts"})
    if settings.redis_url is not None:
        doc["redis_url"] = "**********"
    if settings.management_url is not None:
        doc["management_url"] = mask_url(settings.management_url.get_secret_value())
    doc["amqp_url"] = mask_url(settings.amqp_url.get_secret_value())
    doc["accounts"] = [a.redacted() for a in resolve_accounts(settings, sandbox=sandbox)]
    click.echo(json.dumps(doc, indent=2))


def mask_url(url: str) -> str:
    """amqp://user:secret@host/ -> amqp://user:****@host/"""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:****@{host}"


cli.add_command(send.send)
cli.add_command(dlq.dlq)
cli.add_command(topology.topology)
cli.add_command(accounts.accounts)
cli.add_command(trace.trace)
cli.add_command(optout.optout)


def main(argv: list[str] | None = None) -> int:
    try:
        code = cli.main(args=argv, prog_name="gateway", standalone_mode=False)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return USAGE
    except Fail as exc:
        exc.show()
        return exc.code
    except click.ClickException as exc:  # usage errors: click's message, exit 2
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0  # a command's int is its exit code


if __name__ == "__main__":
    sys.exit(main())
