"""`gateway send`: publish one request as any producer would, and wait for its outcome."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import click

from gateway.cli import common as x


def _var(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--var")
        out[key] = value
    return out or None


@click.command()
@click.option("--account", "-a", default="demo", show_default=True, help="Account name (the routing key).")
@click.option("--to", "to", required=True, help="Recipient, E.164 (+48500600700) or national.")
@click.option("--text", required=True, help="Message text; {name} placeholders only with --var.")
@click.option("--var", "vars_", multiple=True, callback=_var, metavar="KEY=VALUE", help="A placeholder value; repeat.")
@click.option("--sender", help="Sender name (default: the account's).")
@click.option("--unique-id", help="Idempotency key (default: a new UUID).")
@click.option("--test", is_flag=True, help="Dry run: validated and answered, nothing reaches a phone.")
@click.option(
    "--wait",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for the outcome; 0 publishes and returns.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome document as JSON.")
def send(
    account: str,
    to: str,
    text: str,
    vars_: dict[str, str] | None,
    sender: str | None,
    unique_id: str | None,
    test: bool,
    wait: float,
    as_json: bool,
) -> int:
    """Publish one send request to sms.send and print its outcome.

    Exits 0 when the outcome is accepted (or a duplicate of an accepted one), 1 for any other
    outcome, 3 when none came within --wait, 4 when RabbitMQ is unreachable.

    \b
      gateway send --to +48500600700 --text "Your code is {code}" --var code=4711
    """
    request: dict[str, Any] = {"v": 1, "unique_id": unique_id or str(uuid.uuid4()), "to": to, "text": text}
    if vars_:
        request["vars"] = vars_
    if sender:
        request["sender"] = sender
    if test:
        request["test"] = True
    return asyncio.run(_send(request, account, wait, as_json))


async def _send(request: dict[str, Any], account: str, wait: float, as_json: bool) -> int:
    import aio_pika
    from aiormq.exceptions import ChannelNotFoundEntity

    from gateway import contract as c

    correlation = uuid.uuid4().hex
    async with x.broker(x.settings()) as connection:
        channel = await connection.channel(publisher_confirms=True)
        # Direct reply-to: no queue to declare or delete; the outcome comes back on this channel.
        replies = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        outcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if message.correlation_id == correlation and not outcome.done():
                outcome.set_result(json.loads(message.body))

        if wait > 0:
            await replies.consume(on_reply, no_ack=True)
        try:
            exchange = await channel.get_exchange(c.SEND_EXCHANGE, ensure=True)
        except ChannelNotFoundEntity:
            x.die("exchange sms.send does not exist: run `gateway topology declare` or start a gateway")
        await exchange.publish(
            aio_pika.Message(
                json.dumps(request, ensure_ascii=False).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=request["unique_id"],
                correlation_id=correlation,
                reply_to="amq.rabbitmq.reply-to" if wait > 0 else None,
            ),
            routing_key=account,
        )
        x.stderr(f"published {request['unique_id']} to account {account}")
        if wait <= 0:
            return x.OK
        try:
            doc = await asyncio.wait_for(outcome, wait)
        except TimeoutError:
            x.stderr(f"no outcome within {wait:g}s (is a gateway running for account {account}?)")
            return x.TIMEOUT
    if as_json:
        x.emit_json(doc)
    else:
        _print_outcome(doc)
    status = doc.get("status")
    original = doc.get("original") or {}
    accepted = status == "accepted" or (status == "duplicate" and original.get("status") == "accepted")
    return x.OK if accepted else x.FAILED


def _print_outcome(doc: dict[str, Any]) -> None:
    err = doc.get("error") or {}
    parts = [
        str(doc.get("status")),
        f"unique_id={doc.get('unique_id')}",
        f"provider={doc.get('provider')}",
    ]
    if doc.get("provider_message_id"):
        parts.append(f"provider_message_id={doc['provider_message_id']}")
    if doc.get("parts"):
        parts.append(f"parts={doc['parts']}")
    if err:
        parts.append(f"error={err.get('code')} {err.get('message')}")
    if doc.get("original"):
        parts.append(f"original={doc['original'].get('status')}")
    click.echo("  ".join(parts))
