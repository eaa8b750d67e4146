"""The errors a user meets in a stage, each with its own exit code and a message that says what to fix.

Messages name handles, URLs and Secrets, never a token or a post's text.
"""

from __future__ import annotations


class StageError(Exception):
    exit_code = 1
    reason = "StageFailed"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ContractMismatch(StageError):
    exit_code, reason = 2, "ContractMismatch"


class UnknownHandle(StageError):
    exit_code, reason = 10, "UnknownHandle"


class PrivateAccount(StageError):
    exit_code, reason = 11, "PrivateAccount"


class AuthenticationFailed(StageError):
    exit_code, reason = 12, "AuthenticationFailed"


class RateLimited(StageError):
    exit_code, reason = 13, "RateLimited"


class NetworkFailure(StageError):
    exit_code, reason = 14, "NetworkFailure"


class EmptyTimeline(StageError):
    exit_code, reason = 15, "EmptyTimeline"


class MalformedInput(StageError):
    exit_code, reason = 16, "MalformedInput"


class NotEnoughText(StageError):
    exit_code, reason = 17, "NotEnoughText"


class MissingInput(StageError):
    exit_code, reason = 18, "MissingInput"


class DatasetTooSmall(StageError):
    exit_code, reason = 19, "DatasetTooSmall"


class BaseModelUnavailable(StageError):
    exit_code, reason = 20, "BaseModelUnavailable"


class OutOfMemory(StageError):
    exit_code, reason = 21, "OutOfMemory"


class HubForbidden(StageError):
    exit_code, reason = 22, "HubForbidden"
