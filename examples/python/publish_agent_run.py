#!/usr/bin/env python3
"""Publish one agent run to a user's agentcast stream, with nats-py.

This follows the publishing contract in docs/publishing.md:

- subject ``agentcast.events.<user_id>`` (the node's ``--subject-prefix``),
  the user id used as is (1 to 128 ASCII letters, digits or ``-_=@:|+~``);
- the envelope ``type``, ``run_id``, ``thread_id``, ``agent``, ``timestamp``,
  ``data``;
- a JetStream publish, whose ack carries the stream sequence;
- a ``Nats-Msg-Id`` derived from the run and the step, so that a retried
  publish, or the whole run published again, is stored once.

Usage: publish_agent_run.py --user alice [--nats-url URL] [--run-id ID]
Prints one line per event: ``<seq> <type> stored|duplicate``.
"""

import argparse
import asyncio
import datetime
import json
import re
import sys

import nats
from nats.errors import NoServersError, TimeoutError
from nats.js.errors import NoStreamResponseError

USER_ID = re.compile(r"^[A-Za-z0-9\-_=@:|+~]{1,128}$")
MAX_EVENT_BYTES = 256 * 1024  # the node's default --max-event-bytes
ATTEMPTS = 5  # publish attempts per event, all with the same Nats-Msg-Id


def envelope(kind, run_id, data, agent="weather-bot", thread_id=None):
    event = {
        "type": kind,
        "run_id": run_id,
        "agent": agent,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": data,
    }
    if thread_id is not None:
        event["thread_id"] = thread_id
    return event


async def publish(js, subject, event, msg_id):
    payload = json.dumps(event, separators=(",", ":")).encode()
    if len(payload) > MAX_EVENT_BYTES:
        raise ValueError(f"event is {len(payload)} bytes; the limit is {MAX_EVENT_BYTES}")
    delay = 0.1
    for attempt in range(1, ATTEMPTS + 1):
        try:
            # The same id on every attempt: the stream stores the event once.
            return await js.publish(subject, payload, timeout=5, headers={"Nats-Msg-Id": msg_id})
        except TimeoutError:
            if attempt == ATTEMPTS:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--user", required=True)
    p.add_argument("--run-id", default="py-run-1")
    p.add_argument("--subject-prefix", default="agentcast.events")
    args = p.parse_args()
    if not USER_ID.match(args.user):
        sys.exit(f"publish_agent_run.py: user id {args.user!r} is not allowed (ASCII letters, digits, -_=@:|+~)")
    subject = f"{args.subject_prefix}.{args.user}"
    run = args.run_id
    steps = [
        envelope("agent_started", run, {"input": "What is the weather in Paris?"}),
        envelope("agent_thinking", run, {"text": "I should call the weather tool."}),
        envelope("tool_executing", run, {"tool": "weather", "args": {"city": "Paris"}}),
        envelope("tool_completed", run, {"tool": "weather", "result": {"celsius": 18}}),
        envelope("acme.forecast_chart", run, {"points": [18, 19, 17]}),
        envelope("agent_completed", run, {"output": "18 °C in Paris."}),
    ]
    try:
        nc = await nats.connect(args.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    except (NoServersError, OSError) as e:
        sys.exit(f"publish_agent_run.py: cannot connect to NATS at {args.nats_url}: {e}")
    js = nc.jetstream()
    try:
        for i, event in enumerate(steps):
            ack = await publish(js, subject, event, f"{run}-{i}")
            print(ack.seq, event["type"], "duplicate" if ack.duplicate else "stored", flush=True)
    except NoStreamResponseError:
        sys.exit(f"publish_agent_run.py: no stream stores {subject}: is an agentcast node running?")
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
