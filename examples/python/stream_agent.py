#!/usr/bin/env python3
"""An agent run that streams its answer token by token and stops when the user asks, with the agentcast package.

It uses clients/python (``pip install ./clients/python``, or run it from the
repository: it finds the package there):

- the run's events through :class:`agentcast.Publisher`;
- the answer's text through a :class:`agentcast.TextStreamer`, which
  coalesces the tokens of a fake model (no network: ``--tokens`` words,
  ``--token-interval`` apart) into ``message_delta`` events, one every 50 ms
  at most;
- a Stop button through :class:`agentcast.ControlListener`: on
  ``{"action":"cancel","run_id":...}`` for this run of this user it stops the
  stream, publishes ``agent_completed`` with ``{"status":"cancelled"}`` and
  replies ``{"status":"cancelled"}``; another user's run is ``unknown_run``.

Try it against ``agentcast dev``: open the printed console URL for the user
``dev`` and run ``stream_agent.py --user dev``.

Prints ``<seq> <type>`` per event published, ``delta <seq>`` per delta published,
and ``control <user> <status>`` per request; exits when the run is over.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, AsyncIterator

try:
    import agentcast
except ImportError:  # run from the repository without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "src"))
    import agentcast

import nats
from nats.errors import NoServersError

ANSWER = (
    "Paris is mild today: 18 degrees, light wind from the west, and a small chance of rain "
    "after six. Take a jacket for the evening."
)


async def fake_model(words: int, interval: float) -> AsyncIterator[str]:
    """A model's token stream: the answer's words, looped, one every ``interval`` seconds."""
    vocabulary = ANSWER.split(" ")
    for i in range(words):
        await asyncio.sleep(interval)
        yield ("" if i == 0 else " ") + vocabulary[i % len(vocabulary)]


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--user", required=True)
    p.add_argument("--run-id", default="py-stream-1")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--token-interval", type=float, default=0.025)
    p.add_argument("--group", default="agents", help="control queue group")
    args = p.parse_args()
    try:
        nc = await nats.connect(args.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    except (NoServersError, OSError) as e:
        sys.exit(f"stream_agent.py: cannot connect to NATS at {args.nats_url}: {e}")
    publisher = agentcast.Publisher(nc)
    run_id, user = args.run_id, args.user
    cancelled = asyncio.Event()

    async def answer_controls(listener: agentcast.ControlListener) -> None:
        async for req in listener:
            action, target = req.data.get("action"), req.data.get("run_id")
            reply: dict[str, Any]
            if action != "cancel":
                reply = {"error": "unknown_action"}
            elif req.user != user or target != run_id:
                # Another user's run, or one this agent does not know.
                reply = {"status": "unknown_run", "run_id": target}
            elif cancelled.is_set():
                reply = {"status": "finished", "run_id": run_id}
            else:
                cancelled.set()
                reply = {"status": "cancelled", "run_id": run_id}
            print("control", req.user, reply.get("status", reply.get("error")), flush=True)
            await req.reply(reply)

    listener = await agentcast.ControlListener.subscribe(nc, group=args.group)
    controls = asyncio.create_task(answer_controls(listener))

    async def emit(event: agentcast.Event) -> None:
        ack = await publisher.publish(user, event)
        print(ack.seq, event.type, flush=True)

    try:
        await emit(agentcast.Event.agent_started(run_id, "What is the weather in Paris?"))
        stream = publisher.text_stream(user, f"{run_id}-answer", run_id=run_id)
        async with stream:
            async for token in fake_model(args.tokens, args.token_interval):
                if cancelled.is_set():
                    break
                await stream.push(token)
        for d in stream.published:
            print("delta", d.seq, flush=True)
        if cancelled.is_set():
            await emit(agentcast.Event.agent_cancelled(run_id))
        else:
            await emit(agentcast.Event.agent_completed(run_id, {"status": "done"}))
    except agentcast.StreamUnavailable as e:
        sys.exit(f"stream_agent.py: {e}")
    finally:
        controls.cancel()
        await listener.close()
        await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
