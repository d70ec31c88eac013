"""SerwerSMS.pl error codes (docs/providers.md): the table that decides what each answer means.
Pure data and one lookup: no I/O."""

from __future__ import annotations

from gateway.contract import Status
from gateway.providers.base import UNKNOWN_TYPE, CodeRule, CodeTable, ItemResult, StatusTable
from gateway.providers.base import Action as A

NAME = "serwersms"

# The full table, 1000-4602. 3xxx and 4xxx are permanent, with three refinements: account-level
# codes pause the account; 3110 splits the request; 3111 (a duplicate unique_id under the
# account's duplicate control) means the provider already has the message.
CODES: dict[int, CodeRule] = {
    1000: CodeRule("NoAction", "no action given", A.PERMANENT),
    1001: CodeRule("InvalidUser", "incorrect login, password or token", A.ACCOUNT),
    1002: CodeRule("NoApiAccess", "the user may not use the API", A.ACCOUNT),
    1003: CodeRule("InvalidIP", "IP address not authorized", A.ACCOUNT),
    1004: CodeRule("InvalidId", "invalid ID parameter", A.PERMANENT),
    1005: CodeRule("NoPermission", "no permission", A.ACCOUNT),
    1006: CodeRule("InvalidFormat", "invalid data format", A.PERMANENT),
    1007: CodeRule("AccountInactive", "account not fully active", A.ACCOUNT),
    1008: CodeRule("NoNumbersPermission", "no permission to view numbers", A.PERMANENT),
    2000: CodeRule("MissingParams", "required parameters missing", A.PERMANENT),
    2001: CodeRule("InvalidPhone", "invalid phone number", A.PERMANENT),
    2002: CodeRule("InvalidErrorCode", "invalid error code", A.PERMANENT),
    3000: CodeRule("LimitEco", "SMS ECO+ quota exhausted", A.ACCOUNT),
    3001: CodeRule("NoPermissionEco", "no permission for SMS ECO+", A.PERMANENT),
    3002: CodeRule("LimitFull", "SMS FULL quota exhausted", A.ACCOUNT),
    3003: CodeRule("NoPermissionFull", "no permission for SMS FULL", A.PERMANENT),
    3004: CodeRule("LimitMms", "MMS quota exhausted", A.ACCOUNT),
    3005: CodeRule("NoPermissionMms", "no permission for MMS", A.PERMANENT),
    3006: CodeRule("LimitVoice", "VOICE quota exhausted", A.ACCOUNT),
    3007: CodeRule("NoPermissionVoice", "no permission for VOICE", A.PERMANENT),
    3008: CodeRule("NoPermissionFlash", "no permission for flash SMS", A.PERMANENT),
    3009: CodeRule("NoPermissionSms", "no permission to send SMS", A.PERMANENT),
    3100: CodeRule("SendingBlocked", "sending is blocked on the account", A.ACCOUNT),
    3101: CodeRule("EmptyMessage", "message is empty", A.PERMANENT),
    3102: CodeRule("MessageTooLong", "message exceeds the allowed length", A.PERMANENT),
    3103: CodeRule("WrongRecipientCount", "wrong number of recipients", A.PERMANENT),
    3104: CodeRule("NoNumbers", "no phone numbers given", A.PERMANENT),
    3105: CodeRule("InvalidMessage", "invalid message", A.PERMANENT),
    3106: CodeRule("SenderNotAllowed", "sender name may not be used", A.PERMANENT),
    3107: CodeRule("NoPersonalized", "no permission for personalized messages", A.PERMANENT),
    3108: CodeRule("InvalidDate", "invalid send time", A.PERMANENT),
    3109: CodeRule("InvalidFile", "invalid file", A.PERMANENT),
    3110: CodeRule("TooManyMessages", "too many messages in one request", A.SPLIT),
    3111: CodeRule("UniquenessError", "unique_id already used", A.ALREADY_ACCEPTED),
    3200: CodeRule("InvalidUniqueId", "invalid characters in unique_id", A.PERMANENT),
    3201: CodeRule("UniqueIdNotUnique", "unique_id repeated within the request", A.PERMANENT),
    3202: CodeRule("UniqueIdCount", "unique_id count does not match the messages", A.PERMANENT),
    3330: CodeRule("NoMessages", "no messages", A.PERMANENT),
    3331: CodeRule("NoMessages", "no messages", A.PERMANENT),
    4000: CodeRule("FileTooLarge", "file too large", A.PERMANENT),
    4001: CodeRule("FileMissing", "file does not exist", A.PERMANENT),
    4002: CodeRule("InvalidFile", "invalid file", A.PERMANENT),
    # HLR codes: 4100/4105 are transient for HLR lookups, which sends never use: as every 4xxx,
    # permanent here.
    4100: CodeRule("HlrConnection", "HLR connection error", A.PERMANENT),
    4101: CodeRule("HlrInvalidNumber", "HLR: invalid number", A.PERMANENT),
    4102: CodeRule("HlrNoPermission", "no permission for HLR", A.PERMANENT),
    4103: CodeRule("HlrLimit", "HLR query quota exhausted", A.PERMANENT),
    4104: CodeRule("HlrLockout", "HLR: account lockout", A.PERMANENT),
    4105: CodeRule("HlrWaiting", "HLR: waiting for reply", A.PERMANENT),
    4106: CodeRule("HlrInvalidId", "HLR: invalid ID", A.PERMANENT),
    4200: CodeRule("PremiumSend", "premium SMS sending error", A.PERMANENT),
    4201: CodeRule("PremiumData", "premium SMS: incorrect data", A.PERMANENT),
    **{
        code: CodeRule("AccountData", meaning, A.PERMANENT)
        for code, meaning in {
            4300: "no login",
            4301: "no password",
            4302: "no phone number",
            4303: "no e-mail",
            4304: "no name",
            4305: "no surname",
            4306: "no company name",
            4307: "wrong number",
            4308: "incorrect e-mail address",
            4309: "login too short",
            4310: "incorrect login",
            4311: "incorrect company",
            4312: "login exists",
            4313: "registration error",
            4320: "current password not given",
            4321: "current password incorrect",
            4322: "new password not given",
            4323: "new passwords differ",
            4324: "login not given",
            4325: "invalid login",
        }.items()
    },
    4400: CodeRule("SenderExists", "sender name already exists", A.PERMANENT),
    4401: CodeRule("SenderNumber", "a number cannot be a sender name", A.PERMANENT),
    4402: CodeRule("SenderInvalid", "incorrect sender name", A.PERMANENT),
    4403: CodeRule("SenderBadNumber", "incorrect number", A.PERMANENT),
    4404: CodeRule("SenderBadCode", "incorrect code or number", A.PERMANENT),
    4405: CodeRule("SenderActive", "number already active", A.PERMANENT),
    4500: CodeRule("SubaccountDepartment", "no permission for department users", A.PERMANENT),
    4501: CodeRule("SubaccountNested", "a subaccount cannot create subaccounts", A.PERMANENT),
    4502: CodeRule("SubaccountLoginBusy", "login taken", A.PERMANENT),
    4503: CodeRule("SubaccountTemplates", "no template permissions", A.PERMANENT),
    4504: CodeRule("SubaccountLogin", "incorrect login or password", A.PERMANENT),
    4600: CodeRule("BlacklistNoOp", "no blacklist operation", A.PERMANENT),
    4601: CodeRule("BlacklistExists", "number already on the list", A.PERMANENT),
    4602: CodeRule("BlacklistMissing", "number not found", A.PERMANENT),
}
UNKNOWN = CodeRule(UNKNOWN_TYPE, "code not in the SerwerSMS table", A.PERMANENT)
TABLE = CodeTable(NAME, CODES, UNKNOWN)


def classify(code: object, message: str | None = None, *, answer: object = None) -> ItemResult:
    return TABLE.classify(code, message, answer=answer)


# Delivery statuses of `messages/reports` (A10); finality is the provider document's reading.
STATUSES = StatusTable(
    NAME,
    {
        "saved": None,
        "queued": None,
        "in_progress": None,
        "sent": None,  # handed to the operator, no report yet (may stay so: the window decides)
        "delivered": Status.DELIVERED,
        "undelivered": Status.UNDELIVERED,
        "unsent": Status.UNDELIVERED,
    },
)
