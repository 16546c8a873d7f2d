// The stall watchdog against real nodes, with real timers and a short stall
// timeout: a real node's `pong` keeps an idle WebSocket open, and a
// connection made half-open (a TCP relay that stops forwarding both ways,
// with no FIN or RST, as a sleeping laptop's) is found within the stall
// timeout and resumed on the other node with nothing lost or repeated.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { AgentcastClient } from '../agentcast.js';
import { NatsServer, Node, eventually, publish, relay, sleep, thinking, token } from '../testlib/harness.js';

/** Short, so the test waits seconds: the client pings after 1 s of quiet. */
const STALL_MS = 2000;
/** Time allowed past the stall timeout for the close and the state report. */
const DETECT_SLACK_MS = 1000;

test('real nodes: pongs keep an idle socket open; a half-open one is found within the stall timeout and resumed', async () => {
  const nats = await NatsServer.start();
  const nodes = [];
  let path;
  let client;
  try {
    nodes.push(await Node.start(nats), await Node.start(nats));
    const [a, b] = nodes;
    path = await relay(a.addr);
    client = new AgentcastClient({
      url: [`ws://${path.addr}/ws`, b.url],
      token: () => token('stall-a'),
      storage: null,
      stallTimeout: STALL_MS,
    });
    const seqs = [];
    const states = [];
    const welcomes = [];
    client.on('*', (_e, seq) => seqs.push(seq));
    client.onState((s, info) => states.push({ s, at: Date.now(), ...info }));
    client.onWelcome((w) => welcomes.push(w));
    client.connect();
    await eventually('welcome', () => welcomes.length >= 1);
    const first = await publish(nats, 'stall-a', thinking(5));
    await eventually('5 events', () => seqs.length >= 5);

    // Idle for twice the stall timeout: the node answers each ping.
    await sleep(2 * STALL_MS);
    assert.deepEqual(
      states.map((s) => s.s),
      ['connecting', 'open'],
      'an idle but live socket is not stalled',
    );

    const frozenAt = Date.now();
    path.freeze();
    const missed = await publish(nats, 'stall-a', thinking(5, 5));
    await eventually('stalled', () => states.some((s) => s.s === 'stalled'), STALL_MS + DETECT_SLACK_MS + 2000);
    const stalled = states.find((s) => s.s === 'stalled');
    assert.ok(
      stalled.at - frozenAt <= STALL_MS + DETECT_SLACK_MS,
      `found ${stalled.at - frozenAt} ms after the freeze (stall timeout ${STALL_MS} ms)`,
    );
    assert.equal(stalled.url, `ws://${path.addr}/ws`);
    await eventually('welcome on the other node', () => welcomes.length >= 2);
    assert.equal(states.at(-1).url, b.url);
    const more = await publish(nats, 'stall-a', thinking(3, 10));
    await eventually('13 events', () => seqs.length >= 13);
    await sleep(200);
    assert.deepEqual(seqs, [...first, ...missed, ...more]);
    assert.equal(client.duplicates, 0);
    assert.equal(client.reconnects, 1);
  } finally {
    client?.close();
    path?.close();
    for (const n of nodes) await n.kill();
    await nats.stop();
  }
});
