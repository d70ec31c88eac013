"""`gateway` command line: run, sandbox, config, send."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

from gateway.config import ConfigError, Settings, load_settings, unknown_variables
from gateway.telemetry import get_logger, setup_logging


def _settings() -> Settings:
    settings = load_settings()
    setup_logging(settings.log_format, settings.log_level)
    for name in unknown_variables():
        get_logger("gateway").warning("unknown_setting", variable=name, hint="no such setting; misspelled?")
    return settings


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("sms-gateway")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import resolve_accounts, run
    from gateway.tracing import setup_tracing

    settings = _settings()
    setup_tracing()
    accounts = resolve_accounts(settings, sandbox=args.sandbox)
    try:
        asyncio.run(run(settings, accounts, sandbox=args.sandbox))
    except ConfigError:
        raise  # one line and exit code 2 (main)
    except Exception:  # noqa: BLE001 - anything that ends the process
        # Logged, not printed: with JSON logs asked for, the traceback is a field of one JSON line.
        get_logger("gateway").exception("gateway_crashed")
        return 1
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.sandbox.app import serve

    settings = _settings()
    asyncio.run(serve(args.host, args.port if args.port is not None else settings.sandbox_port))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from gateway.app import resolve_accounts

    settings = load_settings()
    doc: dict[str, Any] = settings.model_dump(mode="json", exclude={"accounts"})
    if settings.redis_url is not None:
        doc["redis_url"] = "**********"
    doc["amqp_url"] = _mask_url(settings.amqp_url.get_secret_value())
    doc["accounts"] = [a.redacted() for a in resolve_accounts(settings, sandbox=args.sandbox)]
    print(json.dumps(doc, indent=2))
    return 0


def _mask_url(url: str) -> str:
    """amqp://user:secret@host/ -> amqp://user:****@host/"""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:****@{host}"


async def _send(args: argparse.Namespace, settings: Settings) -> int:
    import aio_pika

    from gateway import contract as c

    request: dict[str, Any] = {
        "v": 1,
        "unique_id": args.unique_id or str(uuid.uuid4()),
        "to": args.to,
        "text": args.text,
    }
    if args.sender:
        request["sender"] = args.sender
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue("", exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(c.SEND_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(request).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=request["unique_id"],
                reply_to=replies.name,
            ),
            routing_key=args.account,
        )
        print(json.dumps({"published": request["unique_id"], "account": args.account}), file=sys.stderr)
        if args.wait <= 0:
            return 0
        try:
            async with asyncio.timeout(args.wait):
                async with replies.iterator() as messages:
                    async for message in messages:
                        await message.ack()
                        outcome = json.loads(message.body)
                        print(json.dumps(outcome, indent=2))
                        return 0 if outcome.get("status") in ("accepted", "duplicate") else 1
        except TimeoutError:
            print(f"no outcome within {args.wait}s", file=sys.stderr)
            return 3
    return 3


def cmd_send(args: argparse.Namespace) -> int:
    return asyncio.run(_send(args, load_settings()))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gateway", description="Outbound SMS gateway")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume sms.send and deliver through the providers")
    run.add_argument(
        "--sandbox",
        action="store_true",
        help="also serve the sandbox provider; with no accounts configured, use its demo account",
    )
    run.set_defaults(fn=cmd_run)

    sb = sub.add_parser("sandbox", help="serve the sandbox provider API")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=None, help="default: GATEWAY_SANDBOX_PORT (8580)")
    sb.set_defaults(fn=cmd_sandbox)

    cfg = sub.add_parser("config", help="print the effective configuration, secrets masked")
    cfg.add_argument("--sandbox", action="store_true", help="as `run --sandbox` would see it")
    cfg.set_defaults(fn=cmd_config)

    send = sub.add_parser("send", help="publish one send request and print its outcome")
    send.add_argument("--account", default="demo")
    send.add_argument("--to", required=True)
    send.add_argument("--text", required=True)
    send.add_argument("--sender")
    send.add_argument("--unique-id")
    send.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the outcome (0: don't)")
    send.set_defaults(fn=cmd_send)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.fn(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
