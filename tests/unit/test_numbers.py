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
