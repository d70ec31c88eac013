"""Recipient numbers: normalize to E.164 with the account's default country; mask for logs."""

from __future__ import annotations

import functools

import phonenumbers
from phonenumbers.phonemetadata import PhoneMetadata

from gateway.errors import InvalidNumber


def preload() -> None:
    """Load every region's metadata now. `phonenumbers` loads a region's on first use, importing a
    module under a lock; an import that fails for want of files (a flood of connections) left that
    lock held and the next number of the region waited for good. At start-up nothing can fail it."""
    PhoneMetadata.load_all()


@functools.lru_cache(maxsize=16384)
def normalize(raw: str, default_region: str) -> str:
    """E.164 (`+48500600700`) from what a producer wrote.

    `+…` or `00…` is international. Otherwise the number is read as national in the account's
    country first and, when that is not a valid number, as international digits without the `+`.
    Cached per (number, region) for the numbers that come again (codes, retries, redeliveries);
    an invalid number raises every time and is not kept.
    """
    text = raw.strip()
    if not text or len(text) > 32:
        raise InvalidNumber("number is empty or too long")
    candidates: list[tuple[str, str | None]] = []
    if text.startswith("+"):
        candidates.append((text, None))
    elif text.startswith("00"):
        candidates.append(("+" + text[2:], None))
    else:
        candidates += [(text, default_region), ("+" + text, None)]
    for number, region in candidates:
        try:
            parsed = phonenumbers.parse(number, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed):
            return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))
    raise InvalidNumber(f"not a valid phone number for region {default_region} or in E.164")


@functools.lru_cache(maxsize=65536)
def country_of(e164: str) -> str | None:
    """The ISO 3166 alpha-2 region of an E.164 number (`+48...` -> `PL`); None for a number that
    belongs to no region (international services, `+800 ...`)."""
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(e164, None))
    except phonenumbers.NumberParseException:
        return None
    return region if region and region != "001" else None


@functools.lru_cache(maxsize=65536)
def number_prefix(e164: str) -> str:
    """The number's range: its country calling code and the next two digits (`+48500600700` ->
    `+4850`), what a fraud alert names without naming the number."""
    try:
        code = str(phonenumbers.parse(e164, None).country_code)
    except phonenumbers.NumberParseException:
        return e164[:4]
    return e164[: 1 + len(code) + 2]


def mask(number: str | None) -> str | None:
    """Keep the country code and the last three digits: `+48500600700` -> `+485*****700`."""
    if not number:
        return number
    digits = number.lstrip("+")
    if len(digits) <= 6:
        return "*" * len(number)
    return ("+" if number.startswith("+") else "") + digits[:3] + "*" * (len(digits) - 6) + digits[-3:]
