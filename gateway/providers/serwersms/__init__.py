"""SerwerSMS.pl API v2: `codes` (the error table) and `adapter` (requests, answers, lookups). Its
delivery callbacks are not taken (their format is undocumented): reports come from polling."""

from gateway.providers.base import Provider
from gateway.providers.serwersms.adapter import SerwerSmsAdapter, build_send, parse_report, parse_send
from gateway.providers.serwersms.codes import CODES, NAME, TABLE, classify

__all__ = [
    "CODES",
    "NAME",
    "PROVIDER",
    "TABLE",
    "SerwerSmsAdapter",
    "build_send",
    "classify",
    "parse_report",
    "parse_send",
]

PROVIDER = Provider(NAME, SerwerSmsAdapter)
