// The client's transports against real nodes: Server-Sent Events (`/sse`,
// control requests as `POST /control`), `auto` falling back to SSE when
// WebSockets cannot open, and the token refreshed before it expires.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { AgentcastClient, AUTO_FALLBACK_FAILURES } from '../agentcast.js';
import { NatsServer, Node, controlAgent, eventually, publish, sleep, thinking, token } from '../testlib/harness.js';

const clients = new Set();

async function withNode(extra, body) {
  const nats = await NatsServer.start();
  const started = [];
  try {
    started.push(await Node.start(nats, extra));
    await body(nats, started[0], started);
  } finally {
    for (const c of clients) c.close();
    clients.clear();
    for (const n of started) await n.kill();
    await nats.stop();
  }
}

function record(client) {
  clients.add(client);
  const r = { seqs: [], welcomes: [], states: [], errors: [] };
  client.on('*', (_event, seq) => r.seqs.push(seq));
  client.onWelcome((w) => r.welcomes.push(w));
  client.onState((s, info) => r.states.push({ s, ...info }));
  client.onError((e) => r.errors.push(e.message));
  return r;
}

test('over SSE: events in order, a resume across a node restart, and control requests', async () => {
  await withNode([], async (nats, node, started) => {
    const agent = await controlAgent(nats, 'agentcast.control.*', () => ({ status: 'cancelled' }));
    try {
      const client = new AgentcastClient({ url: node.url, transport: 'sse', token: () => token('sse-a'), storage: null });
      const r = record(client);
      client.connect();
      await eventually('welcome', () => r.welcomes.length >= 1);
      assert.equal(client.transport, 'sse');
      const first = await publish(nats, 'sse-a', thinking(10));
      await eventually('10 events', () => r.seqs.length >= 10);
      const reply = await client.control({ action: 'cancel', run_id: 'r-1' });
      assert.equal(reply.status, 'cancelled');
      // The node dies; another takes its port; what was published meanwhile
      // arrives once, in order.
      const addr = node.addr;
      await node.kill();
      const missed = await publish(nats, 'sse-a', thinking(5, 10));
      started.push(await Node.start(nats, ['--listen', addr]));
      await eventually('15 events', () => r.seqs.length >= 15, 20000);
      const more = await publish(nats, 'sse-a', thinking(3, 15));
      await eventually('18 events', () => r.seqs.length >= 18);
      assert.deepEqual(r.seqs, [...first, ...missed, ...more]);
      assert.equal(client.duplicates, 0);
      assert.ok(client.reconnects >= 1);
    } finally {
      await agent.close();
    }
  });
});

test('auto falls back to SSE when the WebSocket cannot open but HTTP works', async () => {
  await withNode([], async (nats, node) => {
    // The WebSocket URL leads nowhere (as through a proxy that drops
    // upgrades); the event-stream URL is the node's.
    const client = new AgentcastClient({
      url: 'ws://127.0.0.1:9/ws',
      sseUrls: [`http://${node.addr}/sse`],
      transport: 'auto',
      token: () => token('auto-a'),
      storage: null,
      backoffBase: 10,
      backoffMax: 50,
    });
    const r = record(client);
    client.connect();
    await eventually('welcome over SSE', () => r.welcomes.length >= 1, 20000);
    assert.equal(client.transport, 'sse');
    const opened = r.states.find((s) => s.s === 'open');
    assert.equal(opened.transport, 'sse');
    assert.ok(client.reconnects >= AUTO_FALLBACK_FAILURES, `${client.reconnects} reconnects before the fallback`);
    const seqs = await publish(nats, 'auto-a', thinking(4));
    await eventually('4 events', () => r.seqs.length >= 4);
    assert.deepEqual(r.seqs, seqs);
  });
});

for (const transport of ['websocket', 'sse']) {
  test(`the token is refreshed before it expires (${transport})`, async () => {
    await withNode(['--jwt-leeway', '0s'], async (nats, node) => {
      // Tokens of 3 s: refreshed at half the time left, so well before exp.
      const client = new AgentcastClient({ url: node.url, transport, token: () => token('fresh', 3), storage: null });
      const r = record(client);
      client.connect();
      await eventually('welcome', () => r.welcomes.length >= 1);
      assert.ok(Number.isSafeInteger(r.welcomes[0].exp), 'welcome carries exp');
      // Past three lifetimes of a token: never closed for expiry.
      await sleep(7000);
      const seqs = await publish(nats, 'fresh', thinking(2));
      await eventually('2 events', () => r.seqs.length >= 2);
      assert.deepEqual(r.seqs, seqs);
      assert.ok(client.tokenRequests >= 3, `${client.tokenRequests} tokens asked for`);
      assert.deepEqual(r.errors, []);
      const expired = r.states.filter((s) => s.code === 4001);
      assert.deepEqual(expired, [], 'no close for an expired token');
      if (transport === 'websocket') assert.equal(client.reconnects, 0, 'refreshed in band, no reconnect');
    });
  });
}
