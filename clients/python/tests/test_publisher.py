"""Publishing against a real nats-server and node; the events reach a real WebSocket client."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from agentcast import Event, InvalidEvent, NotSent, Published, Publisher, StreamUnavailable
from conftest import NatsServer, Node, join


async def test_events_reach_a_websocket_client_in_order_with_their_seqs(node: Node, nc: Any) -> None:
    client, _, ws = await join(node, "alice")
    p = Publisher(nc)
    events = [
        Event.agent_started("r1", "What is the weather in Paris?"),
        Event.agent_thinking("r1", "I should call the weather tool."),
        Event.tool_executing("r1", "weather", {"city": "Paris"}),
        Event.tool_completed("r1", "weather", {"celsius": 18}),
        Event.custom("acme.forecast_chart", "r1", {"points": [18, 19, 17]}),
        Event.agent_completed("r1", "18 °C in Paris."),
    ]
    first = await p.publish("alice", events[0])
    rest = await p.publish_batch("alice", events[1:])
    acks = [first, *rest]
    assert all(isinstance(a, Published) and not a.duplicate for a in acks), acks
    seqs = [a.seq for a in acks if isinstance(a, Published)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    frames = await client.events(len(events))
    assert [f["seq"] for f in frames] == seqs
    assert [f["event"]["type"] for f in frames] == [e.type for e in events]
    assert frames[5]["event"]["data"] == {"output": "18 °C in Paris."}
    await ws.close()


async def test_a_publish_retried_across_a_frozen_server_is_stored_once(nats_server: NatsServer, node: Node, nc: Any) -> None:
    client, _, ws = await join(node, "bob")
    p = Publisher(nc, ack_timeout=0.3)
    event = Event.agent_thinking("r2", "retried")
    # The server is frozen: the first attempt's ack times out and the
    # retries (same Nats-Msg-Id) queue behind it; once thawed, the server
    # receives them all and stores the event once.
    nats_server.signal(signal.SIGSTOP)
    publishing = asyncio.ensure_future(p.publish("bob", event))
    await asyncio.sleep(0.8)
    nats_server.signal(signal.SIGCONT)
    ack = await asyncio.wait_for(publishing, 10)
    # Another event after it: the client must see the retried one once, then this.
    after = await p.publish("bob", Event.agent_thinking("r2", "after"))
    frames = await client.events(2)
    assert [f["seq"] for f in frames] == [ack.seq, after.seq], frames
    assert frames[0]["event"]["data"] == {"text": "retried"}
    info = await nc.jetstream().stream_info("AGENTCAST", subjects_filter="agentcast.events.bob")
    assert info.state.subjects == {"agentcast.events.bob": 2}
    # Publishing the same event (same msg_id) again is a duplicate.
    again = await p.publish("bob", event)
    assert again.duplicate and again.seq == ack.seq
    await ws.close()


async def test_bad_input_is_refused_before_sending_and_a_batch_stops_at_it(node: Node, nc: Any) -> None:
    p = Publisher(nc, max_event_bytes=1024)
    with pytest.raises(InvalidEvent, match="user id"):
        await p.publish("a.b", Event.agent_thinking("r", "x"))
    with pytest.raises(InvalidEvent, match="bytes; the limit is 1024"):
        await p.publish("carol", Event.agent_thinking("r", "x" * 2000))
    bad = Event("custom", {})
    results = await p.publish_batch("carol", [Event.agent_thinking("r", "1"), bad, Event.agent_thinking("r", "3")])
    assert isinstance(results[0], Published)
    assert isinstance(results[1], InvalidEvent) and "event type" in str(results[1])
    assert isinstance(results[2], NotSent)


async def test_a_subject_no_stream_stores_is_told_apart(node: Node, nc: Any) -> None:
    p = Publisher(nc, subject_prefix="nowhere")
    with pytest.raises(StreamUnavailable, match="no stream stores nowhere.dave"):
        await p.publish("dave", Event.agent_thinking("r", "x"))
    results = await p.publish_batch("dave", [Event.agent_thinking("r", "1"), Event.agent_thinking("r", "2")])
    # Both were in flight before the first ack came back: each says so.
    assert [type(r) for r in results] == [StreamUnavailable, StreamUnavailable]
    # A batch after which nothing is in flight stops at the failure.
    results = await p.publish_batch("dave", [Event("custom", {}), Event.agent_thinking("r", "2")])
    assert [type(r) for r in results] == [InvalidEvent, NotSent]
