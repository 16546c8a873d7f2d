#!/usr/bin/env python3
"""The Python package's publishing cost, beside the Rust publisher, in one run.

Starts its own nats-server (``$AGENTCAST_BENCH_NATS_SERVER``, else
``nats-server`` on PATH) and an agentcast node (``--agentcast``, default
target/release/agentcast), which creates the stream, then measures:

1. events/s of ``--events`` events of about 300 bytes to one user:
   - Python ``Publisher.publish`` one at a time (a round trip each);
   - Python ``Publisher.publish_batch`` (pipelined, 256 acks in flight);
   - Rust: ``agentcast publish`` reading the same events as JSON lines from
     stdin (``Publisher::publish_batch``, pipelined), process start included;
2. JetStream messages per token: ``--streams`` concurrent messages, each
   ``--tokens`` tokens of about 4 bytes at ``--rate`` tokens/s, through a
   ``TextStreamer`` with the default coalescing (50 ms) and with none
   (every token its own delta). Every message's stored text is checked
   against the tokens fed.

Usage: python_publish.py [--events N] [--streams N] [--tokens N] [--rate R] [--out FILE.json]
Needs the package's dependencies (nats-py); run with the CI venv's python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
sys.path.insert(0, str(REPO / "clients" / "python" / "tests"))

import nats  # noqa: E402

from agentcast import Coalesce, Event, Published, Publisher  # noqa: E402
from conftest import NatsServer, Node  # noqa: E402


def event(i: int) -> Event:
    return Event.agent_thinking(f"bench-{i // 100}", "x" * 220).with_id(f"bench-{os.getpid()}-{i}")


async def python_rates(nc: Any, n: int) -> dict[str, float]:
    p = Publisher(nc)
    t = time.perf_counter()
    for i in range(n):
        await p.publish("one", event(i))
    one = n / (time.perf_counter() - t)
    t = time.perf_counter()
    results = await p.publish_batch("batch", [event(n + i) for i in range(n)])
    batch = n / (time.perf_counter() - t)
    assert all(isinstance(r, Published) and not r.duplicate for r in results), "every event stored once"
    return {"one_at_a_time": one, "pipelined": batch}


def rust_rate(agentcast: str, url: str, n: int) -> float:
    lines = "".join(json.dumps(event(10 * n + i).to_dict()) + "\n" for i in range(n)).encode()
    t = time.perf_counter()
    out = subprocess.run(
        [agentcast, "publish", "--nats-url", url, "--user", "rust"], input=lines, capture_output=True, check=True
    )
    rate = n / (time.perf_counter() - t)
    assert len(out.stdout.splitlines()) >= n, out.stderr.decode()
    return rate


async def token_streams(nc: Any, streams: int, tokens: int, rate: float, coalesce: Coalesce) -> dict[str, Any]:
    p = Publisher(nc)
    rng = random.Random(1)
    vocabulary = ["the", " cat", " sat", " on", " a", " mat", ",", " and", " ☕", "\n"]

    async def one(k: int) -> tuple[str, list[Published]]:
        fed = [rng.choice(vocabulary) for _ in range(tokens)]
        async with p.text_stream(f"tok{k}", f"m-{k}", run_id=f"r-{k}", coalesce=coalesce) as s:
            await asyncio.sleep(rng.random() / rate)
            start = time.perf_counter()
            for i, tok in enumerate(fed):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                await s.push(tok)
        return "".join(fed), s.published

    t = time.perf_counter()
    done = await asyncio.gather(*(one(k) for k in range(streams)))
    elapsed = time.perf_counter() - t
    js = nc.jetstream()
    exact = 0
    for text, acks in done:
        stored = ""
        for a in acks:
            stored += json.loads((await js.get_msg("AGENTCAST", a.seq)).data)["delta"]
        exact += stored == text
    messages = sum(len(acks) for _, acks in done)
    return {
        "coalesce_delay_ms": coalesce.delay * 1000,
        "tokens": streams * tokens,
        "messages": messages,
        "messages_per_token": messages / (streams * tokens),
        "texts_exact": exact,
        "texts": streams,
        "seconds": elapsed,
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--agentcast", default=str(REPO / "target" / "release" / "agentcast"))
    p.add_argument("--out")
    a = p.parse_args()
    os.environ.setdefault(
        "AGENTCAST_TEST_NATS_SERVER",
        os.environ.get("AGENTCAST_BENCH_NATS_SERVER") or shutil.which("nats-server") or "/usr/sbin/nats-server",
    )
    os.environ["AGENTCAST_BIN"] = a.agentcast
    server = NatsServer()
    node = Node(server.url, "--stream-max-per-user", "1000000")
    try:
        version = subprocess.run(
            [os.environ["AGENTCAST_TEST_NATS_SERVER"], "--version"], capture_output=True, text=True
        ).stdout.strip()
        nc = await nats.connect(server.url)
        py = await python_rates(nc, a.events)
        rust = rust_rate(a.agentcast, server.url, a.events)
        coalesced = await token_streams(nc, a.streams, a.tokens, a.rate, Coalesce())
        every = await token_streams(nc, a.streams, a.tokens, a.rate, Coalesce(delay=0.0, max_bytes=1))
        await nc.close()
    finally:
        node.stop()
        server.stop()
    result = {
        "bench": "python_publish",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "nats_server": version,
        "events": a.events,
        "events_per_s": {"python": py, "rust_cli_pipelined": rust},
        "ratios": {"rust_over_python_pipelined": rust / py["pipelined"]},
        "tokens": {"coalesced": coalesced, "every_token": every},
    }
    print(f"{result['date']}: nats-server {version}; {os.cpu_count()} cores (load {os.getloadavg()[0]:.1f}); {a.events} events of ~300 bytes")
    print(f"  python publish, one at a time: {py['one_at_a_time']:8.0f} events/s")
    print(f"  python publish_batch:          {py['pipelined']:8.0f} events/s")
    print(f"  rust agentcast publish (batch): {rust:7.0f} events/s (process start included)")
    for name, r in (("coalesced (50 ms)", coalesced), ("every token", every)):
        print(
            f"  tokens, {name}: {a.streams} streams x {a.tokens} tokens at {a.rate:.0f}/s: "
            f"{r['messages']} JetStream messages, {r['messages_per_token']:.3f} per token, "
            f"{r['texts_exact']}/{r['texts']} texts exact"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")
    assert coalesced["texts_exact"] == coalesced["texts"] and every["texts_exact"] == every["texts"]


if __name__ == "__main__":
    asyncio.run(main())
