// Positions the client may hold and send: safe non-negative integers and
// decimal epochs. These need no node.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';

import { AgentcastClient, RESUME_FAILURES_BEFORE_PROBE, isEpoch, isPosition } from '../agentcast.js';
import { eventually, token } from '../testlib/harness.js';

test('only safe non-negative integers are positions, only decimal strings epochs', () => {
  for (const ok of [0, 1, Number.MAX_SAFE_INTEGER]) assert.ok(isPosition(ok), String(ok));
  for (const bad of [-1, 1.5, 2 ** 53, 18446744073709552000, '5', null, undefined, NaN]) {
    assert.ok(!isPosition(bad), String(bad));
  }
  for (const ok of ['1', '1795500000123456789']) assert.ok(isEpoch(ok), ok);
  for (const bad of ['', 'abc', '1e5', '-1', ' 1', '1'.repeat(21), 1795500000123456789, null]) {
    assert.ok(!isEpoch(bad), String(bad));
  }
});

test('a position or epoch given in the options that the client could not send is refused', () => {
  const base = { url: 'ws://127.0.0.1:1/ws', token: 't', storage: null, WebSocket: class {} };
  assert.throws(() => new AgentcastClient({ ...base, lastSeq: 18446744073709552000 }), TypeError);
  assert.throws(() => new AgentcastClient({ ...base, lastSeq: -1 }), TypeError);
  assert.throws(() => new AgentcastClient({ ...base, lastSeq: 5, epoch: 'x' }), TypeError);
  assert.equal(new AgentcastClient({ ...base, lastSeq: 5, epoch: '17' }).lastSeq, 5);
});

test('when the plain open fails too (nodes down), the position is kept and tried again', async () => {
  // A port nothing listens on (taken, then freed): every open is refused.
  const server = createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  await new Promise((r) => server.close(r));
  const urls = [];
  class Recording extends WebSocket {
    constructor(url) {
      urls.push(url);
      super(url);
    }
  }
  const client = new AgentcastClient({
    url: `ws://127.0.0.1:${port}/ws`,
    token: token('pat'),
    storage: null,
    lastSeq: 7,
    epoch: '17',
    backoffBase: 5,
    backoffMax: 20,
    WebSocket: Recording,
  });
  const n = 2 * (RESUME_FAILURES_BEFORE_PROBE + 1);
  try {
    client.connect();
    await eventually(`${n} opens`, () => urls.length >= n);
  } finally {
    client.close();
  }
  const sent = urls.slice(0, n).map((u) => new URL(u).searchParams.get('last_seq'));
  const round = [...Array(RESUME_FAILURES_BEFORE_PROBE).fill('7'), null];
  assert.deepEqual(sent, [...round, ...round]);
  assert.equal(client.lastSeq, 7);
  assert.equal(client.epoch, '17');
});
