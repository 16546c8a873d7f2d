"""Real processes for the package's tests: a nats-server and an agentcast node, as the Rust tests start them.

- nats-server: ``$AGENTCAST_TEST_NATS_SERVER``, else ``nats-server`` on PATH,
  else Debian's ``/usr/sbin/nats-server``; a random port (``-p -1``) and a
  temporary JetStream directory; killed at the end of the test.
- the node: ``$AGENTCAST_BIN`` (tests/python.rs sets it to the binary cargo
  built), else ``target/debug/agentcast`` of this repository, on
  ``127.0.0.1:0``; killed at the end of the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import nats
import pytest
import websockets

REPO = Path(__file__).resolve().parents[3]
SECRET = "test-secret-test-secret-test-secret!"
START_TIMEOUT = 15.0
RECV_TIMEOUT = 10.0


def nats_server_bin() -> str:
    return os.environ.get("AGENTCAST_TEST_NATS_SERVER") or shutil.which("nats-server") or "/usr/sbin/nats-server"


def agentcast_bin() -> str:
    return os.environ.get("AGENTCAST_BIN") or str(REPO / "target" / "debug" / "agentcast")


class NatsServer:
    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="agentcast-py-nats-")
        ports = Path(self.dir.name) / "ports"
        ports.mkdir()
        self.log = open(Path(self.dir.name) / "nats.log", "wb")
        self.proc = subprocess.Popen(
            [nats_server_bin(), "-a", "127.0.0.1", "-p", "-1", "-m", "-1", "-js", "-sd",
             str(Path(self.dir.name) / "js"), "--ports_file_dir", str(ports)],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            files = list(ports.iterdir())
            if files:
                try:
                    self.url: str = json.loads(files[0].read_text())["nats"][0]
                    break
                except (ValueError, KeyError, IndexError):
                    pass  # caught half-written
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"nats-server did not start: see {self.log.name}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.dir.cleanup()


class Node:
    def __init__(self, nats_url: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [agentcast_bin(), "serve", "--listen", "127.0.0.1:0", "--nats-url", nats_url,
             "--jwt-secret", SECRET, "--drain-window", "1s", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "AGENTCAST_LOG": "info"},
            text=True,
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.addr = ""

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                if not found.is_set() and "listening on " in line:
                    self.addr = line.split("listening on ", 1)[1].split()[0]
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError("node did not start:\n" + "\n".join(self.lines))
        deadline = time.monotonic() + START_TIMEOUT
        while self.status("/readyz") != 200:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("node not ready:\n" + "\n".join(self.lines))
            time.sleep(0.05)

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=2) as r:
                return int(r.status)
        except OSError:
            return 0

    def token(self, user: str) -> str:
        out = subprocess.run(
            [agentcast_bin(), "token", "--user", user, "--jwt-secret", SECRET],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def ws_url(self, user: str) -> str:
        return f"ws://{self.addr}/ws?token={self.token(user)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class WsClient:
    """A WebSocket client of the node: frames as parsed JSON."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        return frame

    async def events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` event frames (gaps fail the test: nothing is removed in these tests)."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            f = await self.recv()
            assert f["type"] != "gap", f
            if f["type"] == "event":
                out.append(f)
        return out

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    s = NatsServer()
    yield s
    s.stop()


@pytest.fixture
def node(nats_server: NatsServer) -> Iterator[Node]:
    n = Node(nats_server.url)
    yield n
    n.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Any]:
    c = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    yield c
    await c.close()


async def join(node: Node, user: str) -> tuple[WsClient, dict[str, Any], Any]:
    """Opens a socket for ``user``: the client, its welcome frame, and the connection to close."""
    ws = await websockets.connect(node.ws_url(user), max_size=None)
    client = WsClient(ws)
    welcome = await client.recv()
    assert welcome["type"] == "welcome", welcome
    return client, welcome, ws
