"""The package's exceptions.

Callers branch on two kinds: :class:`InvalidEvent` is the caller's input and a
retry cannot help; :class:`PublishFailed` and its subclasses come from NATS or
the stream, and :class:`StreamUnavailable` and :class:`Unacknowledged` may pass
once NATS or the stream is back. They mirror the Rust ``PublishError``.
"""

from __future__ import annotations


class AgentcastError(Exception):
    """Base of every error this package raises."""


class InvalidEvent(AgentcastError, ValueError):
    """The user id, event type, message id, ``message_id`` or size is not valid."""


class PublishFailed(AgentcastError):
    """An event was not stored."""


class StreamUnavailable(PublishFailed):
    """No stream stores the subject (no agentcast node created it, or JetStream is off)."""

    def __init__(self, subject: str) -> None:
        super().__init__(
            f"no stream stores {subject}: is an agentcast node running against this NATS, or the stream created?"
        )
        self.subject = subject


class Rejected(PublishFailed):
    """The stream answered with an error (its size limit, storage full): the same bytes get the same answer."""


class Unacknowledged(PublishFailed):
    """Every attempt failed to send or to get its ack."""

    def __init__(self, attempts: int, last: str) -> None:
        super().__init__(f"not acknowledged after {attempts} attempts: {last}")
        self.attempts = attempts
        self.last = last


class NotSent(PublishFailed):
    """Not sent: an earlier event of the same batch or text stream failed for good."""

    def __init__(self) -> None:
        super().__init__("not sent: an earlier event failed")


class InvalidRequest(AgentcastError):
    """A message on the control subject that is not a node's control request."""
