"""The text streamer against a real nats-server and node: what a client assembles is exactly the tokens fed."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, AsyncIterator

import pytest

from agentcast import Coalesce, NotSent, Publisher, StreamUnavailable
from conftest import Node, WsClient, join


async def assemble(client: WsClient, message_id: str, deltas: int) -> tuple[str, int]:
    """Appends each frame's delta for ``message_id`` as a client does, merged frame or not, until
    ``deltas`` stored deltas are covered; returns the text and the frames it took."""
    text, covered, frames = "", 0, 0
    while covered < deltas:
        f = await client.recv()
        assert f["type"] != "gap", f
        if f["type"] != "event" or f["event"].get("message_id") != message_id:
            continue
        text += f["event"]["delta"]
        covered += f.get("merged", 1)
        frames += 1
    return text, frames


async def tokens(words: list[str], pause: float) -> AsyncIterator[str]:
    for w in words:
        await asyncio.sleep(pause * random.random())
        yield w


async def test_the_stored_deltas_and_the_client_text_are_exactly_the_tokens_fed(node: Node, nc: Any) -> None:
    client, _, ws = await join(node, "alice")
    rng = random.Random(7)
    # Unicode, spaces, empty tokens (which change nothing) and a long one.
    words = [rng.choice(["Hel", "lo", " wörld", "", " 🚀", "\n", "x" * 300, ",", " the"]) for _ in range(400)]
    p = Publisher(nc)
    async with p.text_stream("alice", "m-1", run_id="r1") as stream:
        await stream.feed(tokens(words, 0.004))
    published = stream.published
    # Coalesced: far fewer deltas than tokens, each stored in order.
    assert 1 <= len(published) < len(words) // 4, len(published)
    seqs = [a.seq for a in published]
    assert seqs == sorted(seqs) and not any(a.duplicate for a in published)
    text, _ = await assemble(client, "m-1", len(published))
    assert text == "".join(words)
    # What the stream stores, read back one by one, is the same.
    js = nc.jetstream()
    stored = ""
    for seq in seqs:
        msg = await js.get_msg("AGENTCAST", seq)
        v = json.loads(msg.data or b"{}")
        assert (v["type"], v["run_id"], v["message_id"]) == ("message_delta", "r1", "m-1")
        stored += v["delta"]
    assert stored == text
    await ws.close()


async def test_a_token_is_published_after_the_delay_without_waiting_for_more(node: Node, nc: Any) -> None:
    p = Publisher(nc)
    stream = p.text_stream("bob", "m-2", coalesce=Coalesce(delay=0.05, max_bytes=4096))
    await stream.push("first")
    await asyncio.sleep(0.5)
    assert len(stream.published) == 1, "the delay passed: the token is published while the stream is open"
    await stream.push(" second")
    assert len(await stream.finish()) == 2
    with pytest.raises(RuntimeError):
        await stream.push("late")


async def test_a_full_buffer_is_published_at_once(node: Node, nc: Any) -> None:
    p = Publisher(nc)
    stream = p.text_stream("carol", "m-3", coalesce=Coalesce(delay=60.0, max_bytes=8))
    for t in ["abcd", "efgh", "ijkl"]:
        await stream.push(t)
    for _ in range(100):
        if stream.published:
            break
        await asyncio.sleep(0.02)
    assert len(stream.published) == 1, "8 bytes were buffered: published without waiting a minute"
    await stream.finish()
    assert len(stream.published) == 2


async def test_a_failed_delta_stops_the_stream_and_says_why(node: Node, nc: Any) -> None:
    p = Publisher(nc, subject_prefix="nowhere")
    stream = p.text_stream("dave", "m-4", coalesce=Coalesce(delay=0.0, max_bytes=1))
    await stream.push("a")
    # The delta fails for good at once (no stream): later pushes are refused.
    refused = False
    for _ in range(100):
        try:
            await stream.push("b")
        except NotSent:
            refused = True
            break
        await asyncio.sleep(0.02)
    assert refused, "pushes after a delta failed for good are refused"
    with pytest.raises(StreamUnavailable):
        await stream.finish()
    assert stream.published == []
