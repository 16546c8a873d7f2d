"""agentcast for agent services in Python: publish events, stream text, answer control requests.

The wire contract is docs/publishing.md in the agentcast repository; this
package follows it as the Rust ``agentcast::publisher`` and
``agentcast::control`` do, and depends only on nats-py.

Modules, one per concern:

- :mod:`agentcast.events`: the envelope (:class:`Event` and its constructors
  for the five agent events, ``error``, custom types and delta events) and
  the checks of user ids, types and ids.
- :mod:`agentcast.publisher`: :class:`Publisher`, JetStream publishes with a
  ``Nats-Msg-Id``, retries that reuse it, and pipelined batches.
- :mod:`agentcast.streamer`: :class:`TextStreamer`, one message's text as
  coalesced delta events.
- :mod:`agentcast.control`: :class:`ControlListener`, control requests from
  the users' sockets, and their replies.
- :mod:`agentcast.errors`: the exceptions.
"""

from .control import ControlListener, ControlRequest
from .errors import (
    AgentcastError,
    InvalidEvent,
    InvalidRequest,
    NotSent,
    PublishFailed,
    Rejected,
    StreamUnavailable,
    Unacknowledged,
)
from .events import BUILT_IN_TYPES, Event
from .publisher import Published, Publisher
from .streamer import Coalesce, TextStreamer

__all__ = [
    "BUILT_IN_TYPES",
    "AgentcastError",
    "Coalesce",
    "ControlListener",
    "ControlRequest",
    "Event",
    "InvalidEvent",
    "InvalidRequest",
    "NotSent",
    "PublishFailed",
    "Published",
    "Publisher",
    "Rejected",
    "StreamUnavailable",
    "TextStreamer",
    "Unacknowledged",
]
