"""The gateway's exceptions: a refusal (REJECTED) or a terminal that cannot answer (retry)."""

from __future__ import annotations

from schemas.enums import RejectionReason
from worker.errors import WorkerError
from worker.mt5 import api


class GatewayRejection(WorkerError):
    """A validation or broker refusal: becomes a REJECTED confirmation."""

    def __init__(self, reason: RejectionReason, details: str, retcode: int | None = None) -> None:
        super().__init__(f"{reason.value}: {details}")
        self.reason = reason
        self.details = details
        self.retcode = retcode


class SessionLost(api.TransportError):
    """The terminal connection is gone (last_error -10000..-10005 or a transport error).

    Raised by every call except ``send`` (where it is an unknown outcome) so that the
    session pool can reconnect. Not a rejection: the approval is retried (requeued) on a
    healthy session, never refused because of a transient fault.
    """

    reason = RejectionReason.SESSION_UNAVAILABLE

    def __init__(self, details: str) -> None:
        super().__init__(f"{self.reason.value}: {details}")
        self.details = details


class QueryFailed(api.TransportError):
    """A broker query answered None (``last_error`` set) while the connection is up.

    A failed query is never "nothing there": it must not lead to a resend, nor to opening
    instead of closing. It is a :class:`api.TransportError`, which the pipeline already
    treats as "the terminal cannot answer": the delivery is requeued and any row stays in
    flight, to be settled later from the broker's truth. Unlike :class:`SessionLost` it
    does not say the connection is gone.
    """

    reason = RejectionReason.SESSION_UNAVAILABLE

    def __init__(self, function: str, error: tuple[int, str] | None) -> None:
        code, message = error or (api.RES_E_FAIL, "no result")
        super().__init__(f"{function} failed: ({code}, {message})")
        self.function = function
        self.error = (code, message)
