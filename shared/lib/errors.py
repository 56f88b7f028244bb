"""The project's one error hierarchy.

Every error the library raises derives from :class:`OrchestratorError`. Each
branch carries the HTTP status it maps to, a stable machine-readable ``code``,
whether retrying may help, and the field or resource it concerns. One exception
handler per service (``shared.lib.http_service``) turns them into JSON bodies.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentOffline",
    "Busy",
    "Cancelled",
    "Conflict",
    "DeadLettered",
    "DeadlineExpired",
    "Forbidden",
    "InvalidInput",
    "InvalidSignature",
    "LockContended",
    "LockLost",
    "NotFound",
    "OrchestratorError",
    "PayloadTooLarge",
    "RequestRejected",
    "RunLost",
    "ServiceUnavailable",
    "StartupError",
    "Timeout",
    "Unauthorized",
    "UnsupportedMediaType",
]


class OrchestratorError(Exception):
    """Root of every error this project raises on purpose."""

    status_code: int = 500
    code: str = "internal"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        resource: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.resource = resource
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """The JSON body an API returns for this error."""
        body: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.field is not None:
            body["field"] = self.field
        if self.resource is not None:
            body["resource"] = self.resource
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(OrchestratorError):
    """The caller sent something malformed; fix the named field and retry."""

    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    """The body is not sent as JSON (no content type, a form, text): send it with
    ``Content-Type: application/json``."""

    status_code = 415
    code = "unsupported_media_type"


class DeadlineExpired(InvalidInput):
    """The request's deadline passed before it could run; send it again with a later deadline."""

    status_code = 408
    code = "deadline_expired"


class Unauthorized(OrchestratorError):
    status_code = 401
    code = "unauthorized"


class InvalidSignature(Unauthorized):
    code = "bad_signature"


class Forbidden(OrchestratorError):
    status_code = 403
    code = "forbidden"


class NotFound(OrchestratorError):
    status_code = 404
    code = "not_found"


class Conflict(OrchestratorError):
    """The resource is not in a state that allows the operation."""

    status_code = 409
    code = "conflict"


class Cancelled(Conflict):
    """The request was cancelled by its sender (a cancel notice); a repeat of its key gets the same."""

    code = "cancelled"


class DeadLettered(Conflict):
    """The request was redelivered too often and waits in the dead-letter stream (``dlq list``,
    ``dlq requeue``)."""

    code = "dead_lettered"


class LockContended(Conflict):
    """Another holder has the lock; ``details`` names it and when its lease ends."""

    code = "lock_contended"
    retryable = True


class LockLost(Conflict):
    """The lease expired or was force-released; the holder must stop using the resource."""

    code = "lock_lost"


class Timeout(OrchestratorError):
    status_code = 504
    code = "timeout"
    retryable = True


class AgentOffline(OrchestratorError):
    """No live instance consumes requests for the target agent."""

    status_code = 503
    code = "agent_offline"
    retryable = True


class RequestRejected(OrchestratorError):
    """The agent refuses the request as such (an unknown request type, a refused envelope);
    it maps to response status ``rejected``. Send a request type the agent declares."""

    status_code = 422
    code = "rejected"


class ServiceUnavailable(OrchestratorError):
    status_code = 503
    code = "unavailable"
    retryable = True


class Busy(ServiceUnavailable):
    """The instance runs as many requests as it may at once; retry after ``details["retry_after_s"]``."""

    code = "busy"


class RunLost(OrchestratorError):
    """A workflow run whose replica died while running it too many times: it is not run again."""

    code = "run_lost"


class StartupError(OrchestratorError):
    """A service cannot start; the message is printed as one line, without a traceback."""

    code = "startup"
