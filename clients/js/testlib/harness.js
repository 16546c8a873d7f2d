// Real parts for the client's tests: a nats-server process on a free port with
// its own JetStream directory, agentcast nodes as real processes on port 0,
// events published with `agentcast publish`. Mirrors tests/common/mod.rs.
//
// AGENTCAST_BIN: the agentcast binary (tests/js_client.rs passes cargo's).
// AGENTCAST_TEST_NATS_SERVER: the nats-server binary, else `nats-server`.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { Transform } from 'node:stream';

export const SECRET = 'test-secret-test-secret-test-secret!';
const START_TIMEOUT_MS = 15000;
export const RECV_TIMEOUT_MS = 10000;

const AGENTCAST_BIN = process.env.AGENTCAST_BIN ?? 'agentcast';
const NATS_BIN = process.env.AGENTCAST_TEST_NATS_SERVER ?? 'nats-server';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `f` until it returns true, or fails after the timeout. */
export async function eventually(what, f, timeoutMs = RECV_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  while (!(await f())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await sleep(20);
  }
}

function exited(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
}

export class NatsServer {
  static async start() {
    const dir = mkdtempSync(join(tmpdir(), 'agentcast-js-'));
    const child = spawn(
      NATS_BIN,
      ['-a', '127.0.0.1', '-p', '-1', '-js', '-sd', join(dir, 'jetstream'), '--ports_file_dir', dir],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let log = '';
    child.stderr.on('data', (d) => (log += d));
    const spawnError = new Promise((_, reject) => child.once('error', reject));
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      const file = readdirSync(dir).find((f) => f.endsWith('.ports'));
      if (file) {
        try {
          const v = JSON.parse(readFileSync(join(dir, file), 'utf8'));
          const s = new NatsServer();
          Object.assign(s, { child, dir, url: v.nats[0] });
          return s;
        } catch {
          /* half-written: retry */
        }
      }
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`nats-server did not start:\n${log}`);
      }
      await Promise.race([sleep(20), spawnError]);
    }
  }

  async stop() {
    this.child.kill('SIGKILL');
    await exited(this.child);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export class Node {
  /**
   * Starts a node and waits until /readyz says ready. It listens on a free
   * port unless `extra` has its own `--listen` (a node taking over a port).
   */
  static async start(nats, extra = []) {
    const args = ['serve', '--nats-url', nats.url, '--jwt-secret', SECRET];
    if (!extra.includes('--listen')) args.push('--listen', '127.0.0.1:0');
    if (!extra.includes('--drain-window')) args.push('--drain-window', '1s');
    args.push(...extra);
    const child = spawn(AGENTCAST_BIN, args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, AGENTCAST_LOG: 'info,agentcast=debug' },
    });
    const node = new Node();
    node.child = child;
    node.log = '';
    const addr = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`node did not start; log:\n${node.log}`)), START_TIMEOUT_MS);
      child.once('error', (e) => {
        clearTimeout(timer);
        reject(new Error(`cannot start ${AGENTCAST_BIN}: ${e.message}`));
      });
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (d) => {
        node.log += d;
        const m = /listening on (\S+)/.exec(node.log);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
    });
    node.addr = addr;
    node.url = `ws://${addr}/ws`;
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      const ok = await fetch(`http://${addr}/readyz`).then(
        (r) => r.status === 200,
        () => false,
      );
      if (ok) return node;
      if (Date.now() > deadline) throw new Error(`node not ready; log:\n${node.log}`);
      await sleep(50);
    }
  }

  /** Sends a signal and waits for the process to exit. */
  async kill(signal = 'SIGKILL') {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    await exited(this.child);
  }
}

/** An HS256 token for `user`, valid for `lifetimeS` seconds (like `agentcast token`). */
export function token(user, lifetimeS = 600) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ typ: 'JWT', alg: 'HS256' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + lifetimeS })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

/**
 * Publishes events with `agentcast publish` (JSON envelopes on stdin) and
 * returns their stored sequences, in order.
 */
export async function publish(nats, user, events) {
  const child = spawn(AGENTCAST_BIN, ['publish', '--nats-url', nats.url, '--user', user], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  child.stdin.end(events.map((e) => JSON.stringify(e)).join('\n') + '\n');
  const code = await new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', resolve);
  });
  if (code !== 0) throw new Error(`agentcast publish exited with ${code}:\n${err}`);
  const seqs = out
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .map((r) => r.seq);
  if (seqs.length !== events.length) throw new Error(`published ${seqs.length} of ${events.length}:\n${out}\n${err}`);
  return seqs;
}

/** `n` agent_thinking envelopes numbered from `from`. */
export function thinking(n, from = 0) {
  return Array.from({ length: n }, (_, i) => ({ type: 'agent_thinking', data: { text: `t${from + i}` } }));
}

/** A Map with the sessionStorage interface, for Node. */
export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    this.map.set(k, String(v));
  }
  removeItem(k) {
    this.map.delete(k);
  }
}

/**
 * An agent answering control requests, as a plain NATS client over TCP
 * (the client protocol's CONNECT, SUB, PUB, HMSG, PING/PONG): subscribes to
 * `subject` and replies to each request with what `answer(request)` returns
 * (an object, or undefined for no reply). `requests` lists what it received:
 * `{subject, headers, data}`. Resolves once the server has the subscription.
 */
export async function controlAgent(nats, subject, answer) {
  const { connect } = await import('node:net');
  const [host, port] = nats.url.replace('nats://', '').split(':');
  const sock = connect(Number(port), host);
  const agent = { requests: [], connected: false, close: () => sock.destroy() };
  let buf = Buffer.alloc(0);
  let subscribed;
  const ready = new Promise((resolve, reject) => {
    subscribed = resolve;
    sock.once('error', reject);
  });
  const handle = (subj, reply, head, payload) => {
    const headers = {};
    for (const line of head.split('\r\n').slice(1)) {
      const i = line.indexOf(':');
      if (i > 0) headers[line.slice(0, i)] = line.slice(i + 1).trim();
    }
    const request = { subject: subj, headers, data: JSON.parse(payload) };
    agent.requests.push(request);
    const body = answer(request);
    if (body === undefined || !reply) return;
    const out = Buffer.from(JSON.stringify(body));
    sock.write(`PUB ${reply} ${out.length}\r\n`);
    sock.write(Buffer.concat([out, Buffer.from('\r\n')]));
  };
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const eol = buf.indexOf('\r\n');
      if (eol < 0) return;
      const line = buf.subarray(0, eol).toString();
      if (line.startsWith('INFO ') && !agent.connected) {
        // Only the first INFO: 2.10+ send another after CONNECT.
        agent.connected = true;
        sock.write('CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1}\r\n');
        sock.write(`SUB ${subject} 1\r\nPING\r\n`);
      } else if (line === 'PING') {
        sock.write('PONG\r\n');
      } else if (line === 'PONG') {
        subscribed(agent);
      } else if (line.startsWith('HMSG ') || line.startsWith('MSG ')) {
        // HMSG <subject> <sid> [reply] <header bytes> <total bytes>; MSG without headers.
        const parts = line.split(' ');
        const withHeaders = parts[0] === 'HMSG';
        const total = Number(parts[parts.length - 1]);
        const headLen = withHeaders ? Number(parts[parts.length - 2]) : 0;
        const reply = parts.length === (withHeaders ? 6 : 5) ? parts[3] : undefined;
        if (buf.length < eol + 2 + total + 2) return; // wait for the rest
        const body = buf.subarray(eol + 2, eol + 2 + total);
        buf = buf.subarray(eol + 2 + total + 2);
        handle(parts[1], reply, body.subarray(0, headLen).toString(), body.subarray(headLen).toString() || '{}');
        continue;
      } else if (line.startsWith('-ERR')) {
        throw new Error(`nats: ${line}`);
      }
      buf = buf.subarray(eol + 2);
    }
  });
  return ready;
}

/** What the slow link passes at a time: small, so frames trickle in as over a poor link, not in bursts. */
const SLICE_BYTES = 512;

/**
 * A TCP relay to `target` (host:port). Connections made after `slow(rate)`
 * get what the node sends at `rate` bytes a second (the page loaded before
 * it comes at full speed); what the page sends passes as it is.
 */
export async function relay(target) {
  const at = target.lastIndexOf(':');
  const [host, port] = [target.slice(0, at), Number(target.slice(at + 1))];
  let rate = null;
  const pairs = new Set();
  const server = createServer((down) => {
    const up = connect(port, host);
    const pair = { down, up };
    pairs.add(pair);
    down.pipe(up);
    if (rate === null) {
      up.pipe(down);
    } else {
      // Backpressure does the rest: while a slice waits, the node's writes
      // fill the socket buffers and then wait, as on a slow network.
      const bytesPerS = rate;
      up.pipe(
        new Transform({
          async transform(chunk, _enc, done) {
            for (let i = 0; i < chunk.length; i += SLICE_BYTES) {
              const slice = chunk.subarray(i, i + SLICE_BYTES);
              await sleep((slice.length / bytesPerS) * 1000);
              this.push(slice);
            }
            done();
          },
        }),
      ).pipe(down);
    }
    const end = () => {
      down.destroy();
      up.destroy();
      pairs.delete(pair);
    };
    down.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    addr: `127.0.0.1:${server.address().port}`,
    slow(bytesPerS) {
      rate = bytesPerS;
    },
    /**
     * The connections open now go half-open: nothing passes either way and
     * nothing is closed (no FIN, no RST), as for a sleeping laptop. New
     * connections pass.
     */
    freeze() {
      for (const { down, up } of pairs) {
        down.unpipe();
        up.unpipe();
        down.pause();
        up.pause();
      }
    },
    close() {
      for (const { down, up } of pairs) {
        down.destroy();
        up.destroy();
      }
      server.close();
    },
  };
}
