"""Send classes: what each lane's policy asks of a request at admission, without I/O.

    urgent  a request without `expires_at` is valid for `urgent_validity_s` from its AMQP timestamp
            (or its first consumption); past that it ends `expired`, never sent late
    normal  as it comes
    bulk    a recipient inside the account's quiet hours, in the number's own time zone, waits as a
            delayed copy until the window ends: no claim, no tokens, never refused

The priority between lanes is not here: it lives next to the account's token bucket in the state
store (`RateStore.acquire` with a lane rank), so it holds across replicas.
"""

from __future__ import annotations

import functools
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_zones

from gateway import contract as c
from gateway.config import QuietHours
from gateway.contract import Lane

_UNKNOWN_ZONE = "Etc/Unknown"


def rank(lane: Lane) -> int:
    """0 for urgent, 1 normal, 2 bulk: the lower serves first."""
    return c.LANES.index(lane)


@functools.lru_cache(maxsize=4096)
def zones_of(phone: str, fallback_country: str) -> tuple[ZoneInfo, ...]:
    """The recipient's time zones from its number (E.164); the account's country's when the number's
    are unknown. A number that spans zones (a US toll-free one, a Russian mobile) has them all."""
    try:
        names = phone_zones.time_zones_for_number(phonenumbers.parse(phone, None))
    except phonenumbers.NumberParseException:
        names = ()
    if not names or names == (_UNKNOWN_ZONE,):
        names = tuple(phone_zones.time_zones_for_geographical_number(_example(fallback_country)))
    zones = []
    for name in names:
        try:
            zones.append(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError):
            continue
    return tuple(zones)


def _example(country: str) -> phonenumbers.PhoneNumber:
    example = phonenumbers.example_number(country)
    return example if example is not None else phonenumbers.PhoneNumber()


def quiet_wait_s(window: QuietHours, phone: str, fallback_country: str, now: datetime) -> float:
    """How long a bulk request to `phone` waits at `now` (aware), 0 when it may go now.

    A number may ring in several zones (a Russian mobile, a US toll-free number). It waits until the
    window has ended in every one of them, the reading that never wakes anyone, when the zones share
    an awake hour. When they are too far apart to share one (+1 800 spans Guam to Hawaii), that
    reading would hold it for ever: it then waits only while all of them are inside the window."""
    locals_ = [now.astimezone(z) for z in zones_of(phone, fallback_country)]
    if not locals_:
        return 0.0
    left = [window.seconds_left(t) for t in locals_]
    offsets = frozenset(round(o.total_seconds() / 60) for t in locals_ if (o := t.utcoffset()) is not None)
    return max(left) if _shared_awake_hour(window, offsets) else min(left)


@functools.lru_cache(maxsize=1024)
def _shared_awake_hour(window: QuietHours, offsets: frozenset[int]) -> bool:
    """Some quarter hour of the day is outside the window at every UTC offset (minutes) of `offsets`."""

    def quiet(minute: int) -> bool:
        m = minute % 1440
        return window.start <= m < window.end if window.start < window.end else m >= window.start or m < window.end

    return any(not any(quiet(utc + off) for off in offsets) for utc in range(0, 1440, 15))


def urgent_deadline(published_at: float | None, now: float, validity_s: float) -> float:
    """Epoch seconds past which an urgent request without `expires_at` is no longer worth sending."""
    return (published_at if published_at is not None else now) + validity_s


def defer_step_ms(wait_s: float, delays_ms: list[int]) -> int:
    """The delayed-copy queue to wait in: the longest declared delay not past `wait_s` (the copy
    looks again and takes the next hop), or the shortest when `wait_s` is shorter than all."""
    want = wait_s * 1000
    fitting = [d for d in delays_ms if d <= want]
    return max(fitting) if fitting else min(delays_ms)
