"""Publishing events through JetStream, with retries that keep the message id.

Events go to ``<prefix>.<user_id>`` through JetStream, so every publish is
answered with the stream sequence it was stored at: the ``seq`` clients
receive. Each event carries a ``Nats-Msg-Id`` and a retry reuses it, so within
the stream's duplicate window the event is stored once however often it was
retried. The same rules as the Rust ``Publisher`` (src/publisher.rs).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import nats.errors
import nats.js.errors

from .errors import AgentcastError, InvalidEvent, NotSent, PublishFailed, Rejected, StreamUnavailable, Unacknowledged
from .events import DEFAULT_MAX_EVENT_BYTES, Event, check_message_id, check_type, check_user

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.api import PubAck

    from .streamer import Coalesce, TextStreamer

#: Events awaiting their ack in :meth:`Publisher.publish_batch`: deep enough to
#: keep the connection busy instead of paying a round trip per event, while
#: bounding the events held for a possible retry. When full, the batch waits
#: for the oldest ack before sending the next event.
MAX_IN_FLIGHT = 256

#: Attempts per event (the first publish and its retries). With the backoff
#: below they span about 3 s, well inside the default 2-minute duplicate
#: window, so a retry of an event that was in fact stored is recognised.
MAX_ATTEMPTS = 5
#: First retry delay ceiling in seconds; doubles per attempt (full jitter).
RETRY_BASE = 0.1
#: Largest retry delay ceiling in seconds.
RETRY_MAX = 2.0
#: Seconds to wait for one ack before the attempt counts as failed.
ACK_TIMEOUT = 5.0

#: The node's default ``--subject-prefix``.
DEFAULT_SUBJECT_PREFIX = "agentcast.events"


@dataclass(frozen=True)
class Published:
    """What the stream said about a stored event."""

    #: The stream sequence: the ``seq`` clients receive.
    seq: int
    #: True when the stream already held an event with this message id (a
    #: retry, or the same event published twice); ``seq`` is the first one's.
    duplicate: bool
    msg_id: str


@dataclass(frozen=True)
class _Prepared:
    subject: str
    msg_id: str
    payload: bytes


class Publisher:
    """Publishes events of any user through one NATS connection's JetStream context."""

    def __init__(
        self,
        nc: Client,
        *,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        ack_timeout: float = ACK_TIMEOUT,
    ) -> None:
        self._js = nc.jetstream(publish_async_max_pending=MAX_IN_FLIGHT)
        self.subject_prefix = subject_prefix
        self.max_event_bytes = max_event_bytes
        self.ack_timeout = ack_timeout

    def subject(self, user: str) -> str:
        return f"{self.subject_prefix}.{check_user(user)}"

    def _prepare(self, user: str, event: Event) -> _Prepared:
        event.check()
        payload = event.to_bytes()
        if len(payload) > self.max_event_bytes:
            raise InvalidEvent(f"event is {len(payload)} bytes; the limit is {self.max_event_bytes}")
        return _Prepared(self.subject(user), event.msg_id, payload)

    def text_stream(
        self,
        user: str,
        message_id: str,
        *,
        kind: str = "message_delta",
        run_id: str | None = None,
        thread_id: str | None = None,
        agent: str | None = None,
        coalesce: Coalesce | None = None,
    ) -> TextStreamer:
        """Streams the text of message ``message_id`` as coalesced delta events of type ``kind``.

        See :class:`agentcast.streamer.TextStreamer`; the user, type and id are checked here.
        """
        from .streamer import Coalesce, TextStreamer

        check_user(user)
        check_type(kind)
        check_message_id(message_id)
        template = Event(kind, {}, run_id=run_id, thread_id=thread_id, agent=agent, message_id=message_id, delta="")
        return TextStreamer(self, user, template, coalesce or Coalesce())

    async def publish(self, user: str, event: Event) -> Published:
        """Publishes one event and waits for the stream to store it, retrying under the same message id.

        Raises :class:`InvalidEvent` before sending anything, or a :class:`PublishFailed`.
        """
        return await self._send_until_acked(self._prepare(user, event), 0, None)

    async def publish_batch(self, user: str, events: Sequence[Event]) -> list[Published | AgentcastError]:
        """Publishes a user's events in order, up to :data:`MAX_IN_FLIGHT` awaiting their acks.

        One result per event, in order: a :class:`Published` or the error. An
        event whose send or ack fails is retried (same message id) before later
        acks are collected; events already in flight behind it may then be
        stored before it. Once an event has failed for good no further event
        is sent (:class:`NotSent`); those already in flight may still be
        stored, and their results say so. Use :meth:`publish` one event at a
        time when order across such a failure matters.
        """
        results: list[Published | AgentcastError] = []
        in_flight: deque[tuple[_Prepared, asyncio.Future[PubAck] | str]] = deque()
        failed = False

        async def settle(p: _Prepared, ack: asyncio.Future[PubAck] | str) -> None:
            nonlocal failed
            r = await self._settle(p, ack)
            failed = failed or isinstance(r, AgentcastError)
            results.append(r)

        for event in events:
            if failed:
                while in_flight:
                    await settle(*in_flight.popleft())
                results.append(NotSent())
                continue
            try:
                p = self._prepare(user, event)
            except InvalidEvent as e:
                # Keep results in order: settle what is ahead first.
                while in_flight:
                    await settle(*in_flight.popleft())
                results.append(e)
                failed = True
                continue
            if len(in_flight) >= MAX_IN_FLIGHT:
                await settle(*in_flight.popleft())
            in_flight.append((p, await self._send(p)))
        while in_flight:
            await settle(*in_flight.popleft())
        return results

    async def _send(self, p: _Prepared) -> asyncio.Future[PubAck] | str:
        """Sends without waiting for the ack; a failure is kept as text and counts as the first attempt."""
        try:
            return await self._js.publish_async(p.subject, p.payload, headers={"Nats-Msg-Id": p.msg_id})
        except (nats.errors.Error, OSError) as e:
            return f"{type(e).__name__}: {e}"

    async def _settle(self, p: _Prepared, ack: asyncio.Future[PubAck] | str) -> Published | AgentcastError:
        """Waits for a pipelined ack; retries the event when it failed."""
        try:
            if isinstance(ack, str):
                return await self._send_until_acked(p, 1, ack)
            try:
                # Most acks are in by the time they are settled: no timer then.
                a = ack.result() if ack.done() else await asyncio.wait_for(ack, self.ack_timeout)
                return Published(a.seq, bool(a.duplicate), p.msg_id)
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                return await self._send_until_acked(p, 1, _classify(p, e))
        except PublishFailed as e:
            return e

    async def _send_until_acked(self, p: _Prepared, done: int, last: str | None) -> Published:
        """Attempts from ``done + 1`` up to :data:`MAX_ATTEMPTS`, each waiting for its ack."""
        while done < MAX_ATTEMPTS:
            if done > 0:
                ceiling = min(RETRY_BASE * (1 << min(done - 1, 16)), RETRY_MAX)
                await asyncio.sleep(ceiling * random.random())
            done += 1
            try:
                a = await self._js.publish(
                    p.subject, p.payload, timeout=self.ack_timeout, headers={"Nats-Msg-Id": p.msg_id}
                )
                return Published(a.seq, bool(a.duplicate), p.msg_id)
            except (nats.errors.Error, OSError, asyncio.TimeoutError) as e:
                last = _classify(p, e)
        raise Unacknowledged(done, last or "")


def _classify(p: _Prepared, e: BaseException) -> str:
    """A failed attempt: final errors are raised, retryable ones become the text of the last attempt."""
    if isinstance(e, nats.js.errors.NoStreamResponseError):
        raise StreamUnavailable(p.subject) from e
    if isinstance(e, nats.js.errors.APIError):
        # The stream answered with an error: the same bytes get the same answer.
        raise Rejected(f"the stream refused the event: {e}") from e
    if isinstance(e, nats.errors.MaxPayloadError):
        raise Rejected(f"the event is larger than the server's max_payload: {e}") from e
    return f"{type(e).__name__}: {e}"
