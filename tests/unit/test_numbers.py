from __future__ import annotations

import pytest

from gateway.errors import InvalidNumber
from gateway.numbers import mask, normalize


@pytest.mark.parametrize(
    ("raw", "region", "e164"),
    [
        ("500600700", "PL", "+48500600700"),
        ("+48 500 600 700", "PL", "+48500600700"),
        ("0048500600700", "PL", "+48500600700"),
        ("48500600700", "PL", "+48500600700"),
        ("+77011234567", "PL", "+77011234567"),
        ("7011234567", "KZ", "+77011234567"),
    ],
)
def test_normalize(raw: str, region: str, e164: str) -> None:
    assert normalize(raw, region) == e164


@pytest.mark.parametrize("raw", ["", "12", "abc", "+999123", "1" * 40])
def test_invalid_numbers_are_refused(raw: str) -> None:
    with pytest.raises(InvalidNumber):
        normalize(raw, "PL")


def test_mask_hides_the_middle() -> None:
    assert mask("+48500600700") == "+485*****700"
    assert mask("12345") == "*****"
    assert mask(None) is None


def test_a_number_seen_again_is_read_from_the_cache_and_the_region_is_part_of_the_key() -> None:
    normalize.cache_clear()
    assert normalize("500600701", "PL") == "+48500600701"
    assert normalize("500600701", "PL") == "+48500600701"
    assert normalize.cache_info().hits == 1
    # The same digits read in another country are another number.
    assert normalize("7011234567", "KZ") == "+77011234567"
    with pytest.raises(InvalidNumber):
        normalize("7011234567", "PL")
    # An invalid number raises every time: nothing of it is kept.
    misses = normalize.cache_info().misses
    for _ in range(2):
        with pytest.raises(InvalidNumber):
            normalize("abc", "PL")
    assert normalize.cache_info().misses == misses + 2
