"""Mobizon API v1 codes (docs/providers.md): what each answer means.
Pure data and lookups: no I/O."""

from __future__ import annotations

from typing import Any

from gateway.contract import Status
from gateway.providers.base import UNKNOWN_TYPE, CodeRule, CodeTable, ItemResult, StatusTable
from gateway.providers.base import Action as A

NAME = "mobizon"

# Request-level codes. 3, 10 and 30 are retryable (3 after reconciling: the send may have happened).
CODES: dict[int, CodeRule] = {
    1: CodeRule("ValidationError", "validation error", A.PERMANENT),
    2: CodeRule("NotFound", "record not found", A.PERMANENT),
    3: CodeRule("ApplicationError", "unidentified application error", A.AMBIGUOUS),
    4: CodeRule("BadModule", "wrong module", A.PERMANENT),
    5: CodeRule("BadMethod", "wrong method", A.PERMANENT),
    6: CodeRule("BadFormat", "wrong output format", A.PERMANENT),
    8: CodeRule("LoginFailed", "login failed (bad API key)", A.ACCOUNT),
    9: CodeRule("NoAccess", "no access to the method", A.PERMANENT),
    10: CodeRule("ConcurrentWrite", "concurrent-write error, record locked", A.RETRYABLE),
    11: CodeRule("MissingParams", "required parameters missing", A.PERMANENT),
    12: CodeRule("LimitBroken", "a parameter breaks a limit", A.SPLIT),
    13: CodeRule("WrongHost", "wrong regional API host", A.REDIRECT),
    14: CodeRule("AccountBlocked", "account blocked or deleted", A.ACCOUNT),
    15: CodeRule("OperationError", "operation error", A.PERMANENT),
    30: CodeRule("RateLimited", "too many calls to this method", A.THROTTLE),
    98: CodeRule("PartialSuccess", "some items processed", A.RETRYABLE),
    99: CodeRule("NothingProcessed", "no item processed", A.RETRYABLE),
    999: CodeRule("ServiceError", "general service error", A.AMBIGUOUS),
}
# Per-recipient codes of Campaign/AddRecipients (B6). Retried: 4, 51 and 99. Code 4 says the number
# is already in this campaign, so this recipient was not added (a number appears once per campaign);
# it is no fault of the message, and the next attempt sends it in another request.
RECIPIENT_CODES: dict[int, CodeRule] = {
    1: CodeRule("EmptyNumber", "empty number", A.PERMANENT),
    2: CodeRule("NumberNotFound", "number not found in the data", A.PERMANENT),
    3: CodeRule("NotInternational", "number not in international format", A.PERMANENT),
    4: CodeRule("DuplicateInCampaign", "number already in this campaign", A.RETRYABLE),
    5: CodeRule("StopList", "number is on the stop list", A.PERMANENT),
    6: CodeRule("CountryBlocked", "country blocked by account settings", A.PERMANENT),
    7: CodeRule("UnknownOperator", "unknown operator or country", A.PERMANENT),
    8: CodeRule("OperatorNotSupported", "operator not supported", A.PERMANENT),
    20: CodeRule("MissingPlaceholders", "placeholder values missing", A.PERMANENT),
    30: CodeRule("ContactCard", "contact card problem", A.PERMANENT),
    31: CodeRule("ContactCard", "contact card problem", A.PERMANENT),
    32: CodeRule("ContactCard", "contact card problem", A.PERMANENT),
    51: CodeRule("ShortLinkUnavailable", "short link temporarily unavailable", A.RETRYABLE),
    99: CodeRule("SystemError", "system error", A.RETRYABLE),
}
UNKNOWN = CodeRule(UNKNOWN_TYPE, "code not in the Mobizon table", A.PERMANENT)
TABLE = CodeTable(NAME, CODES, UNKNOWN)
RECIPIENT_TABLE = CodeTable(NAME, RECIPIENT_CODES, UNKNOWN)
SUCCESS = {0, 100}  # 100: accepted as a background task
ADD_OVERALL = {0, 98, 99}  # AddRecipients: all, some or none added; the rows say which


def number(value: Any) -> int | None:
    """A code as an integer (codes arrive as integers or strings)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def classify(code: Any, message: str | None = None, *, table: CodeTable = TABLE, answer: Any = None) -> ItemResult:
    return table.classify(code, message, answer=answer)


def is_redirect(code: Any) -> bool:
    rule = TABLE.rule(code)
    return rule is not None and rule.action is A.REDIRECT


# Delivery statuses (B9). Final: DELIVRD (delivered); UNDELIV, REJECTD, EXPIRED, DELETED (not
# delivered). EXPIRD is how a community SDK spells EXPIRED; the documents' spelling is EXPIRED.
STATUSES = StatusTable(
    NAME,
    {
        "NEW": None,
        "ENQUEUD": None,
        "ACCEPTD": None,
        "PDLIVRD": None,  # some segments delivered; takes the first segment's status later
        "UNKNOWN": None,
        "SCHEDUL": None,
        "DELIVRD": Status.DELIVERED,
        "UNDELIV": Status.UNDELIVERED,
        "REJECTD": Status.UNDELIVERED,
        "EXPIRED": Status.UNDELIVERED,
        "EXPIRD": Status.UNDELIVERED,
        "DELETED": Status.UNDELIVERED,
    },
)
