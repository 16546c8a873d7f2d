#!/usr/bin/env python3
"""The audit's cost (issue 14, item 3): one release agentcast node holding N
quiet users (one socket each) while the stream keeps moving (events of users
that have no socket here, at a steady rate). Every quiet user is then due at
every audit: the worst case for the audit. Reports the users the node's
audit checks per second (agentcast_audit_checks_total), the messages
nats-server receives per second (its /varz in_msgs: requests of every kind
and the trickle's events), and the CPU of nats-server and of the node,
against the same run with no users (the trickle alone). On nats-server 2.11+
the audit asks for users in batches; before, one request a user.

usage: audit_cost.py NATS_SERVER_BIN AGENTCAST_BIN [USERS] [SECONDS]
Needs the `nats-py` and `websockets` packages. Everything runs on loopback.
"""
import asyncio, base64, hashlib, hmac, json, os, random, re, resource, subprocess, sys, tempfile, time

import nats
import websockets

SECRET = b"bench-secret-bench-secret-bench-secret"
NATS_BIN, NODE_BIN = sys.argv[1], sys.argv[2]
USERS = int(sys.argv[3]) if len(sys.argv) > 3 else 15000
SECONDS = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
TRICKLE = 50  # events/s for users without sockets: keeps the stream moving


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")


def token(user):
    h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    p = b64(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    s = b64(hmac.new(SECRET, h + b"." + p, hashlib.sha256).digest())
    return (h + b"." + p + b"." + s).decode()


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def metric(text, name):
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def http_get(host, port, path):
    r, w = await asyncio.open_connection(host, port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await r.read()
    w.close()
    return data.decode(errors="replace")


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = random.randint(20000, 30000)
    monitor = port + 10000
    store = tempfile.mkdtemp()
    nats_proc = subprocess.Popen([NATS_BIN, "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor), "-js", "-sd", store],
                                 stderr=subprocess.DEVNULL)
    await asyncio.sleep(1)
    url = f"nats://127.0.0.1:{port}"
    node = subprocess.Popen([NODE_BIN, "serve", "--listen", "127.0.0.1:0", "--nats-url", url,
                             "--jwt-secret", SECRET.decode(), "--max-connections", "19000"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "AGENTCAST_LOG": "info"})
    addr = None
    while addr is None:
        line = node.stderr.readline()
        m = re.search(r"listening on (\S+)", line)
        if m:
            addr = m.group(1)
    host, hport = addr.rsplit(":", 1)
    while "200 OK" not in await http_get(host, hport, "/readyz"):
        await asyncio.sleep(0.1)
    nc = await nats.connect(url)
    js = nc.jetstream()
    stop = asyncio.Event()

    async def trickle():
        i = 0
        while not stop.is_set():
            await js.publish(f"agentcast.events.busy{i % 100}", b'{"type":"tick"}')
            i += 1
            await asyncio.sleep(1 / TRICKLE)

    async def in_msgs():
        varz = await http_get("127.0.0.1", monitor, "/varz")
        return json.JSONDecoder().raw_decode(varz[varz.index("{"):])[0]["in_msgs"]

    async def measure(label):
        text0 = await http_get(host, hport, "/metrics")
        m0 = await in_msgs()
        n0, c0, t0 = cpu_seconds(nats_proc.pid), cpu_seconds(node.pid), time.time()
        await asyncio.sleep(SECONDS)
        text1 = await http_get(host, hport, "/metrics")
        m1 = await in_msgs()
        n1, c1, t1 = cpu_seconds(nats_proc.pid), cpu_seconds(node.pid), time.time()
        dt = t1 - t0
        checks = (metric(text1, "agentcast_audit_checks_total") - metric(text0, "agentcast_audit_checks_total")) / dt
        res = {"phase": label, "seconds": round(dt, 1), "audit_checks_per_s": round(checks),
               "nats_in_msgs_per_s": round((m1 - m0) / dt),
               "nats_server_cpu_pct": round(100 * (n1 - n0) / dt, 1), "node_cpu_pct": round(100 * (c1 - c0) / dt, 1)}
        print(json.dumps(res), flush=True)
        return res

    t = asyncio.create_task(trickle())
    base = await measure("trickle only, no users")
    sockets = []
    sem = asyncio.Semaphore(200)

    async def open_one(u):
        async with sem:
            ws = await websockets.connect(f"ws://{addr}/ws?token={token(f'q{u}')}", max_size=None, ping_interval=None)
            await ws.recv()  # welcome
            sockets.append(ws)

    started = time.time()
    await asyncio.gather(*[open_one(u) for u in range(USERS)])
    print(json.dumps({"opened": len(sockets), "in_s": round(time.time() - started, 1)}), flush=True)
    await asyncio.sleep(5)
    loaded = await measure(f"{USERS} quiet users")
    stop.set()
    await t
    per_check_us = None
    if loaded["audit_checks_per_s"]:
        per_check_us = round((loaded["nats_server_cpu_pct"] - base["nats_server_cpu_pct"]) / 100 * 1e6
                             / loaded["audit_checks_per_s"], 1)
    print(json.dumps({"nats_server_cpu_us_per_audit_check": per_check_us}), flush=True)
    for ws in sockets:
        ws.transport.close()
    node.kill()
    nats_proc.kill()


asyncio.run(main())
