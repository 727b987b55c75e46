"""The one error tree of fmserve. Every class carries its gRPC status code and a message a
person can act on; a server interceptor (fmserve.rpc.interceptors) is the only place that turns
them into wire statuses, and the clients turn wire statuses back into them.

    FmserveError                      INTERNAL (anything unexpected)
    ├── InvalidInput                  INVALID_ARGUMENT  bad field, empty input, wrong type
    │   ├── InputTooLong              INVALID_ARGUMENT  text over the model's maximum length
    │   └── WrongTask                 INVALID_ARGUMENT  task the model does not do
    ├── NotFound                      NOT_FOUND
    │   ├── ModelNotFound             NOT_FOUND         unknown model or version
    │   └── JobNotFound               NOT_FOUND         unknown job id
    ├── Conflict                      FAILED_PRECONDITION  e.g. cancel of a finished job
    ├── AlreadyExists                 ALREADY_EXISTS    e.g. an API key name that is taken
    ├── Unauthenticated               UNAUTHENTICATED   no API key, or a wrong/expired/revoked one
    ├── PermissionDenied              PERMISSION_DENIED the key lacks the scope (named) it needs
    ├── Overloaded                    RESOURCE_EXHAUSTED   queue full, retry later
    │   ├── TooLarge                  RESOURCE_EXHAUSTED   too many items in one request
    │   └── RateLimited               RESOURCE_EXHAUSTED   an API key's limit; `retry-after-ms`
    ├── Unavailable                   UNAVAILABLE       a stage or store is down, model not ready
    │   └── ConfigError               UNAVAILABLE       a model's model.toml is invalid
    ├── DeadlineExceeded              DEADLINE_EXCEEDED
    ├── Cancelled                     CANCELLED
    └── Unimplemented                 UNIMPLEMENTED     a method fmserve does not offer

Retryable states get retryable codes: not-ready is UNAVAILABLE, overload RESOURCE_EXHAUSTED.
The class name travels in the `fmserve-error` trailing metadata, so a client (or the gateway,
for a stage's error) raises the same class the server did. Messages never carry server paths
(`scrub_paths`): a client cannot use them, and they tell an outsider how the server is laid out.
"""

from __future__ import annotations

import re

import grpc

# Absolute paths of two segments or more ("/srv/models/x", not "tokens/s"); a sentence's final
# period stays.
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]*[\w@+-]){2,}/?")


class FmserveError(Exception):
    """Base of every fmserve error; unexpected failures are reported as INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    trailing: tuple[tuple[str, str], ...] = ()
    """Trailing metadata the error adds to its status (besides its class name)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(FmserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InputTooLong(InvalidInput):
    pass


class WrongTask(InvalidInput):
    pass


class NotFound(FmserveError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    pass


class JobNotFound(NotFound):
    @classmethod
    def unknown(cls, job_id: str) -> JobNotFound:
        """The one answer for an id that names no job the caller may see: an unknown id and
        another key's job read the same, so ids cannot be probed."""
        return cls(
            f"no job {job_id!r}: the id is wrong, or the job ended longer ago than its retention"
        )


class Conflict(FmserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(FmserveError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(FmserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FmserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Overloaded(FmserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooLarge(Overloaded):
    pass


RETRY_AFTER_KEY = "retry-after-ms"


class RateLimited(Overloaded):
    """A limit of the caller's API key refused the call; `retry_after_ms` (the `retry-after-ms`
    trailer on the wire) says when a retry may succeed."""

    def __init__(self, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.trailing = ((RETRY_AFTER_KEY, str(retry_after_ms)),)


class Unavailable(FmserveError):
    code = grpc.StatusCode.UNAVAILABLE


class ConfigError(Unavailable):
    """A model's model.toml cannot be used. UNAVAILABLE, not INTERNAL: the service is sound,
    and the model can be served as soon as the operator fixes the file (the log names it)."""


class DeadlineExceeded(FmserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FmserveError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(FmserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[FmserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


ERROR_TYPE_KEY = "fmserve-error"


def scrub_paths(message: str) -> str:
    """A library message's first line without server paths, which clients must never see."""
    lines = message.strip().splitlines() or ["no details"]
    return _PATH.sub("<path>", lines[0])[:300]


def _classes(root: type[FmserveError] = FmserveError) -> dict[str, type[FmserveError]]:
    found = {root.__name__: root}
    for sub in root.__subclasses__():
        found.update(_classes(sub))
    return found


def error_for_code(code: grpc.StatusCode, message: str) -> FmserveError:
    """The error of a status code that arrived as text (a stream's in-band `error_message`)."""
    return _BY_CODE.get(code, FmserveError)(message)


def from_rpc_error(error: grpc.RpcError) -> FmserveError:
    """Translate a failed call into the error tree, keeping the server's message: the class the
    server raised when it said which (and it fits the status code), else one per code;
    anything else becomes INTERNAL."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    trailing = dict(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else {}
    named = _classes().get(str(trailing.get(ERROR_TYPE_KEY, "")))
    cls = named if named is not None and named.code == code else _BY_CODE.get(code, FmserveError)
    error = cls(details or code.name)
    if isinstance(error, RateLimited):
        after = str(trailing.get(RETRY_AFTER_KEY, ""))
        error.retry_after_ms = int(after) if after.isdigit() else 0
    return error
