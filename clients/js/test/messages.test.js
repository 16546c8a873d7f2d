// Streamed text (docs/publishing.md §10): the assembler on its own, with
// frames as a node sends them merged or not, and the client against a real
// node: live deltas and a replay from a position before the message.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { AgentcastClient, MAX_MESSAGES, Messages } from '../agentcast.js';
import { NatsServer, Node, eventually, publish, token } from '../testlib/harness.js';

const delta = (messageId, d, type = 'message_delta') => ({ type, run_id: 'r1', message_id: messageId, delta: d, data: {} });

test('merged and unmerged frames assemble the same text; other events are not messages', () => {
  const one = new Messages();
  const merged = new Messages();
  for (const d of ['Hel', 'lo, ', 'wor', 'ld']) one.add(delta('m1', d));
  // The same four deltas as a node merges them: two frames.
  merged.add(delta('m1', 'Hello, '));
  const last = merged.add(delta('m1', 'world'));
  assert.deepEqual(last, { messageId: 'm1', delta: 'world', text: 'Hello, world' });
  assert.equal(one.text('m1'), 'Hello, world');
  assert.equal(merged.text('m1'), 'Hello, world');
  assert.equal(one.add({ type: 'agent_thinking', data: { text: 'x' } }), null);
  assert.equal(one.add({ type: 'message_delta', message_id: '', delta: 'x' }), null);
  assert.equal(one.add({ type: 'message_delta', message_id: 'm2' }), null);
  // Interleaved messages keep apart.
  one.add(delta('m2', 'a'));
  one.add(delta('m1', '!'));
  one.add(delta('m2', 'b'));
  assert.deepEqual([one.text('m1'), one.text('m2')], ['Hello, world!', 'ab']);
});

test('past MAX_MESSAGES the message with the oldest delta is forgotten', () => {
  const m = new Messages(3);
  for (const id of ['a', 'b', 'c']) m.add(delta(id, id));
  m.add(delta('a', 'A')); // a is now the newest
  m.add(delta('d', 'd')); // b goes
  assert.deepEqual(['a', 'b', 'c', 'd'].map((id) => m.text(id)), ['aA', undefined, 'c', 'd']);
  assert.ok(MAX_MESSAGES >= 16);
});

test('the client hands each delta frame with the text so far, live and rebuilt from a replay', async () => {
  const nats = await NatsServer.start();
  const node = await Node.start(nats, []);
  const clients = [];
  try {
    const live = new AgentcastClient({ url: node.url, token: token('alice'), storage: null });
    clients.push(live);
    const seen = [];
    live.onMessage((m) => seen.push(m));
    let welcomed = false;
    live.onWelcome(() => (welcomed = true));
    live.connect();
    await eventually('welcome', () => welcomed);
    const pieces = Array.from({ length: 40 }, (_, i) => `w${i} `);
    const events = [
      { type: 'agent_started', run_id: 'r1', data: { input: 'q' } },
      ...pieces.map((p) => delta('r1-answer', p)),
      { type: 'agent_thinking', run_id: 'r1', data: { text: 'not a delta' } },
      delta('r1-thought', 'hmm', 'agent_thinking'),
      { type: 'agent_completed', run_id: 'r1', data: { output: 'done' } },
    ];
    const seqs = await publish(nats, 'alice', events);
    const text = pieces.join('');
    await eventually('the live text', () => live.messages.text('r1-answer') === text);
    assert.equal(seen.at(-1).messageId, 'r1-thought');
    assert.equal(seen.at(-1).type, 'agent_thinking');
    const answer = seen.filter((m) => m.messageId === 'r1-answer');
    assert.equal(answer.map((m) => m.delta).join(''), text);
    assert.equal(answer.at(-1).text, text);
    assert.equal(answer.reduce((n, m) => n + m.merged, 0), pieces.length);
    for (const m of answer) assert.equal(m.seq - m.firstSeq + 1, m.merged);

    // A second device joins the run in progress: from just before its
    // agent_started, the replay rebuilds the text so far.
    const joined = new AgentcastClient({ url: node.url, token: token('alice'), storage: null, lastSeq: seqs[0] - 1 });
    clients.push(joined);
    const texts = [];
    joined.onMessage((m) => texts.push(m.text));
    joined.connect();
    await eventually('the replayed text', () => joined.messages.text('r1-answer') === text);
    assert.ok(texts.includes(text));
    assert.equal(joined.messages.text('r1-thought'), 'hmm');
  } finally {
    for (const c of clients) c.close();
    await node.kill();
    await nats.stop();
  }
});
