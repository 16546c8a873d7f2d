// Fakes for the client's timer tests (test/stall.test.js): a clock that moves
// only when told, a WebSocket whose node side the test plays, and a browser
// window with `online`/`offline` and a document with `visibilitychange`.
// Everything else in the client's tests is real (testlib/harness.js).

/** Lets pending promise callbacks run (the client awaits its token before opening). */
export const settle = () => new Promise((resolve) => setImmediate(resolve));

/**
 * The client's `clock` option: setTimeout, clearTimeout and now, moved by
 * `advance`, so a test covers minutes of timers without waiting.
 */
export class FakeClock {
  constructor(start = 1_000_000) {
    this.t = start;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (f, ms = 0) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.t + Math.max(0, ms), f });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
    this.now = () => this.t;
  }

  /**
   * Moves time `ms` forward, running each timer that falls due at its own
   * time, in order (ties in the order they were set), with promise
   * callbacks settled between them.
   */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await settle();
      let next = null;
      for (const [id, timer] of this.timers) {
        if (timer.at <= end && (!next || timer.at < next.at)) next = { id, ...timer };
      }
      if (!next) break;
      this.timers.delete(next.id);
      this.t = next.at;
      next.f();
    }
    this.t = end;
    await settle();
  }

  /**
   * Moves time `ms` forward without running the timers due meanwhile, as a
   * sleeping machine or a throttled background tab does: they stay due and
   * run at the next `advance`.
   */
  sleep(ms) {
    this.t += ms;
  }
}

/**
 * A WebSocket class for the client's `WebSocket` option, and the sockets it
 * made, in order. The test plays the node: `welcome`, `receive`, `drop`.
 */
export function fakeWebSockets() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      /** Frames the client sent, parsed. */
      this.sent = [];
      /** The code of close() when the client closed it, else null. */
      this.closedWith = null;
      this.onmessage = null;
      this.onclose = null;
      this.onerror = null;
      sockets.push(this);
    }
    send(text) {
      if (this.closedWith !== null) throw new Error('the socket is closed');
      this.sent.push(JSON.parse(text));
    }
    close(code) {
      this.closedWith = code ?? 1005;
    }
    /** The node sends a frame. */
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    welcome(position = 0, epoch = '7') {
      this.receive({ type: 'welcome', node: 'node-a', user: 'u', position, epoch });
    }
    event(seq) {
      this.receive({ type: 'event', seq, event: { type: 'agent_thinking', data: { text: `t${seq}` } } });
    }
    /** The connection ends without a close frame. */
    drop(code = 1006) {
      this.onclose?.({ code, reason: '' });
    }
    /** The `ping` frames the client sent. */
    pings() {
      return this.sent.filter((f) => f.type === 'ping').length;
    }
  }
  return { WebSocket: FakeWebSocket, sockets };
}

/**
 * A window for the client's `window` option: EventTargets for the window and
 * its document, whose `visibilityState` the test sets; it counts the
 * listeners held, so a test sees them removed.
 */
export function fakeWindow() {
  const count = { n: 0 };
  const counted = (target) => {
    const add = target.addEventListener.bind(target);
    const remove = target.removeEventListener.bind(target);
    target.addEventListener = (type, f) => {
      count.n += 1;
      add(type, f);
    };
    target.removeEventListener = (type, f) => {
      count.n -= 1;
      remove(type, f);
    };
    return target;
  };
  const win = counted(new EventTarget());
  win.document = counted(new EventTarget());
  win.document.visibilityState = 'visible';
  win.listeners = () => count.n;
  win.fire = (type) => win.dispatchEvent(new Event(type));
  win.show = () => {
    win.document.visibilityState = 'visible';
    win.document.dispatchEvent(new Event('visibilitychange'));
  };
  win.hide = () => {
    win.document.visibilityState = 'hidden';
    win.document.dispatchEvent(new Event('visibilitychange'));
  };
  return win;
}

/**
 * A fetch for the client's `sse` transport, and the event streams it opened,
 * in order. The test plays the node: `frame` (an SSE event), `comment`
 * (the node's `: ping` keepalive line).
 */
export function fakeEventStreams() {
  const streams = [];
  const encoder = new TextEncoder();
  const fetch = async (url, init = {}) => {
    let controller;
    const body = new ReadableStream({ start: (c) => (controller = c) });
    const stream = {
      url: String(url),
      aborted: false,
      write: (text) => controller.enqueue(encoder.encode(text)),
      frame: (f) => stream.write(`event: ${f.type}\ndata: ${JSON.stringify(f)}\n\n`),
      comment: () => stream.write(': ping\n\n'),
      welcome: (position = 0, epoch = '7') =>
        stream.frame({ type: 'welcome', node: 'node-a', user: 'u', position, epoch }),
      event: (seq) =>
        stream.frame({ type: 'event', seq, event: { type: 'agent_thinking', data: { text: `t${seq}` } } }),
    };
    init.signal?.addEventListener('abort', () => {
      stream.aborted = true;
      controller.error(new Error('aborted'));
    });
    streams.push(stream);
    return new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
  };
  return { fetch, streams };
}
