"""SerwerSMS.pl API v2: `codes` (the error table) and `adapter` (requests, answers, lookups)."""

from gateway.providers.serwersms.adapter import SerwerSmsAdapter, build_send, parse_report, parse_send
from gateway.providers.serwersms.codes import CODES, NAME, TABLE, classify

__all__ = ["CODES", "NAME", "TABLE", "SerwerSmsAdapter", "build_send", "classify", "parse_report", "parse_send"]
