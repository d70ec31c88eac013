"""How an SMS text is encoded and split into parts, computed locally (3GPP TS 23.038 and 23.040).

- GSM-7 when every character is in the GSM 03.38 default alphabet or its extension table (an
  extension character is sent as ESC + character: it counts two septets). One part holds 160
  septets; a concatenated message's parts hold 153 each (the user data header takes 7), and an
  escape pair is never split across two parts.
- UCS-2 otherwise, counted in UTF-16 code units (a character outside the Basic Multilingual Plane,
  an emoji, counts two). One part holds 70 units, a concatenated one 67, and a surrogate pair is
  never split.

`transliterate` makes a text GSM-7 where a mapping can: `lookalikes` replaces typographic quotes,
dashes, ellipses and odd spaces with their plain forms; `full` also replaces Latin letters with
diacritics (Polish first) by their base letters. Either applies only when the whole text then fits
GSM-7: one character that stays UCS-2 makes every part UCS-2, and changing the rest would alter the
text without saving a part.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum


class Encoding(StrEnum):
    GSM7 = "gsm7"
    UCS2 = "ucs2"


class Transliterate(StrEnum):
    OFF = "off"
    LOOKALIKES = "lookalikes"
    FULL = "full"


# The default alphabet, in code order (0x00-0x7F); 0x1B is the escape to the extension table.
_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_EXTENSION = "\f^{}\\[~]|€"
GSM_BASIC = frozenset(_BASIC) - {"\x1b"}
GSM_EXTENSION = frozenset(_EXTENSION)

SINGLE = {Encoding.GSM7: 160, Encoding.UCS2: 70}
CONCATENATED = {Encoding.GSM7: 153, Encoding.UCS2: 67}

# Written as escapes: these characters are hard to tell from their plain forms on screen.
_LOOKALIKES = {
    # single quotes, prime, grave and acute accents
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u0060\u00b4", "'"),
    # double quotes, double prime, guillemets
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
    # hyphen, non-breaking hyphen, figure dash, en dash, em dash, horizontal bar, minus sign
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
    "\u2026": "...",  # horizontal ellipsis
    # a tab, the non-breaking spaces and the spaces of other widths
    **dict.fromkeys(
        "\t\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000", " "
    ),
    # invisible: zero-width spaces and joiners, word joiner, byte order mark, soft hyphen
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad", ""),
}
# Letters whose base letter Unicode decomposition does not give (dotless i, ligatures, strokes).
_LETTERS = {
    "\u0142": "l",
    "\u0141": "L",
    "\u0111": "d",
    "\u0110": "D",
    "\u0127": "h",
    "\u0126": "H",
    "\u0131": "i",
    "\u0153": "oe",
    "\u0152": "OE",
    "\u0140": "l",
}


@dataclass(frozen=True, slots=True)
class Segments:
    encoding: Encoding
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    parts: int


def char_units(ch: str, encoding: Encoding) -> int:
    if encoding is Encoding.GSM7:
        return 2 if ch in GSM_EXTENSION else 1
    return 2 if ord(ch) > 0xFFFF else 1


def is_gsm7(text: str) -> bool:
    return all(ch in GSM_BASIC or ch in GSM_EXTENSION for ch in text)


def count(text: str) -> Segments:
    """The encoding a text needs and the parts it is sent in."""
    encoding = Encoding.GSM7 if is_gsm7(text) else Encoding.UCS2
    widths = [char_units(ch, encoding) for ch in text]
    units = sum(widths)
    if units <= SINGLE[encoding]:
        return Segments(encoding, units, 1)
    room = CONCATENATED[encoding]
    parts, used = 1, 0
    for width in widths:  # a character that does not fit whole starts the next part
        if used + width > room:
            parts, used = parts + 1, 0
        used += width
    return Segments(encoding, units, parts)


def _strip_diacritics(ch: str) -> str:
    if ch in GSM_BASIC or ch in GSM_EXTENSION:
        return ch  # é, ü, Å, ... are in the default alphabet already
    if ch in _LETTERS:
        return _LETTERS[ch]
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return base if base and is_gsm7(base) else ch


def transliterate(text: str, mode: Transliterate) -> tuple[str, Transliterate]:
    """The text to send and the mapping that made it GSM-7 (OFF when it was sent as written)."""
    if mode is Transliterate.OFF or is_gsm7(text):
        return text, Transliterate.OFF
    plain = "".join(_LOOKALIKES.get(ch, ch) for ch in text)
    if is_gsm7(plain):
        return plain, Transliterate.LOOKALIKES
    if mode is Transliterate.FULL:
        bare = "".join(_strip_diacritics(ch) for ch in plain)
        if is_gsm7(bare):
            return bare, Transliterate.FULL
    return text, Transliterate.OFF
