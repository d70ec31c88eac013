"""Segments and encoding against known vectors, and transliteration (gateway/segments.py)."""

from __future__ import annotations

import pytest

from gateway.segments import GSM_BASIC, GSM_EXTENSION, Encoding, Transliterate, count, is_gsm7, transliterate

GSM, UCS2 = Encoding.GSM7, Encoding.UCS2


@pytest.mark.parametrize(
    ("text", "encoding", "units", "parts"),
    [
        ("a" * 160, GSM, 160, 1),
        ("a" * 161, GSM, 161, 2),
        ("a" * 306, GSM, 306, 2),  # 2 x 153
        ("a" * 307, GSM, 307, 3),
        ("ą" * 70, UCS2, 70, 1),
        ("ą" * 71, UCS2, 71, 2),
        ("ą" * 134, UCS2, 134, 2),  # 2 x 67
        ("ą" * 135, UCS2, 135, 3),
        ("€" * 80, GSM, 160, 1),  # the extension counts two
        ("€" * 81, GSM, 162, 2),
        ("a" * 159 + "€", GSM, 161, 2),
        ("😀" * 35, UCS2, 70, 1),  # an emoji is two UTF-16 units
        ("😀" * 36, UCS2, 72, 2),
        ("", GSM, 0, 1),
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ!¤¡ÄÖÑÜ§¿äöñüà", GSM, 43, 1),
    ],
)
def test_known_vectors(text: str, encoding: Encoding, units: int, parts: int) -> None:
    seg = count(text)
    assert (seg.encoding, seg.units, seg.parts) == (encoding, units, parts)


def test_an_escape_pair_is_never_split_across_parts() -> None:
    # 152 plain septets then one extension character: 154 septets do not fit the first part's 153,
    # so the pair starts the second part.
    text = "a" * 152 + "€" + "b" * 10
    assert count(text).units == 164
    assert count(text).parts == 2
    # Parts filled to the brim: 153 + 153 = 306 plain septets, then one more pair needs a third part.
    assert count("a" * 152 + "€" + "a" * 151).parts == 2
    assert count("a" * 152 + "{" + "a" * 153).parts == 3


def test_a_surrogate_pair_is_never_split_across_parts() -> None:
    # 66 units, then an emoji (2): 68 does not fit a concatenated part's 67.
    text = "ą" * 66 + "😀" + "ą" * 10
    assert count(text).units == 78
    assert count(text).parts == 2
    assert count("ą" * 66 + "😀" + "ą" * 66).parts == 3  # 66 | 2 + 65 | 1


def test_the_alphabets_have_their_sizes() -> None:
    assert len(GSM_BASIC) == 127  # 128 codes, one of them the escape
    assert len(GSM_EXTENSION) == 10
    assert not is_gsm7("ç")  # only the capital Ç is in the default alphabet
    assert is_gsm7("Ç")


def test_full_transliteration_sends_polish_as_gsm7_in_one_part() -> None:
    text, mapped = transliterate("Zażółć gęślą jaźń", Transliterate.FULL)
    assert (text, mapped) == ("Zazolc gesla jazn", Transliterate.FULL)
    assert count(text) == count("Zazolc gesla jazn")
    assert count(text).encoding is GSM


def test_off_sends_the_text_as_written() -> None:
    assert transliterate("Zażółć gęślą jaźń", Transliterate.OFF) == ("Zażółć gęślą jaźń", Transliterate.OFF)
    assert count("Zażółć gęślą jaźń").encoding is UCS2


def test_lookalikes_map_quotes_dashes_ellipses_and_spaces_only() -> None:
    text = "\u201eHello\u201d \u2014 it\u2019s\u00a0ready\u2026"
    assert transliterate(text, Transliterate.LOOKALIKES) == ('"Hello" - it\'s ready...', Transliterate.LOOKALIKES)
    # A letter with a diacritic is not a lookalike: the text stays as written.
    assert transliterate("\u201eDzień\u201d", Transliterate.LOOKALIKES) == ("\u201eDzień\u201d", Transliterate.OFF)
    # Full maps both.
    assert transliterate("\u201eDzień\u201d", Transliterate.FULL) == ('"Dzien"', Transliterate.FULL)


def test_a_text_that_cannot_become_gsm7_is_left_as_written() -> None:
    # One emoji keeps every part UCS-2: mapping the rest would change the text and save nothing.
    text = "Zażółć \u2014 😀"
    assert transliterate(text, Transliterate.FULL) == (text, Transliterate.OFF)


def test_letters_already_in_the_default_alphabet_are_kept() -> None:
    assert transliterate("Müller café ł", Transliterate.FULL) == ("Müller café l", Transliterate.FULL)


def test_the_typographic_quote_costs_the_parts_it_costs() -> None:
    # 100 plain characters and one typographic apostrophe: as written it is UCS-2 in two parts.
    text = "a" * 100 + "\u2019"
    assert count(text).parts == 2
    plain, mapped = transliterate(text, Transliterate.LOOKALIKES)
    assert mapped is Transliterate.LOOKALIKES
    assert count(plain).parts == 1
