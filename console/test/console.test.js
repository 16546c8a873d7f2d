// The console page end to end: real nats-server, real agentcast processes,
// Debian's Chromium driven by playwright-core. tests/console.rs runs this
// with AGENTCAST_BIN and AGENTCAST_TEST_NATS_SERVER set; a missing Chromium
// or playwright-core fails, it does not skip.
//
// Every assertion on what the page shows reads the DOM: each event is an
// element with data-seq, so "no missing or repeated event" is the list of
// data-seq values equal to the list of published sequences.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { NatsServer, Node, eventually, publish, relay, sleep, token } from '../../clients/js/testlib/harness.js';
import { PROBE_TIMEOUT_MS } from '../../clients/js/agentcast.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.AGENTCAST_TEST_CHROMIUM ?? '/usr/bin/chromium';
const AGENTCAST_BIN = process.env.AGENTCAST_BIN ?? 'agentcast';
/** Where the screenshot under a real agent run is kept (a CI artifact). */
const SCREENSHOT =
  process.env.AGENTCAST_CONSOLE_SCREENSHOT ?? resolve(HERE, '../../target/console-screenshot.png');
/**
 * How long the page may take to show something. A reconnect after a killed
 * node backs off up to the client's 5 s ceiling, plus the new node's start.
 */
const PAGE_TIMEOUT_MS = 20000;
/** `agentcast dev --demo` publishes a run every 5 s; two runs fit in this. */
const DEMO_TIMEOUT_MS = 30000;
/**
 * Issue 22: after the browser says `online`, the reconnect starts within a
 * second (no backoff was spent while offline); after the page becomes
 * visible, the check (a `ping`) goes out within a second, not at the stall
 * timeout (30 s by default).
 */
const WAKE_WITHIN_MS = 1000;
/** How long the page stays offline or hidden: longer than a redraw of "last event … ago" (1 s). */
const AWAY_MS = 1500;
/** The stall timeout of the client on a slow link: short, so the backlog takes several of them. */
const SLOW_STALL_MS = 1000;
/** Events stored before the slow client connects, about 300 bytes each as frames. */
const BACKLOG_EVENTS = 600;
/** The slow link's rate from node to page: the backlog (~180 KB) takes about 4.5 s, over four stall timeouts. */
const SLOW_BYTES_PER_S = 40000;
/** Time allowed past the probe timeout for the stall to be reported. */
const STALL_SLACK_MS = 1000;
/** Chromium flags for this machine (no GPU, no sandbox as root, no network beyond loopback). */
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

let nats;
let browser;

before(async () => {
  nats = await NatsServer.start();
  // playwright-core gives every launch a fresh, empty user data directory.
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
});

after(async () => {
  await browser?.close();
  await nats?.stop();
});

/** A page in a fresh context (its own sessionStorage) that records page errors and CSP reports. */
async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const page = await context.newPage();
  page.problems = [];
  page.on('pageerror', (e) => page.problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (/Content.Security.Policy|Refused to/i.test(m.text())) page.problems.push(`CSP: ${m.text()}`);
  });
  return page;
}

const seqsShown = (page) => page.$$eval('li[data-seq]', (els) => els.map((e) => Number(e.dataset.seq)));
const sorted = (xs) => [...xs].sort((a, b) => a - b);
const text = (page, sel) => page.$eval(sel, (e) => e.textContent);

/** Waits until the page shows exactly `n` events, then returns their seqs in seq order. */
async function waitForEvents(page, n) {
  await eventually(`${n} events on the page`, async () => (await seqsShown(page)).length >= n, PAGE_TIMEOUT_MS);
  return sorted(await seqsShown(page));
}

async function waitForState(page, state) {
  await page.waitForSelector(`#state[data-state="${state}"]`, { timeout: PAGE_TIMEOUT_MS });
}

function run(id, steps) {
  const all = {
    started: { type: 'agent_started', run_id: id, data: { input: `question for ${id}` } },
    thinking: { type: 'agent_thinking', run_id: id, data: { text: 'I should look it up.' } },
    tool: { type: 'tool_executing', run_id: id, data: { tool: 'search', args: { q: id } } },
    tool_done: { type: 'tool_completed', run_id: id, data: { tool: 'search', result: { hits: 3 } } },
    completed: { type: 'agent_completed', run_id: id, data: { output: `answer for ${id}` } },
  };
  return steps.map((s) => all[s]);
}

test('the page shows published events grouped by run, with the node and position', async () => {
  const node = await Node.start(nats, ['--console', '--node-id', 'node-a']);
  const page = await newPage();
  try {
    await page.goto(`http://${node.addr}/console/#token=${token('shows')}`);
    await waitForState(page, 'open');
    assert.equal(await text(page, '#state'), 'live');
    assert.equal(await text(page, '#since'), 'none yet');
    assert.equal(await text(page, '#node'), 'node-a');
    assert.equal(await text(page, '#user'), 'shows');
    assert.ok(!page.url().includes('token'), `the token stayed in the address bar: ${page.url()}`);
    assert.equal(await page.isVisible('#login'), false, 'the token form is shown although a token was given');

    const seqs = [
      ...(await publish(nats, 'shows', run('r1', ['started', 'thinking', 'tool', 'tool_done', 'completed']))),
      ...(await publish(nats, 'shows', run('r2', ['started']))),
    ];
    assert.deepEqual(await waitForEvents(page, 6), seqs);
    const types = await page.$$eval('section.run[data-run="r1"] li', (els) => els.map((e) => e.dataset.type));
    assert.deepEqual(types, ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_completed']);
    assert.equal(await page.$eval('section.run[data-run="r1"]', (e) => e.dataset.status), 'completed');
    assert.equal(await page.$eval('section.run[data-run="r2"]', (e) => e.dataset.status), 'running');
    // The run that moved last is on top.
    assert.deepEqual(await page.$$eval('section.run', (els) => els.map((e) => e.dataset.run)), ['r2', 'r1']);
    assert.equal(await text(page, '#position'), String(seqs.at(-1)));
    assert.equal(await text(page, '#count'), '6');
    assert.match(await text(page, '#since'), /^\d+ s ago$/);
    assert.match(await text(page, 'section.run[data-run="r1"] li[data-type="tool_executing"] .text'), /search\(\{"q":"r1"\}\)/);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await node.kill();
  }
});

test('without a token the page asks for one, and connects with the one given', async () => {
  const node = await Node.start(nats, ['--console', '--node-id', 'node-f']);
  const page = await newPage();
  try {
    await page.goto(`http://${node.addr}/console/`);
    assert.equal(await page.isVisible('#login'), true);
    assert.equal(await text(page, '#state'), 'no token');
    await page.fill('#token-input', token('typed'));
    await page.click('#login button');
    await waitForState(page, 'open');
    assert.equal(await page.isVisible('#login'), false);
    assert.equal(await text(page, '#node'), 'node-f');
    assert.equal(await text(page, '#user'), 'typed');
    const seqs = await publish(nats, 'typed', run('f1', ['started']));
    assert.deepEqual(await waitForEvents(page, 1), seqs);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await node.kill();
  }
});

for (const transport of ['auto', 'sse']) {
  test(`a node killed and replaced on the same port: the page goes on with no missing or repeated event (${transport})`, async () => {
    const a = await Node.start(nats, ['--console', '--node-id', 'node-a']);
    const port = a.addr.split(':').at(-1);
    const page = await newPage();
    const user = `takeover-${transport}`;
    let b;
    try {
      await page.goto(`http://${a.addr}/console/#token=${token(user)}&transport=${transport}`);
      await waitForState(page, 'open');
      // auto uses the WebSocket where it opens.
      const carried = transport === 'sse' ? 'sse' : 'websocket';
      assert.equal(await page.$eval('#state', (e) => e.dataset.transport), carried);
      const seqs = await publish(nats, user, run('t1', ['started', 'thinking']));
      assert.deepEqual(await waitForEvents(page, 2), seqs);

      await a.kill('SIGKILL');
      await page.waitForSelector('#state:not([data-state="open"])', { timeout: PAGE_TIMEOUT_MS });
      // Published while no node serves the page: stored, read on resume.
      seqs.push(...(await publish(nats, user, run('t1', ['tool', 'tool_done']))));
      b = await Node.start(nats, ['--console', '--node-id', 'node-b', '--listen', `127.0.0.1:${port}`]);
      await page.waitForFunction(() => document.getElementById('node').textContent === 'node-b', null, {
        timeout: PAGE_TIMEOUT_MS,
      });
      seqs.push(...(await publish(nats, user, run('t1', ['completed']))));
      seqs.push(...(await publish(nats, user, run('t2', ['started', 'thinking']))));
      assert.deepEqual(await waitForEvents(page, 7), seqs);
      // Nothing late: a repeat would arrive after the last event.
      await new Promise((r) => setTimeout(r, 500));
      assert.deepEqual(await seqsShown(page).then(sorted), seqs);
      assert.equal((await seqsShown(page)).length, 7);
      assert.equal(await page.$eval('section.run[data-run="t1"]', (e) => e.dataset.status), 'completed');
      assert.equal(await text(page, '#state'), 'live');
      assert.equal(await page.$eval('#state', (e) => e.dataset.transport), carried);
      assert.deepEqual(page.problems, []);
    } finally {
      await page.context().close();
      await a.kill();
      await b?.kill();
    }
  });
}

/** The number in "N s ago". */
const secondsAgo = async (page) => Number(/^(\d+) s ago$/.exec(await text(page, '#since'))?.[1]);

for (const transport of ['auto', 'sse']) {
  test(`offline mid-stream, then online: the page says offline, reconnects within a second and shows every event once (${transport})`, async () => {
    const node = await Node.start(nats, ['--console']);
    const page = await newPage();
    const user = `offline-${transport}`;
    // When each connection attempt started (a WebSocket or an event-stream
    // request), on this process's clock.
    const attempts = [];
    page.on('websocket', () => attempts.push(Date.now()));
    page.on('request', (r) => {
      if (new URL(r.url()).pathname === '/sse') attempts.push(Date.now());
    });
    try {
      await page.goto(`http://${node.addr}/console/#token=${token(user)}&transport=${transport}`);
      await waitForState(page, 'open');
      const seqs = await publish(nats, user, run('o1', ['started', 'thinking']));
      assert.deepEqual(await waitForEvents(page, 2), seqs);

      // DevTools network emulation: the browser fires `offline` and no
      // request or socket gets through.
      await page.context().setOffline(true);
      await waitForState(page, 'offline');
      assert.equal(await text(page, '#state'), 'offline: waiting for the network');
      const tried = attempts.length;
      // Published while the page is offline: stored, read on resume.
      seqs.push(...(await publish(nats, user, run('o1', ['tool', 'tool_done']))));
      // The time since the last event goes on counting while nothing comes.
      const ago = await secondsAgo(page);
      await sleep(AWAY_MS);
      assert.ok((await secondsAgo(page)) > ago, `"last event" stayed at ${ago} s`);
      assert.equal(attempts.length, tried, 'attempts were made while offline');
      assert.equal(await page.$eval('#state', (e) => e.dataset.state), 'offline');

      const onlineAt = Date.now();
      await page.context().setOffline(false);
      await eventually('an attempt after online', () => attempts.length > tried, PAGE_TIMEOUT_MS);
      const took = attempts[tried] - onlineAt;
      assert.ok(took < WAKE_WITHIN_MS, `the reconnect started ${took} ms after online`);
      await waitForState(page, 'open');
      seqs.push(...(await publish(nats, user, run('o1', ['completed']))));
      assert.deepEqual(await waitForEvents(page, 5), seqs);
      // Nothing late: a repeat would arrive after the last event.
      await sleep(500);
      assert.deepEqual(await seqsShown(page).then(sorted), seqs);
      assert.equal((await seqsShown(page)).length, 5);
      assert.equal(await text(page, '#state'), 'live');
      assert.deepEqual(page.problems, []);
    } finally {
      await page.context().close();
      await node.kill();
    }
  });
}

/**
 * Headless Chromium keeps every page visible (switching tabs does not hide
 * one, and DevTools has no visibility override), so the page's
 * document.visibilityState is overridden and `visibilitychange` dispatched,
 * which is what the browser does when a tab is hidden or shown.
 */
async function setVisibility(page, state) {
  await page.evaluate((v) => {
    Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => v });
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => v === 'hidden' });
    document.dispatchEvent(new Event('visibilitychange'));
  }, state);
}

test('a tab shown again checks its connection at once with a ping, and stays live when the node answers', async () => {
  const node = await Node.start(nats, ['--console']);
  const page = await newPage();
  const type = (payload) => {
    try {
      return JSON.parse(payload).type;
    } catch {
      return null;
    }
  };
  const pings = [];
  const pongs = [];
  let sockets = 0;
  page.on('websocket', (ws) => {
    sockets += 1;
    ws.on('framesent', (f) => type(f.payload) === 'ping' && pings.push(Date.now()));
    ws.on('framereceived', (f) => type(f.payload) === 'pong' && pongs.push(Date.now()));
  });
  try {
    await page.goto(`http://${node.addr}/console/#token=${token('visible')}`);
    await waitForState(page, 'open');
    const seqs = await publish(nats, 'visible', run('v1', ['started']));
    assert.deepEqual(await waitForEvents(page, 1), seqs);

    await setVisibility(page, 'hidden');
    await sleep(AWAY_MS);
    // Far from the stall timeout's ping (25 s of quiet), and hiding checks nothing.
    assert.deepEqual(pings, []);
    const shownAt = Date.now();
    await setVisibility(page, 'visible');
    await eventually('a ping after the page became visible', () => pings.length > 0, PAGE_TIMEOUT_MS);
    const took = pings[0] - shownAt;
    assert.ok(took < WAKE_WITHIN_MS, `the ping went ${took} ms after the page became visible`);
    await eventually("the node's pong", () => pongs.length > 0, PAGE_TIMEOUT_MS);
    // The connection passed the check: the same socket goes on.
    seqs.push(...(await publish(nats, 'visible', run('v1', ['completed']))));
    assert.deepEqual(await waitForEvents(page, 2), seqs);
    assert.equal(await text(page, '#state'), 'live');
    assert.equal(sockets, 1, 'the page reconnected');
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await node.kill();
  }
});

test('a slow but live connection receiving a large backlog is not declared stalled', async () => {
  const node = await Node.start(nats, ['--console']);
  const path = await relay(node.addr);
  const page = await newPage();
  const user = 'slow-backlog';
  try {
    const filler = 'x'.repeat(200);
    const backlog = Array.from({ length: BACKLOG_EVENTS }, (_, i) => ({
      type: 'agent_thinking',
      run_id: 'b1',
      data: { text: `${i} ${filler}` },
    }));
    const seqs = await publish(nats, user, backlog);
    // The page through the relay, so its socket is same-origin (the CSP).
    await page.goto(`http://${path.addr}/console/`);
    path.slow(SLOW_BYTES_PER_S);
    const started = Date.now();
    await page.evaluate(
      async ({ t, stallTimeout }) => {
        const { AgentcastClient } = await import('/console/agentcast.js');
        window.got = { seqs: [], states: [] };
        const client = new AgentcastClient({
          url: `ws://${location.host}/ws`,
          token: t,
          storage: null,
          lastSeq: 0,
          stallTimeout,
        });
        client.on('*', (_e, seq) => window.got.seqs.push(seq));
        client.onState((s) => window.got.states.push(s));
        client.connect();
      },
      { t: token(user), stallTimeout: SLOW_STALL_MS },
    );
    await eventually(
      'the whole backlog',
      () => page.evaluate((n) => window.got.seqs.length >= n, BACKLOG_EVENTS),
      PAGE_TIMEOUT_MS,
    ).catch(async (e) => {
      throw new Error(`${e.message}: states ${JSON.stringify(await page.evaluate(() => window.got.states))}`);
    });
    const took = Date.now() - started;
    assert.ok(took > 3 * SLOW_STALL_MS, `the backlog came in ${took} ms: not slow enough to show anything`);
    // Quiet after the backlog: the client pings, the node answers, the socket stays.
    await sleep(2 * SLOW_STALL_MS);
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got.seqs, seqs, 'every event once, in order');
    assert.deepEqual(got.states, ['connecting', 'open'], 'a stall or a reconnect');
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    path.close();
    await node.kill();
  }
});

test('a tab shown again after its connection went half-open says stalled and resumes at once, every event once', async () => {
  const node = await Node.start(nats, ['--console']);
  const path = await relay(node.addr);
  const page = await newPage();
  const user = 'half-open';
  const pings = [];
  let sockets = 0;
  page.on('websocket', (ws) => {
    sockets += 1;
    ws.on('framesent', (f) => f.payload === '{"type":"ping"}' && pings.push(Date.now()));
  });
  try {
    // Through the relay, so the page's socket can be made half-open.
    await page.goto(`http://${path.addr}/console/#token=${token(user)}`);
    await waitForState(page, 'open');
    const seqs = await publish(nats, user, run('h1', ['started', 'thinking']));
    assert.deepEqual(await waitForEvents(page, 2), seqs);
    // Every text the state shows, each change as it is made (a stall is
    // followed by the reconnect in the next task).
    await page.evaluate(() => {
      window.stateTexts = [];
      new MutationObserver((records) => {
        for (const r of records) for (const n of r.addedNodes) window.stateTexts.push(n.textContent);
      }).observe(document.getElementById('state'), { childList: true });
    });

    await setVisibility(page, 'hidden');
    path.freeze();
    // Stored, and sent by the node into the dead connection.
    seqs.push(...(await publish(nats, user, run('h1', ['tool', 'tool_done']))));
    await sleep(AWAY_MS);
    assert.deepEqual(pings, []);
    const shownAt = Date.now();
    await setVisibility(page, 'visible');
    await eventually('a ping after the page became visible', () => pings.length > 0, PAGE_TIMEOUT_MS);
    assert.ok(pings[0] - shownAt < WAKE_WITHIN_MS, `the ping went ${pings[0] - shownAt} ms after the page became visible`);
    // No answer within the probe time: stalled, and a new connection at once.
    await eventually(
      'the stall shown',
      () => page.evaluate(() => window.stateTexts.some((t) => t.startsWith('stalled'))),
      PAGE_TIMEOUT_MS,
    );
    const stalledAfter = Date.now() - shownAt;
    assert.ok(stalledAfter < PROBE_TIMEOUT_MS + STALL_SLACK_MS, `the stall was found ${stalledAfter} ms after showing`);
    await page.waitForFunction(() => document.getElementById('state').textContent === 'live', null, {
      timeout: PAGE_TIMEOUT_MS,
    });
    seqs.push(...(await publish(nats, user, run('h1', ['completed']))));
    assert.deepEqual(await waitForEvents(page, 5), seqs);
    await sleep(500);
    assert.equal((await seqsShown(page)).length, 5);
    assert.equal(sockets, 2);
    const texts = await page.evaluate(() => window.stateTexts);
    const stalled = texts.findIndex((t) => /^stalled: nothing received for \d+ s$/.test(t));
    assert.ok(stalled >= 0, JSON.stringify(texts));
    assert.match(texts[stalled + 1], /^reconnecting… \(stalled: nothing received for \d+ s\)$/);
    assert.equal(texts.at(-1), 'live');
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    path.close();
    await node.kill();
  }
});

test("the browser's own EventSource resumes exactly across a node restart (Last-Event-ID)", async () => {
  const a = await Node.start(nats, ['--console', '--node-id', 'node-a']);
  const port = a.addr.split(':').at(-1);
  const page = await newPage();
  let b;
  try {
    // Any page of the node's origin; the stream is opened by the page's script.
    await page.goto(`http://${a.addr}/console/`);
    await page.evaluate((t) => {
      window.got = { seqs: [], ids: [], welcomes: 0 };
      const es = new EventSource(`/sse?token=${t}`);
      es.addEventListener('welcome', () => (window.got.welcomes += 1));
      es.addEventListener('event', (m) => {
        window.got.seqs.push(JSON.parse(m.data).seq);
        window.got.ids.push(m.lastEventId);
      });
    }, token('es-user'));
    await eventually('the welcome', () => page.evaluate(() => window.got.welcomes === 1), PAGE_TIMEOUT_MS);
    const seqs = await publish(nats, 'es-user', run('e1', ['started', 'thinking']));
    await eventually('2 events', () => page.evaluate(() => window.got.seqs.length >= 2), PAGE_TIMEOUT_MS);

    await a.kill('SIGKILL');
    // Stored while no node serves the stream; EventSource retries on its own
    // and sends the last id it saw.
    seqs.push(...(await publish(nats, 'es-user', run('e1', ['tool', 'tool_done']))));
    b = await Node.start(nats, ['--console', '--node-id', 'node-b', '--listen', `127.0.0.1:${port}`]);
    await eventually('the second welcome', () => page.evaluate(() => window.got.welcomes === 2), PAGE_TIMEOUT_MS);
    seqs.push(...(await publish(nats, 'es-user', run('e1', ['completed']))));
    await eventually('5 events', () => page.evaluate(() => window.got.seqs.length >= 5), PAGE_TIMEOUT_MS);
    await new Promise((r) => setTimeout(r, 500));
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got.seqs, seqs, 'every event once, in order');
    assert.ok(got.ids.every((id, i) => id.endsWith(`:${seqs[i]}`)), `${got.ids}`);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await a.kill();
    await b?.kill();
  }
});

test('the JavaScript client on auto, its WebSocket blocked, resumes exactly over SSE across a node restart', async () => {
  const a = await Node.start(nats, ['--console', '--node-id', 'node-a']);
  const port = a.addr.split(':').at(-1);
  const page = await newPage();
  let b;
  try {
    await page.goto(`http://${a.addr}/console/`);
    // The WebSocket URL leads nowhere, as through a proxy that drops
    // upgrades; plain HTTP to the node works.
    await page.evaluate(async (t) => {
      const { AgentcastClient } = await import('/console/agentcast.js');
      window.got = { seqs: [], transports: [] };
      const client = new AgentcastClient({
        url: 'ws://127.0.0.1:9/ws',
        sseUrls: [`${location.origin}/sse`],
        transport: 'auto',
        token: () => t,
        storage: null,
        backoffBase: 20,
        backoffMax: 200,
      });
      client.on('*', (_e, seq) => window.got.seqs.push(seq));
      window.got.states = [];
      window.got.welcomes = [];
      window.got.errors = [];
      client.onWelcome((w) => window.got.welcomes.push(w));
      client.onError((e) => window.got.errors.push(String(e && e.message)));
      client.onState((s, info) => {
        window.got.states.push(`${s}:${info.code ?? ''}:${info.reason ?? info.error ?? ''}`);
        if (s === 'open') window.got.transports.push(info.transport);
      });
      client.connect();
    }, token('auto-user'));
    await eventually('open over SSE', () => page.evaluate(() => window.got.transports.length === 1), PAGE_TIMEOUT_MS);
    const seqs = await publish(nats, 'auto-user', run('a1', ['started', 'thinking']));
    await eventually('2 events', () => page.evaluate(() => window.got.seqs.length >= 2), PAGE_TIMEOUT_MS);
    await a.kill('SIGKILL');
    seqs.push(...(await publish(nats, 'auto-user', run('a1', ['tool', 'tool_done']))));
    b = await Node.start(nats, ['--console', '--node-id', 'node-b', '--listen', `127.0.0.1:${port}`]);
    seqs.push(...(await publish(nats, 'auto-user', run('a1', ['completed']))));
    await eventually('5 events', () => page.evaluate(() => window.got.seqs.length >= 5), PAGE_TIMEOUT_MS).catch(
      async (e) => {
        throw new Error(`${e.message}: ${JSON.stringify(await page.evaluate(() => window.got))}`);
      },
    );
    await new Promise((r) => setTimeout(r, 500));
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got.seqs, seqs, 'every event once, in order');
    assert.ok(got.transports.length >= 2 && got.transports.every((t) => t === 'sse'), `${got.transports}`);
    assert.deepEqual(got.errors, []);
    // The page's CSP refuses the dead WebSocket URL: that is the blocking.
    assert.deepEqual(
      page.problems.filter((p) => !p.includes("Connecting to 'ws://127.0.0.1:9/ws")),
      [],
    );
  } finally {
    await page.context().close();
    await a.kill();
    await b?.kill();
  }
});

test('a node on a new stream behind the same port: the page says so and shows only the new stream', async () => {
  const a = await Node.start(nats, ['--console', '--node-id', 'node-a']);
  const port = a.addr.split(':').at(-1);
  const page = await newPage();
  const other = await NatsServer.start();
  let b;
  try {
    await page.goto(`http://${a.addr}/console/#token=${token('reset')}`);
    await waitForState(page, 'open');
    const oldEpoch = await text(page, '#epoch');
    const old = await publish(nats, 'reset', run('old', ['started', 'thinking']));
    assert.deepEqual(await waitForEvents(page, 2), old);
    await a.kill('SIGKILL');
    // Another NATS, so another stream (another epoch), whose seqs start at 1
    // again and overlap the ones shown.
    b = await Node.start(other, ['--console', '--node-id', 'node-b', '--listen', `127.0.0.1:${port}`]);
    const fresh = await publish(other, 'reset', run('new', ['started']));
    await page.waitForSelector('p.gap[data-reason="stream_reset"]', { timeout: PAGE_TIMEOUT_MS });
    assert.deepEqual(await waitForEvents(page, 1), fresh);
    assert.deepEqual(await page.$$eval('section.run', (els) => els.map((e) => e.dataset.run)), ['new']);
    assert.notEqual(await text(page, '#epoch'), oldEpoch);
    assert.equal(
      await text(page, 'p.gap'),
      'The stream was recreated, so the position this page had no longer exists. What follows is everything the new stream holds.',
    );
    // A reload keeps the new stream's view, not the old one's.
    await page.reload();
    await waitForState(page, 'open');
    assert.deepEqual(sorted(await seqsShown(page)), fresh);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await a.kill();
    await b?.kill();
    await other.stop();
  }
});

test('a reload mid-run resumes after the last event shown and keeps the run', async () => {
  const node = await Node.start(nats, ['--console']);
  const page = await newPage();
  try {
    await page.goto(`http://${node.addr}/console/#token=${token('reload')}`);
    await waitForState(page, 'open');
    const seqs = await publish(nats, 'reload', run('m1', ['started', 'thinking']));
    assert.deepEqual(await waitForEvents(page, 2), seqs);

    // Events published while the page reloads come from the stream on
    // resume: the reloaded page's client is held back until they are stored.
    let stored;
    const published = new Promise((r) => (stored = r));
    await page.route('**/console/agentcast.js', async (route) => {
      await published;
      await route.continue();
    });
    await page.reload({ waitUntil: 'commit' });
    seqs.push(...(await publish(nats, 'reload', run('m1', ['tool', 'tool_done']))));
    stored();
    await waitForState(page, 'open');
    assert.equal(await page.$eval('#position', (e) => e.dataset.resumedFrom), String(seqs[1]));
    seqs.push(...(await publish(nats, 'reload', run('m1', ['completed']))));
    assert.deepEqual(await waitForEvents(page, 5), seqs);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal((await seqsShown(page)).length, 5);
    const types = await page.$$eval('section.run[data-run="m1"] li', (els) => els.map((e) => e.dataset.type));
    assert.deepEqual(types, ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_completed']);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await node.kill();
  }
});

test('streamed text grows in one line of its run, and a reload keeps it and goes on appending', async () => {
  const node = await Node.start(nats, ['--console']);
  const page = await newPage();
  const delta = (d) => ({ type: 'message_delta', run_id: 's1', message_id: 's1-answer', delta: d, data: {} });
  const words = Array.from({ length: 30 }, (_, i) => `word${i} `);
  const line = 'section.run[data-run="s1"] li[data-message="s1-answer"] .text';
  const shown = () => page.$eval(line, (e) => e.textContent).catch(() => null);
  try {
    await page.goto(`http://${node.addr}/console/#token=${token('streams')}`);
    await waitForState(page, 'open');
    await publish(nats, 'streams', run('s1', ['started']));
    let published = [];
    for (const part of [words.slice(0, 10), words.slice(10, 20)]) {
      const seqs = await publish(nats, 'streams', part.map(delta));
      published.push(...part);
      const want = published.join('');
      await eventually(`the text so far (${want.length} chars)`, async () => (await shown()) === want, PAGE_TIMEOUT_MS);
      assert.equal(
        await page.$eval('li[data-message="s1-answer"]', (e) => e.dataset.lastSeq),
        String(seqs.at(-1)),
      );
    }
    // One line for the message, beside the run's other events.
    const types = await page.$$eval('section.run[data-run="s1"] li', (els) => els.map((e) => e.dataset.type));
    assert.deepEqual(types, ['agent_started', 'message_delta']);

    await page.reload();
    await waitForState(page, 'open');
    assert.equal(await shown(), published.join(''), 'the reload lost the text so far');
    await publish(nats, 'streams', words.slice(20).map(delta));
    await publish(nats, 'streams', run('s1', ['completed']));
    await eventually('the whole text', async () => (await shown()) === words.join(''), PAGE_TIMEOUT_MS);
    await page.waitForSelector('section.run[data-run="s1"][data-status="completed"]', { timeout: PAGE_TIMEOUT_MS });
    assert.equal(await page.$$eval('li[data-message]', (els) => els.length), 1);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await node.kill();
  }
});

test('the page keeps the last 500 events and drops a run whose events are all gone', async () => {
  // MAX_KEPT_EVENTS in console/console.js.
  const kept = 500;
  const node = await Node.start(nats, ['--console']);
  const page = await newPage();
  try {
    await page.goto(`http://${node.addr}/console/#token=${token('many')}`);
    await waitForState(page, 'open');
    const first = await publish(nats, 'many', run('x1', ['started', 'thinking', 'completed']));
    const many = Array.from({ length: kept }, (_, i) => ({ type: 'agent_thinking', run_id: 'x2', data: { text: `t${i}` } }));
    const rest = await publish(nats, 'many', many);
    await eventually('the last event shown', async () => (await text(page, '#position')) === String(rest.at(-1)), PAGE_TIMEOUT_MS);
    assert.deepEqual(sorted(await seqsShown(page)), rest);
    assert.equal(await page.$('section.run[data-run="x1"]'), null);
    assert.equal(await text(page, '#count'), String(kept));
    assert.ok(first.at(-1) < rest[0]);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await node.kill();
  }
});

test('a gap is shown in plain words', async () => {
  // A server of its own: the per-user limit is the stream's, set by the
  // first node, and must not apply to the other tests.
  const own = await NatsServer.start();
  const node = await Node.start(own, ['--console', '--stream-max-per-user', '3']);
  const page = await newPage();
  try {
    const url = `http://${node.addr}/console/#token=${token('gappy')}`;
    await page.goto(url);
    await waitForState(page, 'open');
    const first = await publish(own, 'gappy', run('g1', ['started']));
    assert.deepEqual(await waitForEvents(page, 1), first);
    // Leave the page (its sessionStorage stays with the tab), publish more
    // than the stream keeps, and come back.
    await page.goto('about:blank');
    const more = await publish(own, 'gappy', run('g1', ['thinking', 'tool', 'tool_done', 'completed', 'started']));
    await page.goto(`http://${node.addr}/console/`);
    await page.waitForSelector('p.gap', { timeout: PAGE_TIMEOUT_MS });
    const kept = more.slice(-3);
    const expired = more.slice(0, -3);
    assert.deepEqual(await waitForEvents(page, 4), [...first, ...kept]);
    const gap = await page.$eval('p.gap', (e) => ({ ...e.dataset, text: e.textContent }));
    assert.equal(gap.reason, 'expired');
    assert.equal(gap.from, String(expired[0]));
    assert.equal(gap.to, String(expired.at(-1)));
    assert.equal(
      gap.text,
      `Events ${expired[0]} to ${expired.at(-1)} may be missing: the stream removed them (its age, size or per-user limit) before this page could read them.`,
    );
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await node.kill();
    await own.stop();
  }
});

/**
 * Starts `agentcast dev --demo` on `server` and returns it with the console
 * link it prints; `stop()` kills it and waits for its exit.
 */
async function startDev(server) {
  const dev = spawn(AGENTCAST_BIN, ['dev', '--demo', '--listen', '127.0.0.1:0', '--nats-url', server.url], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  dev.stdout.on('data', (d) => (out += d));
  dev.stderr.on('data', (d) => (err += d));
  const stop = async () => {
    dev.kill('SIGKILL');
    await new Promise((r) => (dev.exitCode !== null || dev.signalCode !== null ? r() : dev.once('exit', r)));
  };
  try {
    await eventually('the console link from agentcast dev', () => /console:\s+http/.test(out), PAGE_TIMEOUT_MS);
  } catch (e) {
    await stop();
    throw new Error(`${e.message}\nstdout:\n${out}\nstderr:\n${err}`);
  }
  return { link: /console:\s+(http\S+)/.exec(out)[1], stop };
}

test('agentcast dev prints the console link, and a screenshot is kept of a demo run', async () => {
  const dev = await startDev(nats);
  const page = await newPage();
  try {
    const link = dev.link;
    assert.match(link, /^http:\/\/127\.0\.0\.1:\d+\/console\/#token=[\w-]+\.[\w-]+\.[\w-]+$/);
    await page.goto(link);
    await waitForState(page, 'open');
    assert.equal(await text(page, '#user'), 'dev');
    // A demo run seen from its start to its end.
    await page.waitForSelector('section.run[data-status="completed"] li[data-type="agent_started"]', {
      timeout: DEMO_TIMEOUT_MS,
    });
    const whole = await page.$$eval('section.run[data-status="completed"]', (runs) =>
      runs
        .filter((r) => r.querySelector('li[data-type="agent_started"]'))
        .map((r) => [...r.querySelectorAll('li')].map((e) => e.dataset.type)),
    );
    assert.deepEqual(whole[0], [
      'agent_started',
      'agent_thinking',
      'tool_executing',
      'tool_completed',
      'message_delta',
      'agent_completed',
    ]);
    // The streamed answer is one line holding the whole text: the output.
    const answer = await page.$eval('section.run[data-status="completed"] li[data-type="message_delta"]', (e) => ({
      text: e.querySelector('.text').textContent,
      output: JSON.parse(e.parentElement.querySelector('li[data-type="agent_completed"]').title).data.output,
    }));
    assert.equal(answer.text, answer.output);
    mkdirSync(dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${SCREENSHOT}`);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await dev.stop();
  }
});

/** The event types shown in run `id`, in order. */
const typesOf = (page, id) =>
  page.$$eval(`section.run[data-run="${id}"] li`, (els) => els.map((e) => e.dataset.type));

test('Stop on a demo run in progress cancels it, and nothing of that run follows the cancelled completion', async () => {
  // A server of its own: no other test's agent answers its control requests.
  const own = await NatsServer.start();
  const dev = await startDev(own);
  const page = await newPage();
  try {
    await page.goto(dev.link);
    await waitForState(page, 'open');
    // A run that has just started has four 400 ms steps and a streamed
    // answer left (src/dev.rs);
    // on a loaded machine the click may still land after the run is over,
    // which the agent answers `finished`: then the next run is tried.
    let id;
    for (let attempt = 0; attempt < 3 && !id; attempt += 1) {
      const button = await page.waitForSelector(
        'section.run[data-status="running"]:has(li[data-type="agent_started"]) button.stop:not([hidden])',
        { timeout: DEMO_TIMEOUT_MS },
      );
      const candidate = await button.evaluate((b) => b.closest('section.run').dataset.run);
      // The button goes when the run ends: then this run is missed.
      if (!(await button.click({ timeout: 1000 }).then(() => true, () => false))) continue;
      const answer = `section.run[data-run="${candidate}"] .control`;
      await page.waitForSelector(`${answer}[data-reply], ${answer}[data-code]`, { timeout: PAGE_TIMEOUT_MS });
      const reply = await page.$eval(answer, (e) => ({ ...e.dataset, text: e.textContent }));
      assert.equal(reply.code, undefined, `the Stop request failed: ${reply.text}`);
      if (reply.reply === 'cancelled') id = candidate;
      else assert.equal(reply.reply, 'finished', `the demo agent answered ${reply.text}`);
    }
    assert.ok(id, 'three demo runs ended before their Stop was answered');
    assert.equal(await text(page, `section.run[data-run="${id}"] .control`), 'stop: cancelled');
    await page.waitForSelector(`section.run[data-run="${id}"][data-status="cancelled"]`, { timeout: PAGE_TIMEOUT_MS });
    assert.equal(await text(page, `section.run[data-run="${id}"] .status`), 'cancelled');
    assert.equal(await page.isVisible(`section.run[data-run="${id}"] button.stop`), false, 'Stop is still offered');
    const completed = await page.$eval(`section.run[data-run="${id}"] li[data-type="agent_completed"]`, (e) => ({
      data: JSON.parse(e.title).data,
      seq: Number(e.dataset.seq),
    }));
    assert.deepEqual(completed.data, { status: 'cancelled' });
    // The run's steps up to the Stop, in order, then the cancelled completion.
    const types = await typesOf(page, id);
    const full = ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'message_delta'];
    assert.equal(types.at(-1), 'agent_completed');
    assert.ok(types.length >= 2 && types.length - 1 <= full.length, `${types}`);
    assert.deepEqual(types.slice(0, -1), full.slice(0, types.length - 1));
    // Nothing of it after the completion: wait out more than the rest of
    // the run's steps (3 x 400 ms) and the next run's start (5 s later).
    const next = `demo-${Number(id.replace('demo-', '')) + 1}`;
    await page.waitForSelector(`section.run[data-run="${next}"]`, { timeout: DEMO_TIMEOUT_MS });
    await new Promise((r) => setTimeout(r, 1500));
    assert.deepEqual(await typesOf(page, id), types);
    const last = await page.$$eval(`section.run[data-run="${id}"] li`, (els) => Number(els.at(-1).dataset.seq));
    assert.equal(last, completed.seq);
    // The next run is not stopped by it: it runs to its end.
    await page.waitForSelector(`section.run[data-run="${next}"][data-status="completed"]`, {
      timeout: DEMO_TIMEOUT_MS,
    });
    assert.deepEqual(await typesOf(page, next), [...full, 'agent_completed']);
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await dev.stop();
    await own.stop();
  }
});

test('Stop shows the error code when no agent takes the request, and when control is off', async () => {
  const own = await NatsServer.start();
  const on = await Node.start(own, ['--console']);
  const off = await Node.start(own, ['--console', '--no-control']);
  const page = await newPage();
  try {
    for (const [node, user, code] of [
      [on, 'nobody-listens', 'no_agent'],
      [off, 'control-off', 'disabled'],
    ]) {
      await page.goto(`http://${node.addr}/console/#token=${token(user)}`);
      await waitForState(page, 'open');
      await publish(own, user, run('s1', ['started']));
      const stop = 'section.run[data-run="s1"] button.stop';
      await page.waitForSelector(`${stop}:not([hidden])`, { timeout: PAGE_TIMEOUT_MS });
      await page.click(stop);
      const answer = 'section.run[data-run="s1"] .control';
      await page.waitForSelector(`${answer}[data-code]`, { timeout: PAGE_TIMEOUT_MS });
      assert.equal(await page.$eval(answer, (e) => e.dataset.code), code);
      assert.equal(await text(page, answer), `stop failed: ${code}`);
      // Not taken: the run still runs and Stop is offered again.
      assert.equal(await page.$eval('section.run[data-run="s1"]', (e) => e.dataset.status), 'running');
      assert.equal(await page.isEnabled(stop), true);
    }
    assert.deepEqual(page.problems, []);
  } finally {
    await page.context().close();
    await on.kill();
    await off.kill();
    await own.stop();
  }
});
