"""The envelope and the checks, without NATS."""

from __future__ import annotations

import json

import pytest

from agentcast import Event, InvalidEvent
from agentcast.events import MAX_MESSAGE_ID_CHARS, check_msg_id, check_type, check_user


def test_constructors_build_the_documented_envelope() -> None:
    e = Event.tool_executing("r1", "weather", {"city": "Paris"}).with_agent("a").with_thread("t").with_id("m1")
    v = json.loads(e.to_bytes())
    assert list(v) == ["type", "run_id", "thread_id", "agent", "timestamp", "data"]
    assert v["type"] == "tool_executing" and v["run_id"] == "r1" and v["thread_id"] == "t" and v["agent"] == "a"
    assert v["data"] == {"tool": "weather", "args": {"city": "Paris"}}
    assert v["timestamp"].endswith("Z") and len(v["timestamp"]) == len("2026-11-24T09:15:02.113Z")
    assert "msg_id" not in v and e.msg_id == "m1"
    assert Event.agent_thinking("r", "x").msg_id != Event.agent_thinking("r", "x").msg_id
    assert json.loads(Event.agent_cancelled("r").to_bytes())["data"] == {"status": "cancelled"}
    assert json.loads(Event.error("r", "quota", "out of tokens").to_bytes())["data"] == {
        "code": "quota",
        "message": "out of tokens",
    }


def test_delta_events_carry_message_id_and_delta() -> None:
    v = json.loads(Event.text_delta("message_delta", "r1", "m1", "Hel").to_bytes())
    assert (v["type"], v["message_id"], v["delta"], v["data"]) == ("message_delta", "m1", "Hel", {})
    # Characters, not bytes.
    Event.text_delta("message_delta", "r1", "é" * MAX_MESSAGE_ID_CHARS, "x").check()
    for bad in ["", "x" * (MAX_MESSAGE_ID_CHARS + 1)]:
        with pytest.raises(InvalidEvent, match="1 to 128 characters"):
            Event.text_delta("message_delta", "r1", bad, "x")
    half = Event("message_delta", message_id="m")
    with pytest.raises(InvalidEvent, match="`delta` is missing"):
        half.check()


def test_names_are_checked_as_the_node_and_the_rust_publisher_check_them() -> None:
    for ok in ["agent_started", "message_delta", "acme.search_results", "a.b.c", "x-1.y_2"]:
        check_type(ok)
    for bad in ["", "custom", "Acme.x", "acme.", ".x", "a..b", "a.b c", "a.é", "a." + "b" * 64]:
        with pytest.raises(InvalidEvent):
            check_type(bad)
    for user in ["alice", "auth0|64b1f", "a" * 128]:
        check_user(user)
    for user in ["", "a.b", "a*", "a>", "a b", "é", "a" * 129]:
        with pytest.raises(InvalidEvent):
            check_user(user)
    for bad_id in ["", "a b", "a\r\nNats-Sequence: 1", "x" * 257]:
        with pytest.raises(InvalidEvent):
            check_msg_id(bad_id)
