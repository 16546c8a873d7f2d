// Dead connections, with a fake clock (no real waiting): the stall watchdog
// on both transports, and a browser page's `offline`, `online` and
// `visibilitychange`. The node's side is played by the test (testlib/fakes.js).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { AgentcastClient, PROBE_TIMEOUT_MS, STALL_TIMEOUT_MS } from '../agentcast.js';
import { FakeClock, fakeEventStreams, fakeWebSockets, fakeWindow } from '../testlib/fakes.js';
import { token } from '../testlib/harness.js';

/** Quiet on a WebSocket after which the client sends its `ping`. */
const QUIET_BEFORE_PING = STALL_TIMEOUT_MS - PROBE_TIMEOUT_MS;
/** The node's default `--ping-interval`: its `: ping` comments on an event stream. */
const NODE_PING_INTERVAL_MS = 20000;
/** A backoff jitter that waits (0 would retry at once and hide the backoff). */
const JITTER = () => 0.99;

/** A client on fake WebSockets and a fake clock, recording what it reports. */
function setup(options = {}) {
  const clock = new FakeClock();
  const { WebSocket, sockets } = fakeWebSockets();
  const client = new AgentcastClient({
    url: ['ws://a.test/ws', 'ws://b.test/ws'],
    token: token('u'),
    storage: null,
    random: JITTER,
    WebSocket,
    clock,
    ...options,
  });
  const r = { clock, sockets, client, states: [], seqs: [], errors: [] };
  client.onState((s, info) => r.states.push({ s, ...info }));
  client.on('*', (_event, seq) => r.seqs.push(seq));
  client.onError((e) => r.errors.push(e.message));
  r.names = () => r.states.map((s) => s.s);
  return r;
}

/** Connects and welcomes the first socket at position 0; returns it. */
async function open(r) {
  r.client.connect();
  await r.clock.advance(0);
  assert.equal(r.sockets.length, 1);
  r.sockets[0].welcome(0);
  assert.equal(r.client.state, 'open');
  return r.sockets[0];
}

test('a quiet WebSocket is pinged; no answer within the probe time is a stall, resumed at once on the next node', async () => {
  const r = setup();
  // Node: no window or document, so nothing is listened to.
  assert.equal(typeof globalThis.document, 'undefined');
  const a = await open(r);
  a.event(1);
  a.event(2);
  a.event(3);
  await r.clock.advance(QUIET_BEFORE_PING - 1);
  assert.equal(a.pings(), 0, 'no ping before the quiet period is over');
  await r.clock.advance(1);
  assert.equal(a.pings(), 1, 'a ping after the quiet period');
  await r.clock.advance(PROBE_TIMEOUT_MS - 1);
  assert.equal(r.client.state, 'open');
  await r.clock.advance(1);
  // Nothing for STALL_TIMEOUT_MS: closed, reported, and reopened without a backoff wait.
  assert.equal(a.closedWith, 1000);
  const stalled = r.states.find((s) => s.s === 'stalled');
  assert.deepEqual(stalled, { s: 'stalled', url: 'ws://a.test/ws', transport: 'websocket', quiet: STALL_TIMEOUT_MS });
  assert.equal(r.sockets.length, 2, 'reconnected at once');
  const b = r.sockets[1];
  assert.match(b.url, /^ws:\/\/b\.test\/ws\?token=[^&]+&last_seq=3&epoch=7$/);
  // The stalled socket is cut off: a late frame on it is not delivered.
  a.event(4);
  b.welcome(3);
  b.event(4);
  b.event(5);
  assert.deepEqual(r.seqs, [1, 2, 3, 4, 5]);
  assert.equal(r.client.duplicates, 0);
  assert.equal(r.client.reconnects, 1);
  assert.deepEqual(r.names(), ['connecting', 'open', 'stalled', 'connecting', 'open']);
  assert.deepEqual(r.errors, []);
  r.client.close();
});

test('a slow but live WebSocket is never declared stalled: any frame answers, a pong too', async () => {
  const r = setup();
  const a = await open(r);
  let seq = 0;
  // A backlog trickling in, a frame a second for ten minutes: never quiet long enough to ping.
  for (let i = 0; i < 600; i++) {
    await r.clock.advance(1000);
    a.event(++seq);
  }
  assert.equal(a.pings(), 0);
  // Frames so slow that each comes after a ping, but within the probe time.
  for (let i = 0; i < 20; i++) {
    await r.clock.advance(QUIET_BEFORE_PING + PROBE_TIMEOUT_MS / 2);
    a.event(++seq);
  }
  assert.equal(a.pings(), 20);
  // An idle stream: the pong is the answer.
  await r.clock.advance(QUIET_BEFORE_PING);
  assert.equal(a.pings(), 21);
  await r.clock.advance(PROBE_TIMEOUT_MS - 1);
  a.receive({ type: 'pong' });
  await r.clock.advance(QUIET_BEFORE_PING - 1);
  assert.equal(a.pings(), 21, 'the next ping waits a whole quiet period after the pong');
  assert.equal(r.client.state, 'open');
  assert.equal(r.sockets.length, 1);
  assert.ok(!r.names().includes('stalled'));
  assert.equal(r.seqs.length, seq);
  r.client.close();
});

test('an event stream lives on the node\'s `: ping` comments; nothing for the stall timeout reopens it from its position', async () => {
  const clock = new FakeClock();
  const { fetch, streams } = fakeEventStreams();
  const client = new AgentcastClient({
    url: 'ws://a.test/ws',
    transport: 'sse',
    fetch,
    token: token('u'),
    storage: null,
    clock,
  });
  const states = [];
  const seqs = [];
  client.onState((s, info) => states.push({ s, ...info }));
  client.on('*', (_e, seq) => seqs.push(seq));
  client.connect();
  await clock.advance(0);
  assert.equal(streams.length, 1);
  streams[0].welcome(0);
  streams[0].event(1);
  streams[0].event(2);
  await clock.advance(0);
  assert.equal(client.state, 'open');
  // Ten minutes of comments only, one per node ping interval.
  for (let i = 0; i < 30; i++) {
    await clock.advance(NODE_PING_INTERVAL_MS);
    streams[0].comment();
  }
  assert.equal(streams.length, 1, 'kept alive by its comments');
  await clock.advance(STALL_TIMEOUT_MS - 1);
  assert.equal(client.state, 'open');
  await clock.advance(1);
  assert.ok(streams[0].aborted, 'the stalled stream is closed');
  assert.equal(states.find((s) => s.s === 'stalled')?.quiet, STALL_TIMEOUT_MS);
  assert.equal(streams.length, 2, 'reopened at once');
  assert.match(streams[1].url, /^http:\/\/a\.test\/sse\?last_seq=2&epoch=7$/);
  streams[1].welcome(2);
  streams[1].event(3);
  await clock.advance(0);
  assert.deepEqual(seqs, [1, 2, 3]);
  client.close();
});

test('offline closes the open socket and stops retrying; online reconnects at once and resumes', async () => {
  const win = fakeWindow();
  const r = setup({ window: win });
  const a = await open(r);
  assert.equal(win.listeners(), 3, 'online, offline, visibilitychange');
  a.event(1);
  win.fire('offline');
  assert.equal(r.client.state, 'offline');
  assert.equal(a.closedWith, 1000);
  await r.clock.advance(10 * 60000);
  assert.equal(r.sockets.length, 1, 'no attempt while offline');
  win.fire('online');
  await r.clock.advance(0);
  assert.equal(r.sockets.length, 2, 'reconnected at once');
  assert.match(r.sockets[1].url, /&last_seq=1&epoch=7$/);
  r.sockets[1].welcome(1);
  r.sockets[1].event(2);
  assert.deepEqual(r.seqs, [1, 2]);
  assert.deepEqual(r.names(), ['connecting', 'open', 'offline', 'connecting', 'open']);
  r.client.close();
});

test('offline while backing off: no attempt is spent until online, which starts the backoff afresh', async () => {
  const win = fakeWindow();
  const r = setup({ window: win });
  const a = await open(r);
  a.event(1);
  // The network fails before the browser says so: attempts back off.
  a.drop();
  const first = r.states.at(-1);
  assert.equal(first.s, 'waiting');
  await r.clock.advance(first.delay);
  assert.equal(r.sockets.length, 2);
  r.sockets[1].drop();
  assert.equal(r.states.at(-1).s, 'waiting');
  assert.equal(r.states.at(-1).attempt, 2);
  win.fire('offline');
  assert.equal(r.client.state, 'offline');
  const reconnects = r.client.reconnects;
  await r.clock.advance(10 * 60000);
  assert.equal(r.sockets.length, 2, 'the pending retry was cancelled');
  assert.equal(r.client.reconnects, reconnects, 'no attempt started');
  assert.equal(r.states.at(-1).s, 'offline');
  win.fire('online');
  await r.clock.advance(0);
  assert.equal(r.sockets.length, 3);
  assert.deepEqual(r.states.at(-1), { s: 'connecting', attempt: 0 });
  assert.match(r.sockets[2].url, /&last_seq=1&epoch=7$/);
  r.client.close();
});

test('the page becoming visible, or online without offline, checks the socket at once', async () => {
  const win = fakeWindow();
  const r = setup({ window: win });
  const a = await open(r);
  a.event(1);
  await r.clock.advance(1000);
  win.hide();
  assert.equal(a.pings(), 0, 'hidden: nothing to check');
  await r.clock.advance(1000);
  win.show();
  assert.equal(a.pings(), 1, 'visible: a ping at once');
  await r.clock.advance(PROBE_TIMEOUT_MS - 1);
  assert.equal(r.client.state, 'open');
  await r.clock.advance(1);
  assert.equal(r.states.find((s) => s.s === 'stalled')?.quiet, 2000 + PROBE_TIMEOUT_MS);
  assert.equal(r.sockets.length, 2, 'reconnected at once');
  const b = r.sockets[1];
  assert.match(b.url, /&last_seq=1&epoch=7$/);
  b.welcome(1);
  // Answered in time: the socket stays.
  win.show();
  assert.equal(b.pings(), 1);
  b.receive({ type: 'pong' });
  win.fire('online');
  assert.equal(b.pings(), 2, 'online with no offline before: a ping at once');
  b.event(2);
  await r.clock.advance(PROBE_TIMEOUT_MS);
  assert.equal(r.client.state, 'open');
  assert.equal(r.sockets.length, 2);
  // A retry waiting out its backoff is made at once.
  b.drop();
  assert.equal(r.client.state, 'waiting');
  assert.ok(r.states.at(-1).delay > 0);
  win.show();
  await r.clock.advance(0);
  assert.equal(r.sockets.length, 3);
  assert.deepEqual(r.seqs, [1, 2]);
  r.client.close();
});

test('close() removes the listeners; a window without a document gets none', async () => {
  const win = fakeWindow();
  const r = setup({ window: win });
  assert.equal(win.listeners(), 0, 'none before connect()');
  await open(r);
  assert.equal(win.listeners(), 3);
  r.client.close();
  assert.equal(win.listeners(), 0);
  win.fire('offline');
  win.fire('online');
  win.show();
  await r.clock.advance(STALL_TIMEOUT_MS * 2);
  assert.equal(r.client.state, 'closed');
  assert.equal(r.sockets.length, 1);

  const bare = new EventTarget();
  let added = 0;
  bare.addEventListener = () => (added += 1);
  const s = setup({ window: bare });
  await open(s);
  assert.equal(added, 0);
  s.client.close();
});

test('stallTimeout: the probe time is at most half of it; bad values are refused', async () => {
  const r = setup({ stallTimeout: 4000 });
  const a = await open(r);
  await r.clock.advance(2000);
  assert.equal(a.pings(), 1);
  await r.clock.advance(1999);
  assert.equal(r.client.state, 'open');
  await r.clock.advance(1);
  assert.equal(r.states.find((s) => s.s === 'stalled')?.quiet, 4000);
  r.client.close();
  for (const bad of [0, -1, NaN, Infinity, '30000', 2 ** 31]) {
    assert.throws(() => setup({ stallTimeout: bad }), TypeError, String(bad));
  }
});

test('offline and online while the token is fetched: no socket while offline, never two', async () => {
  const win = fakeWindow();
  const pending = [];
  const r = setup({ window: win, token: () => new Promise((resolve) => pending.push(resolve)) });
  r.client.connect();
  await r.clock.advance(0);
  assert.equal(pending.length, 1, 'the first open awaits its token');
  win.fire('offline');
  pending[0](token('u'));
  await r.clock.advance(0);
  assert.equal(r.sockets.length, 0, 'no socket opened offline');
  assert.equal(r.client.state, 'offline');
  win.fire('online');
  await r.clock.advance(0);
  assert.equal(pending.length, 2, 'online: a new open at once');
  // Offline and back while that open still awaits its token: it goes on, alone.
  win.fire('offline');
  win.fire('online');
  await r.clock.advance(0);
  pending[1](token('u'));
  await r.clock.advance(0);
  assert.equal(pending.length, 2);
  assert.equal(r.sockets.length, 1);
  r.sockets[0].welcome(0);
  assert.equal(r.client.state, 'open');
  r.client.close();
});

test('after a sleep (timers late), waking checks at once: a ping on a WebSocket, the clock on an event stream', async () => {
  const win = fakeWindow();
  const r = setup({ window: win });
  const a = await open(r);
  a.event(1);
  win.hide();
  r.clock.sleep(10 * 60000);
  win.show();
  assert.equal(a.pings(), 1, 'a ping at once, before any late timer');
  a.receive({ type: 'pong' });
  await r.clock.advance(0);
  assert.equal(r.client.state, 'open', 'the pong answered it');
  r.client.close();

  const clock = new FakeClock();
  const { fetch, streams } = fakeEventStreams();
  const sseWin = fakeWindow();
  const client = new AgentcastClient({
    url: 'ws://a.test/ws',
    transport: 'sse',
    fetch,
    token: token('u'),
    storage: null,
    clock,
    window: sseWin,
  });
  client.connect();
  await clock.advance(0);
  streams[0].welcome(0);
  streams[0].event(1);
  await clock.advance(0);
  clock.sleep(STALL_TIMEOUT_MS - 1);
  sseWin.show();
  assert.equal(client.state, 'open', 'not yet quiet for the stall timeout');
  clock.sleep(1);
  sseWin.show();
  assert.equal(client.state, 'stalled', 'quiet for the stall timeout: stalled at once');
  await clock.advance(0);
  assert.equal(streams.length, 2);
  assert.match(streams[1].url, /last_seq=1&epoch=7$/);
  client.close();
});
