#!/usr/bin/env python3
"""An agent that runs one run for a user and stops it when the user asks, with nats-py.

It publishes the run's events as publish_agent_run.py does (docs/publishing.md)
and, meanwhile, answers control requests (docs/publishing.md section 9):

- it subscribes to ``agentcast.control.*`` in the queue group ``agents``, so
  each request goes to one instance of the agent;
- the user is the subject's last token (the node puts the token's user there
  and in the ``Agentcast-User`` header; the two must agree);
- on ``{"action":"cancel","run_id":...}`` for a run of that user still in
  progress, it stops the run, publishes the run's ``agent_completed`` with
  ``{"status":"cancelled"}`` and replies ``{"status":"cancelled","run_id":...}``.
  A run of another user, or one it does not know, is ``unknown_run``; a run
  already over, ``finished``. Another action gets ``{"error":"unknown_action"}``.

Control requests are delivered at most once: a user told ``timeout`` cannot
know whether the run was stopped, so stopping a stopped run answers
``finished``, and the ``agent_completed`` event, which is stored, says how the
run ended.

Usage: control_agent.py --user alice [--nats-url URL] [--run-id ID] [--steps N] [--step-interval S]
Prints ``<seq> <type> stored|duplicate`` per event and
``control <user> <request id> <action> <status>`` per request; exits when the run is over.
"""

import argparse
import asyncio
import json
import sys

import nats
from nats.errors import NoServersError

from publish_agent_run import USER_ID, envelope, publish

CONTROL_PREFIX = "agentcast.control"  # the node's --control-prefix
QUEUE_GROUP = "agents"


class Run:
    def __init__(self, user, run_id):
        self.user = user
        self.run_id = run_id
        self.cancelled = asyncio.Event()
        self.over = False


async def answer(msg, runs):
    """Replies to one control request; returns what it printed."""
    user = msg.subject[len(CONTROL_PREFIX) + 1 :]
    headers = msg.headers or {}
    request_id = headers.get("Agentcast-Request", "")
    if not USER_ID.match(user) or headers.get("Agentcast-User") != user:
        # Not a node's request: nobody to answer for.
        print(f"control ? {request_id} ? not_a_request", flush=True)
        return
    try:
        data = json.loads(msg.data or b"{}")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        reply = {"error": "not_an_object"}
    elif data.get("action") != "cancel":
        reply = {"error": "unknown_action"}
    else:
        run = runs.get(data.get("run_id"))
        # A run of another user is treated as unknown: its id tells nothing.
        if run is None or run.user != user:
            reply = {"status": "unknown_run", "run_id": data.get("run_id")}
        elif run.over or run.cancelled.is_set():
            reply = {"status": "finished", "run_id": run.run_id}
        else:
            run.cancelled.set()
            reply = {"status": "cancelled", "run_id": run.run_id}
    action = data.get("action") if isinstance(data, dict) else None
    print(f"control {user} {request_id} {action} {reply.get('status', reply.get('error'))}", flush=True)
    await msg.respond(json.dumps(reply).encode())


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--user", required=True)
    p.add_argument("--run-id", default="py-run-1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-interval", type=float, default=0.5)
    p.add_argument("--subject-prefix", default="agentcast.events")
    args = p.parse_args()
    if not USER_ID.match(args.user):
        sys.exit(f"control_agent.py: user id {args.user!r} is not allowed (ASCII letters, digits, -_=@:|+~)")
    try:
        nc = await nats.connect(args.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    except (NoServersError, OSError) as e:
        sys.exit(f"control_agent.py: cannot connect to NATS at {args.nats_url}: {e}")
    js = nc.jetstream()
    run = Run(args.user, args.run_id)
    runs = {run.run_id: run}

    async def on_request(msg):
        await answer(msg, runs)

    await nc.subscribe(f"{CONTROL_PREFIX}.*", queue=QUEUE_GROUP, cb=on_request)
    await nc.flush()
    subject = f"{args.subject_prefix}.{args.user}"
    step = 0

    async def emit(kind, data):
        nonlocal step
        event = envelope(kind, run.run_id, data)
        ack = await publish(js, subject, event, f"{run.run_id}-{step}")
        step += 1
        print(ack.seq, kind, "duplicate" if ack.duplicate else "stored", flush=True)

    try:
        await emit("agent_started", {"input": "Count slowly."})
        for i in range(args.steps):
            try:
                await asyncio.wait_for(run.cancelled.wait(), timeout=args.step_interval)
                break
            except asyncio.TimeoutError:
                await emit("agent_thinking", {"text": f"step {i + 1} of {args.steps}"})
        status = "cancelled" if run.cancelled.is_set() else "completed"
        await emit("agent_completed", {"status": status})
        run.over = True
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
