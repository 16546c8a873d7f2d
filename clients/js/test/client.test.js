// The client against a real nats-server and real agentcast nodes, over real
// WebSockets. Sequences are compared exactly with what `agentcast publish`
// printed as stored.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  AgentcastClient,
  CONTROL_BAD_DATA,
  CONTROL_SOCKET_CLOSED,
  CONTROL_TOO_BIG,
  MAX_CLIENT_FRAME_BYTES,
} from '../agentcast.js';
import {
  MemoryStorage,
  NatsServer,
  Node,
  controlAgent,
  eventually,
  publish,
  sleep,
  thinking,
  token,
} from '../testlib/harness.js';

/** Clients of the running test, closed when it ends even if it failed. */
const clients = new Set();

/** Records what a client delivers. */
function record(client) {
  clients.add(client);
  const r = { seqs: [], events: [], gaps: [], states: [], welcomes: [], errors: [] };
  client.onError((e) => r.errors.push(e.message));
  client.on('*', (event, seq) => {
    r.seqs.push(seq);
    r.events.push(event);
  });
  client.onGap((g) => r.gaps.push(g));
  client.onState((s, info) => r.states.push({ s, ...info }));
  client.onWelcome((w) => r.welcomes.push(w));
  r.count = (n) => eventually(`${n} events (have ${r.seqs.length})`, () => r.seqs.length >= n);
  r.open = (n = 1) => eventually(`welcome #${n}`, () => r.welcomes.length >= n);
  return r;
}

/** Runs `body` with a nats-server and nodes, then stops them all. */
async function withNodes(extra, nodes, body) {
  const nats = await NatsServer.start();
  const started = [];
  try {
    for (let i = 0; i < nodes; i++) started.push(await Node.start(nats, extra));
    await body(nats, started);
  } finally {
    for (const c of clients) c.close();
    clients.clear();
    for (const n of started) await n.kill();
    await nats.stop();
  }
}

test('events arrive in order, exactly once, to their typed handlers', async () => {
  await withNodes([], 1, async (nats, [node]) => {
    const client = new AgentcastClient({ url: node.url, token: token('alice'), storage: null });
    const r = record(client);
    const typed = [];
    for (const t of ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_completed']) {
      client.on(t, (e, seq) => typed.push([t, e.type, seq]));
    }
    client.on('custom', (e, seq) => typed.push(['custom', e.type, seq]));
    client.connect();
    await r.open();
    const envelopes = [
      { type: 'agent_started', data: { input: 'q' } },
      ...thinking(20),
      { type: 'tool_executing', data: { tool: 'search', args: {} } },
      { type: 'tool_completed', data: { tool: 'search', result: 1 } },
      { type: 'acme.chart', data: { points: [1, 2] } },
      { type: 'agent_completed', data: { output: 'done' } },
    ];
    // Another user's events share the stream's sequence but are not ours.
    await publish(nats, 'bob', thinking(3));
    const seqs = await publish(nats, 'alice', envelopes);
    await r.count(seqs.length);
    await sleep(200);
    client.close();
    assert.deepEqual(r.seqs, seqs);
    assert.deepEqual(
      r.events.map((e) => [e.type, e.data]),
      envelopes.map((e) => [e.type, e.data]),
    );
    assert.deepEqual(
      typed,
      envelopes.map((e, i) => [e.type.includes('.') ? 'custom' : e.type, e.type, seqs[i]]),
    );
    assert.equal(client.duplicates, 0);
    assert.equal(client.state, 'closed');
    assert.deepEqual(
      r.states.map((s) => s.s),
      ['connecting', 'open', 'closed'],
    );
  });
});

test('a killed node: the client resumes on the other node with nothing missing or repeated', async () => {
  await withNodes([], 2, async (nats, [a, b]) => {
    const client = new AgentcastClient({ url: [a.url, b.url], token: () => token('carol'), storage: null });
    const r = record(client);
    client.connect();
    await r.open();
    assert.equal(r.states.find((s) => s.s === 'open').url, a.url);
    const first = await publish(nats, 'carol', thinking(10));
    await r.count(10);
    await a.kill('SIGKILL');
    // Published while the client has no socket: replayed on resume.
    const second = await publish(nats, 'carol', thinking(10, 10));
    await r.open(2);
    const third = await publish(nats, 'carol', thinking(5, 20));
    await r.count(25);
    await sleep(200);
    client.close();
    assert.deepEqual(r.seqs, [...first, ...second, ...third]);
    assert.equal(r.gaps.length, 0);
    assert.equal(client.reconnects, 1);
    assert.equal(r.states.filter((s) => s.s === 'open').at(-1).url, b.url);
  });
});

test('a drained node (reconnect frame, 1012): the client moves over at once and resumes', async () => {
  await withNodes([], 2, async (nats, [a, b]) => {
    const client = new AgentcastClient({ url: [a.url, b.url], token: () => token('dave'), storage: null });
    const r = record(client);
    client.connect();
    await r.open();
    const first = await publish(nats, 'dave', thinking(5));
    await r.count(5);
    const t0 = Date.now();
    await a.kill('SIGTERM');
    await r.open(2);
    const second = await publish(nats, 'dave', thinking(5, 5));
    await r.count(10);
    client.close();
    assert.deepEqual(r.seqs, [...first, ...second]);
    const drained = r.states.find((s) => s.code === 1012);
    assert.ok(drained, JSON.stringify(r.states));
    // A drain close is answered after a short jitter only (under the base).
    assert.equal(drained.s, 'waiting');
    assert.ok(drained.delay < 100, JSON.stringify(drained));
    assert.ok(Date.now() - t0 < 5000);
  });
});

test('duplicates by seq are dropped (a transport that delivers every frame twice)', async () => {
  await withNodes([], 1, async (nats, [node]) => {
    // A real WebSocket whose message handler is called twice per frame.
    class Doubling extends WebSocket {
      set onmessage(h) {
        super.onmessage = h && ((m) => (h(m), h(m)));
      }
      get onmessage() {
        return super.onmessage;
      }
    }
    const client = new AgentcastClient({ url: node.url, token: token('erin'), storage: null, WebSocket: Doubling });
    const r = record(client);
    client.connect();
    await r.open();
    const seqs = await publish(nats, 'erin', thinking(8));
    await r.count(8);
    await sleep(200);
    client.close();
    assert.deepEqual(r.seqs, seqs);
    assert.equal(client.duplicates, 8);
  });
});

test('the position is kept in storage and a new client resumes from it', async () => {
  await withNodes([], 1, async (nats, [node]) => {
    const storage = new MemoryStorage();
    const c1 = new AgentcastClient({ url: node.url, token: () => token('frank'), storage });
    const r1 = record(c1);
    c1.connect();
    await r1.open();
    const first = await publish(nats, 'frank', thinking(4));
    await r1.count(4);
    c1.close();
    const key = `agentcast:${node.url}:frank`;
    const saved = JSON.parse(storage.getItem(key));
    assert.deepEqual(saved, { seq: first.at(-1), epoch: r1.welcomes[0].epoch });
    // Published while no client is connected ("the page is reloading").
    const missed = await publish(nats, 'frank', thinking(6, 4));
    const c2 = new AgentcastClient({ url: node.url, token: () => token('frank'), storage });
    const r2 = record(c2);
    c2.connect();
    await r2.count(6);
    const later = await publish(nats, 'frank', thinking(2, 10));
    await r2.count(8);
    await sleep(200);
    c2.close();
    assert.deepEqual(r2.seqs, [...missed, ...later]);
    assert.equal(r2.gaps.length, 0);
    assert.equal(JSON.parse(storage.getItem(key)).seq, later.at(-1));
    // Another user's position is kept apart.
    assert.equal(storage.getItem(`agentcast:${node.url}:grace`), null);
  });
});

test('history that is gone is reported as a gap with what the server said', async () => {
  await withNodes(['--stream-max-per-user', '3'], 1, async (nats, [node]) => {
    const storage = new MemoryStorage();
    const c1 = new AgentcastClient({ url: node.url, token: () => token('heidi'), storage });
    const r1 = record(c1);
    c1.connect();
    // Welcomed first: events stored before the welcome are before "live
    // from now" and would never come (this raced under load).
    await r1.open();
    const before = await publish(nats, 'heidi', thinking(2));
    await r1.count(2);
    c1.close();
    const missed = await publish(nats, 'heidi', thinking(10, 2));
    const c2 = new AgentcastClient({ url: node.url, token: () => token('heidi'), storage });
    const r2 = record(c2);
    c2.connect();
    await r2.count(3);
    await sleep(200);
    c2.close();
    // Only the newest 3 are stored; the rest is announced, then they follow.
    const kept = missed.slice(-3);
    assert.deepEqual(r2.gaps, [{ reason: 'expired', from: before.at(-1) + 1, to: kept[0] - 1, earliest: kept[0] }]);
    assert.deepEqual(r2.seqs, kept);
  });
});

test('an expired token (4001): the provider is called again and the stream resumes', async () => {
  await withNodes(['--jwt-leeway', '0s'], 1, async (nats, [node]) => {
    let calls = 0;
    const client = new AgentcastClient({
      url: node.url,
      // The in-band refresh (the second call) gets another user's token, which
      // the node refuses: the first token's expiry stands, and the socket
      // closes with 4001.
      token: async () => {
        calls += 1;
        return token(calls === 2 ? 'mallory' : 'ivan', 2);
      },
      storage: null,
    });
    const r = record(client);
    client.connect();
    await r.open();
    const first = await publish(nats, 'ivan', thinking(3));
    await r.count(3);
    await eventually('a 4001 close', () => r.states.some((s) => s.code === 4001), 6000);
    const second = await publish(nats, 'ivan', thinking(3, 3));
    await r.open(2);
    await r.count(6);
    client.close();
    assert.deepEqual(r.seqs, [...first, ...second]);
    // First connection, refused refresh, the reconnect after 4001.
    assert.equal(calls, 3);
    assert.equal(client.tokenRequests, 3);
    assert.ok(r.errors.some((e) => e.includes('token refresh refused')), `${r.errors}`);
  });
});

test('a static token that expires (4001) stops the client: the same token would be refused', async () => {
  await withNodes(['--jwt-leeway', '0s'], 1, async (nats, [node]) => {
    const client = new AgentcastClient({ url: node.url, token: token('judy', 1), storage: null });
    const r = record(client);
    client.connect();
    await r.open();
    await eventually('closed', () => client.state === 'closed', 5000);
    const last = r.states.at(-1);
    assert.equal(last.code, 4001);
    assert.equal(last.fatal, true);
    assert.equal(client.reconnects, 0);
  });
});

test('a refused handshake is retried with backoff and a fresh token from the provider', async () => {
  await withNodes([], 1, async (nats, [node]) => {
    const tokens = ['not-a-token', token('kim').replace(/.$/, 'x'), token('kim')];
    let calls = 0;
    const client = new AgentcastClient({ url: node.url, token: () => tokens[calls++], storage: null });
    const r = record(client);
    client.connect();
    await r.open();
    const seqs = await publish(nats, 'kim', thinking(2));
    await r.count(2);
    client.close();
    assert.equal(calls, 3);
    assert.deepEqual(r.seqs, seqs);
    // A browser sees a refused upgrade as a close without a code (1006).
    const waits = r.states.filter((s) => s.s === 'waiting');
    assert.deepEqual(
      waits.map((s) => [s.code, s.welcomed, s.attempt]),
      [
        [1006, false, 1],
        [1006, false, 2],
      ],
    );
  });
});

test('a stored position from another epoch: reset to 0, stream_reset gap, everything the stream holds', async () => {
  await withNodes([], 1, async (nats, [node]) => {
    const seqs = await publish(nats, 'lee', thinking(3));
    const storage = new MemoryStorage();
    const key = `agentcast:${node.url}:lee`;
    // A position from a stream that was deleted and created again.
    storage.setItem(key, JSON.stringify({ seq: 999999, epoch: '1' }));
    const client = new AgentcastClient({ url: node.url, token: () => token('lee'), storage });
    const r = record(client);
    client.connect();
    await r.count(3);
    await sleep(200);
    client.close();
    assert.equal(r.gaps.length, 1);
    assert.equal(r.gaps[0].reason, 'stream_reset');
    assert.equal(r.gaps[0].from, undefined);
    assert.equal(r.gaps[0].to, undefined);
    assert.deepEqual(r.seqs, seqs);
    assert.deepEqual(JSON.parse(storage.getItem(key)), { seq: seqs.at(-1), epoch: r.welcomes[0].epoch });
  });
});

/** A real WebSocket that records every URL it opens. */
function recordingSocket(urls, rewrite = (u) => u) {
  return class extends WebSocket {
    constructor(url) {
      urls.push(url);
      super(rewrite(url));
    }
  };
}

/** The `last_seq` of each URL opened (null when absent). */
const positionsSent = (urls) => urls.map((u) => new URL(u).searchParams.get('last_seq'));

test('a seq past 2^53 from a node is neither delivered nor stored nor sent back', async () => {
  await withNodes([], 2, async (nats, [a, b]) => {
    const urls = [];
    let bent = 0;
    // Older nodes forwarded a publisher's forged Nats-Sequence: the first
    // event frame is given such a seq on its way in.
    class Forged extends recordingSocket(urls) {
      set onmessage(h) {
        super.onmessage =
          h &&
          ((m) => {
            if (bent === 0 && m.data.includes('"type":"event"')) {
              bent += 1;
              return h({ data: m.data.replace(/"seq":\d+/, '"seq":18446744073709552000') });
            }
            return h(m);
          });
      }
      get onmessage() {
        return super.onmessage;
      }
    }
    const storage = new MemoryStorage();
    const errors = [];
    const client = new AgentcastClient({
      url: [a.url, b.url],
      token: () => token('mia'),
      storage,
      WebSocket: Forged,
      onError: (e) => errors.push(e.message),
    });
    const r = record(client);
    client.connect();
    await r.open();
    const position = r.welcomes[0].position;
    const [forged] = await publish(nats, 'mia', thinking(1));
    await eventually('the bad frame reported', () => errors.length === 1);
    assert.match(errors[0], /not a safe integer/);
    assert.equal(client.lastSeq, position);
    assert.deepEqual(r.seqs, []);
    const later = await publish(nats, 'mia', thinking(2, 1));
    await r.count(2);
    assert.deepEqual(r.seqs, later);
    await a.kill('SIGKILL');
    const after = await publish(nats, 'mia', thinking(1, 3));
    await r.open(2);
    await r.count(3);
    client.close();
    assert.deepEqual(r.seqs, [...later, ...after]);
    assert.ok(forged < later[0]);
    assert.deepEqual(positionsSent(urls), [null, String(later.at(-1))]);
    assert.equal(JSON.parse(storage.getItem(`agentcast:${a.url} ${b.url}:mia`)).seq, after.at(-1));
  });
});

test('a stored position that is not a safe integer is dropped: live start and a position_dropped gap', async () => {
  await withNodes([], 1, async (nats, [node]) => {
    await publish(nats, 'nia', thinking(2));
    const storage = new MemoryStorage();
    const key = `agentcast:${node.url}:nia`;
    // What the earlier client stored after a forged seq.
    storage.setItem(key, '{"seq":18446744073709552000,"epoch":"1795500000123456789"}');
    const urls = [];
    const client = new AgentcastClient({
      url: node.url,
      token: () => token('nia'),
      storage,
      WebSocket: recordingSocket(urls),
    });
    const r = record(client);
    client.connect();
    await r.open();
    assert.deepEqual(r.gaps, [{ reason: 'position_dropped', from: undefined, to: undefined, earliest: undefined }]);
    assert.deepEqual(positionsSent(urls), [null]);
    const live = await publish(nats, 'nia', thinking(1, 2));
    await r.count(1);
    client.close();
    assert.deepEqual(r.seqs, live);
    assert.deepEqual(JSON.parse(storage.getItem(key)), { seq: live[0], epoch: r.welcomes[0].epoch });
  });
});

test('a position the node keeps refusing is dropped once a plain open is welcomed', async () => {
  await withNodes([], 1, async (nats, [node]) => {
    const urls = [];
    // The node refuses this position for real (400: above 2^53-1); the
    // client, like a browser, sees only a failed open.
    const Refused = recordingSocket(urls, (u) => u.replace(/last_seq=\d+/, 'last_seq=9007199254740992'));
    const client = new AgentcastClient({
      url: node.url,
      token: () => token('omar'),
      storage: null,
      lastSeq: 5,
      backoffBase: 10,
      backoffMax: 50,
      WebSocket: Refused,
    });
    const r = record(client);
    client.connect();
    await r.open();
    assert.deepEqual(positionsSent(urls), ['5', '5', '5', null]);
    assert.deepEqual(r.gaps, [{ reason: 'position_dropped', from: undefined, to: undefined, earliest: undefined }]);
    assert.equal(client.lastSeq, r.welcomes[0].position);
    const live = await publish(nats, 'omar', thinking(2));
    await r.count(2);
    client.close();
    assert.deepEqual(r.seqs, live);
  });
});

test('control requests reach the agent as the token user and resolve with its reply', async () => {
  await withNodes(['--control-timeout', '400ms'], 1, async (nats, [node]) => {
    const client = new AgentcastClient({ url: node.url, token: token('alice'), storage: null });
    const r = record(client);
    // Not sent before the socket is open, nor when data is no object or too big.
    await assert.rejects(client.control({ action: 'cancel' }), { name: 'ControlError', code: 'not_connected' });
    client.connect();
    await r.open();
    await assert.rejects(client.control([1]), { code: CONTROL_BAD_DATA });
    await assert.rejects(client.control({ text: 'x'.repeat(MAX_CLIENT_FRAME_BYTES) }), { code: CONTROL_TOO_BIG });
    // No agent yet.
    await assert.rejects(client.control({ action: 'cancel', run_id: 'r1' }), { code: 'no_agent' });

    const agent = await controlAgent(nats, 'agentcast.control.*', (req) => {
      if (req.data.action !== 'cancel') return undefined;
      return { status: 'cancelled', run_id: req.data.run_id, user: req.headers['Agentcast-User'] };
    });
    try {
      const reply = await client.control({ action: 'cancel', run_id: 'r1' });
      assert.deepEqual(reply, { status: 'cancelled', run_id: 'r1', user: 'alice' });
      assert.equal(agent.requests.length, 1);
      assert.equal(agent.requests[0].subject, 'agentcast.control.alice');
      // Several at once are answered each by its own id.
      const many = await Promise.all([1, 2, 3].map((i) => client.control({ action: 'cancel', run_id: `r${i}` })));
      assert.deepEqual(
        many.map((m) => m.run_id),
        ['r1', 'r2', 'r3'],
      );
      // An agent that does not answer: timeout, from the node.
      await assert.rejects(client.control({ action: 'approve' }), { code: 'timeout' });
      // Events go on meanwhile.
      const seqs = await publish(nats, 'alice', thinking(2));
      await r.count(2);
      assert.deepEqual(r.seqs, seqs);
    } finally {
      agent.close();
    }
  });
});

test('control requests pending when the socket closes are rejected and never resent', async () => {
  await withNodes(['--control-timeout', '5s'], 1, async (nats, [node]) => {
    const agent = await controlAgent(nats, 'agentcast.control.*', () => undefined);
    try {
      const client = new AgentcastClient({ url: node.url, token: () => token('bob'), storage: null, backoffBase: 10 });
      const r = record(client);
      client.connect();
      await r.open();
      const pending = client.control({ action: 'cancel', run_id: 'r9' });
      await eventually('the agent has the request', () => agent.requests.length === 1);
      // The node goes away: the socket closes, the client reconnects to the
      // node that takes its place, and the request is not sent again.
      const rejected = assert.rejects(pending, { code: CONTROL_SOCKET_CLOSED });
      await node.kill();
      await rejected;
      const next = await Node.start(nats, ['--listen', node.addr]);
      try {
        await r.open(2);
        await sleep(300);
        assert.equal(agent.requests.length, 1, 'resent after the reconnect');
        // And a request pending at close() is rejected the same way.
        const atClose = client.control({ action: 'cancel', run_id: 'r10' });
        await eventually('the agent has the second request', () => agent.requests.length === 2);
        const closed = assert.rejects(atClose, { code: CONTROL_SOCKET_CLOSED });
        client.close();
        await closed;
      } finally {
        await next.kill();
      }
    } finally {
      agent.close();
    }
  });
});
