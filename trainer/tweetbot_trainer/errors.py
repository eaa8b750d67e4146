"""The errors a user meets in a stage, each with its own exit code and a message that says what to fix.

Messages name handles, URLs and Secrets, never a token or a post's text. A URL in a message passes through
`redact_url` first: its userinfo, query and fragment can hold credentials or signatures, and the message
reaches the bot's status.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()]+")


def redact_url(url: str) -> str:
    """Only scheme://host[:port]/path of a URL; anything that is not a URL is returned as it is."""
    parts = urlsplit(str(url))
    if not parts.scheme or not parts.netloc:
        return str(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def redact_urls(text: str) -> str:
    """`text` with every URL in it redacted: for messages made by code that is not ours (libraries, bugs)."""
    return _URL.sub(lambda match: redact_url(match.group()), str(text))


class StageError(Exception):
    exit_code = 1
    reason = "StageFailed"
    # False: the same spec fails the same way however often it runs (a handle that does not exist, a refused
    # token, too little text), so the stage Job fails at its first pod instead of spending its backoffLimit.
    retryable = True

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ContractMismatch(StageError):
    exit_code, reason = 2, "ContractMismatch"
    retryable = False


class UnknownHandle(StageError):
    exit_code, reason = 10, "UnknownHandle"
    retryable = False


class PrivateAccount(StageError):
    exit_code, reason = 11, "PrivateAccount"
    retryable = False


class AuthenticationFailed(StageError):
    exit_code, reason = 12, "AuthenticationFailed"
    retryable = False


class RateLimited(StageError):
    exit_code, reason = 13, "RateLimited"


class NetworkFailure(StageError):
    exit_code, reason = 14, "NetworkFailure"


class EmptyTimeline(StageError):
    exit_code, reason = 15, "EmptyTimeline"
    retryable = False


class MalformedInput(StageError):
    exit_code, reason = 16, "MalformedInput"
    retryable = False


class NotEnoughText(StageError):
    exit_code, reason = 17, "NotEnoughText"
    retryable = False


class MissingInput(StageError):
    exit_code, reason = 18, "MissingInput"
    retryable = False


class DatasetTooSmall(StageError):
    exit_code, reason = 19, "DatasetTooSmall"
    retryable = False


class BaseModelUnavailable(StageError):
    exit_code, reason = 20, "BaseModelUnavailable"


class OutOfMemory(StageError):
    exit_code, reason = 21, "OutOfMemory"
    retryable = False


class HubForbidden(StageError):
    exit_code, reason = 22, "HubForbidden"
    retryable = False


class CheckpointUploadFailed(StageError):
    exit_code, reason = 23, "CheckpointUploadFailed"


class NoUsableGPU(StageError):
    exit_code, reason = 24, "NoUsableGPU"


class TrackerUnavailable(StageError):
    exit_code, reason = 25, "TrackerUnavailable"


class LoraTargetsNotFound(StageError):
    exit_code, reason = 26, "LoraTargetsNotFound"
    retryable = False


def _permanent() -> list[type[StageError]]:
    pending, found = [StageError], []
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if not cls.retryable:
            found.append(cls)
    return found


def permanent_exit_codes() -> list[int]:
    """The exit codes of the errors no retry can mend: each stage Job's podFailurePolicy fails the Job on them."""
    return sorted({cls.exit_code for cls in _permanent()})


def is_permanent(error: str) -> bool:
    """Whether a stage's reported error ("<reason>: <message>") is one no retry can mend."""
    return error.split(":", 1)[0] in {cls.reason for cls in _permanent()}
