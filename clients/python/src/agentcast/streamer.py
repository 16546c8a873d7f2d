"""Streaming one message's text as delta events, coalescing tokens.

Every published event is a JetStream write (stored, replicated, republished
and framed for each socket), so a model's tokens are not published one by
one: a :class:`TextStreamer` gathers them and publishes one delta event when
``delay`` has passed since the first token it has not published, or as soon
as ``max_bytes`` are buffered, and on finish. Deltas are published one at a
time, each after the previous one's ack, so a retry (same ``Nats-Msg-Id``)
can neither duplicate nor reorder the text. The same defaults and rules as
the Rust ``TextStream`` (src/publisher.rs); the contract is docs/publishing.md.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, AsyncIterable, Iterable

from .errors import NotSent, PublishFailed
from .events import Event, new_msg_id, now

if TYPE_CHECKING:
    from .publisher import Published, Publisher

#: Seconds a streamer holds the first unpublished token before it publishes
#: what it has: at 40 tokens a second about two tokens a delta, and well
#: under the 100 ms a reader notices.
DEFAULT_COALESCE_DELAY = 0.05

#: Text (UTF-8 bytes) a streamer buffers before it publishes at once,
#: whatever the time: keeps a burst (a cached answer) to a few events without
#: making any one of them large.
DEFAULT_COALESCE_BYTES = 4096

#: Tokens handed to a streamer and not yet taken by its task. When full (a
#: delta is waiting for its ack or being retried), :meth:`TextStreamer.push`
#: waits: the producer is slowed rather than a backlog growing without bound.
TEXT_STREAM_QUEUE = 1024


@dataclass(frozen=True)
class Coalesce:
    """When a streamer publishes: ``delay`` seconds after the first unpublished token, or at ``max_bytes``."""

    delay: float = DEFAULT_COALESCE_DELAY
    #: At least 1; 1 with a zero delay publishes every token as its own event.
    max_bytes: int = DEFAULT_COALESCE_BYTES


class TextStreamer:
    """The text of one message, published as delta events while it is generated.

    Use it as an async context manager, or call :meth:`finish`::

        async with publisher.text_stream("alice", "m-1", run_id="r-1") as text:
            await text.feed(model_tokens())
        print(text.published)
    """

    def __init__(self, publisher: Publisher, user: str, template: Event, coalesce: Coalesce) -> None:
        self._publisher = publisher
        self._user = user
        self._template = template
        self._coalesce = coalesce
        # Tokens pushed and not yet taken, with when they were pushed; the
        # task is woken when one arrives, a pusher when room is made.
        self._tokens: deque[tuple[float, str]] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._closed = False
        #: The acks of the deltas published so far, in order.
        self.published: list[Published] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def push(self, token: str) -> None:
        """Appends a token to the message; waits only while :data:`TEXT_STREAM_QUEUE` tokens are waiting.

        Raises :class:`NotSent` once a delta has failed for good (:meth:`finish` then says why).
        """
        if self._closed:
            raise RuntimeError("push after finish")
        while len(self._tokens) >= TEXT_STREAM_QUEUE and not self._task.done():
            self._room.clear()
            room = asyncio.ensure_future(self._room.wait())
            await asyncio.wait({room, self._task}, return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
        if self._task.done():
            raise NotSent()
        self._tokens.append((asyncio.get_running_loop().time(), token))
        self._wake.set()

    async def feed(self, tokens: AsyncIterable[str] | Iterable[str]) -> None:
        """Pushes every token of an (async) iterator, such as a model client's stream."""
        if isinstance(tokens, AsyncIterable):
            async for token in tokens:
                await self.push(token)
        else:
            for token in tokens:
                await self.push(token)

    async def finish(self) -> list[Published]:
        """Publishes what is buffered and returns every delta's ack, in order.

        On a :class:`PublishFailed` it is raised: the deltas before it are
        stored (in :attr:`published`) and nothing after it.
        """
        self._closed = True
        self._wake.set()
        await self._task
        return self.published

    async def __aenter__(self) -> TextStreamer:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        # What was pushed is published either way; an error in the body is
        # not hidden by one of the stream's.
        if kind is None:
            await self.finish()
        else:
            try:
                await self.finish()
            except PublishFailed:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay, max_bytes = self._coalesce.delay, max(1, self._coalesce.max_bytes)
        parts: list[str] = []
        size = 0
        # When the oldest unpublished token was pushed: the delay counts from
        # it, including the time it waited behind an ack.
        first: float | None = None
        while True:
            # Take what is pushed already, so a delta due after an ack
            # carries every token that came in meanwhile.
            while self._tokens and size < max_bytes:
                at, token = self._tokens.popleft()
                if token:
                    first = at if first is None else first
                    parts.append(token)
                    size += len(token.encode())
            self._room.set()
            ending = self._closed and not self._tokens
            if first is not None and (ending or size >= max_bytes or loop.time() - first >= delay):
                text = "".join(parts)
                parts.clear()
                size, first = 0, None
                event = replace(self._template, delta=text, timestamp=now(), msg_id=new_msg_id())
                self.published.append(await self._publisher.publish(self._user, event))
                continue
            if ending:
                return
            self._wake.clear()
            if self._tokens or self._closed:
                continue
            timeout = None if first is None else max(0.0, first + delay - loop.time())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
