"""Control requests from a real WebSocket client reach the package's listener, and stop the example's run."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import nats

from agentcast import ControlListener
from conftest import REPO, NatsServer, Node, join


async def test_a_request_reaches_the_listener_with_the_sockets_user_and_the_reply_reaches_the_socket(
    node: Node, nc: Any
) -> None:
    listener = await ControlListener.subscribe(nc, group="agents")
    seen: list[tuple[str, str, dict[str, Any]]] = []

    async def serve() -> None:
        async for req in listener:
            seen.append((req.user, req.id, req.data))
            await req.reply({"status": "cancelled", "for": req.user})

    task = asyncio.create_task(serve())
    client, _, ws = await join(node, "alice")
    # The client names another user's run: the user the agent sees is the token's.
    await client.send({"type": "control", "id": "c1", "data": {"action": "cancel", "run_id": "bob-run"}})
    reply = await client.recv()
    assert reply == {"type": "control_reply", "id": "c1", "data": {"status": "cancelled", "for": "alice"}}
    assert seen == [("alice", "c1", {"action": "cancel", "run_id": "bob-run"})]
    task.cancel()
    await listener.close()
    await ws.close()


async def test_messages_that_are_not_node_requests_are_skipped(node: Node, nc: Any) -> None:
    listener = await ControlListener.subscribe(nc, group="agents")
    got: list[str] = []

    async def serve() -> None:
        async for req in listener:
            got.append(req.user)
            await req.reply({})

    task = asyncio.create_task(serve())
    # No headers, a header naming another user, a payload that is not an object.
    await nc.publish("agentcast.control.alice", b"{}")
    await nc.publish("agentcast.control.alice", b"{}", headers={"Agentcast-User": "bob", "Agentcast-Request": "x"})
    await nc.publish("agentcast.control.alice", b"[1]", headers={"Agentcast-User": "alice", "Agentcast-Request": "x"})
    ok = await nc.request(
        "agentcast.control.alice", b"{}", timeout=5, headers={"Agentcast-User": "alice", "Agentcast-Request": "y"}
    )
    assert ok.data == b"{}"
    assert got == ["alice"]
    task.cancel()
    await listener.close()


async def test_a_cancel_from_the_browser_stops_the_example_run(nats_server: NatsServer, node: Node) -> None:
    client, _, ws = await join(node, "erin")
    example = REPO / "examples" / "python" / "stream_agent.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(example), "--nats-url", nats_server.url, "--user", "erin", "--run-id", "run-9",
        "--tokens", "2000", "--token-interval", "0.01",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    # Wait for the run to start and some text to arrive, then press Stop.
    text = ""
    while True:
        f = await client.recv()
        if f["type"] == "event" and f["event"].get("type") == "message_delta":
            text += f["event"]["delta"]
            if len(text) > 20:
                break
    await client.send({"type": "control", "id": "stop", "data": {"action": "cancel", "run_id": "run-9"}})
    last: dict[str, Any] = {}
    while True:
        f = await client.recv()
        if f["type"] == "control_reply":
            assert f["data"] == {"status": "cancelled", "run_id": "run-9"}, f
        elif f["type"] == "event" and f["event"].get("type") == "message_delta":
            text += f["event"]["delta"]
        elif f["type"] == "event" and f["event"].get("type") == "agent_completed":
            last = f["event"]
            break
    assert last["data"] == {"status": "cancelled"}
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert "control erin cancelled" in lines
    # Stopped early: far fewer than the 2000 words, and what the client
    # assembled is exactly the start of what the fake model produced.
    spec = importlib.util.spec_from_file_location("stream_agent", example)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vocabulary = module.ANSWER.split(" ")
    produced = " ".join(vocabulary[i % len(vocabulary)] for i in range(2000))
    assert len(text) > 20 and produced.startswith(text), text
    assert len(text.split(" ")) < 1500
    deltas = [l for l in lines if l.startswith("delta ")]
    assert deltas and lines[-1].endswith("agent_completed")
    await ws.close()
