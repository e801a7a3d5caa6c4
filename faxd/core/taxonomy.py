"""What a RingCentral ``faxErrorCode`` means for the people waiting on the fax.

RingCentral reports a raw code per recipient (``FaxErrorCodeEnum``, 34 values in the current spec). faxd
keeps the raw code and adds a category and a ``retryable`` flag: "retryable" means sending the same
document to the same number later may well succeed (a busy line), not that faxd retries anything itself
(faxd resends only under ``send.retry``, by category: :mod:`faxd.core.resend`).
Unknown codes are kept as they are and classed ``other``. Pure table; no I/O.
"""

from __future__ import annotations

from typing import NamedTuple


class ErrorClass(NamedTuple):
    category: str
    retryable: bool


# Every value of FaxErrorCodeEnum (rc-public-openapi.yml), plus OutgoingCallError from the 2019 spec.
FAX_ERROR_CODES: dict[str, ErrorClass] = {
    # The line or the far end was busy: try again later.
    "LineBusy": ErrorClass("busy", True),
    "AllLinesInUse": ErrorClass("busy", True),
    "TooManyCallsPerLine": ErrorClass("busy", True),
    # Nobody (or no fax machine) answered.
    "NoAnswer": ErrorClass("no_answer", True),
    "CallerHungUp": ErrorClass("no_answer", True),
    "NoCallTime": ErrorClass("no_answer", True),
    "NoFaxMachine": ErrorClass("not_a_fax", False),
    "NotAccepted": ErrorClass("not_a_fax", False),
    # The number itself is wrong.
    "InvalidNumber": ErrorClass("invalid_number", False),
    "WrongNumber": ErrorClass("invalid_number", False),
    "UnknownCountryCode": ErrorClass("invalid_number", False),
    # The far end or the network refused the call.
    "CallDeclined": ErrorClass("rejected", False),
    "ThePhoneIsBlacklisted": ErrorClass("rejected", False),
    "ProhibitedNumber": ErrorClass("rejected", False),
    "ProhibitedDestination": ErrorClass("rejected", False),
    "CallFailed": ErrorClass("rejected", True),
    "OutgoingCallError": ErrorClass("rejected", True),
    # The account is not allowed to send this fax.
    "NoFaxSendPermission": ErrorClass("permission", False),
    "NoInternationalPermission": ErrorClass("permission", False),
    "InternationalCallingDisabled": ErrorClass("permission", False),
    "InternationalDisabled": ErrorClass("permission", False),
    "DestinationCountryDisabled": ErrorClass("permission", False),
    "FaxSendingProhibited": ErrorClass("permission", False),
    "UserNotFound": ErrorClass("permission", False),
    # Money.
    "NotEnoughCredits": ErrorClass("billing", False),
    "SkypeBillingFailed": ErrorClass("billing", False),
    "AccountSuspended": ErrorClass("billing", False),
    # The document could not be rendered or was too long.
    "RenderingFailed": ErrorClass("document", False),
    "ConvertError": ErrorClass("document", False),
    "TooManyPages": ErrorClass("document", False),
    "SentPartially": ErrorClass("document", True),
    # RingCentral's own trouble: worth another try.
    "InternalError": ErrorClass("internal", True),
    "DBGeneralError": ErrorClass("internal", True),
    "ReturnToDBQueue": ErrorClass("internal", True),
    "Undefined": ErrorClass("other", True),
}

UNKNOWN = ErrorClass("other", True)


def classify(code: str | None) -> ErrorClass | None:
    """Category and retryability of ``code``; None when there is no code."""
    if not code:
        return None
    return FAX_ERROR_CODES.get(code, UNKNOWN)
