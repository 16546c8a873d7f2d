// agentcast JavaScript client: an ES module with no dependencies, for browsers
// and Node 20+. It mirrors the Rust client (src/client.rs) and implements the
// socket protocol in docs/protocol.md: it resumes from its last `seq` after
// any disconnect, drops duplicates by `seq`, reports gaps, and reconnects with
// exponential backoff and full jitter.

/** First reconnect delay ceiling in ms; doubles per failed attempt. */
export const BACKOFF_BASE_MS = 100;
/** Largest reconnect delay ceiling in ms. */
export const BACKOFF_MAX_MS = 5000;
/** Time allowed to open a socket and read its welcome, in ms. */
export const CONNECT_TIMEOUT_MS = 10000;
/** Exponent cap, so `2 ** attempt` stays a small exact number. */
const MAX_BACKOFF_EXPONENT = 16;
/**
 * Opens in a row that carried a position and got no welcome, after which the
 * next open goes without it to see whether the node refuses the position
 * (a browser cannot see the 400 of a refused upgrade: it looks like a node
 * that is down). If that plain open is welcomed, the position is dropped;
 * if it fails too, the nodes are unreachable and the position is kept.
 */
export const RESUME_FAILURES_BEFORE_PROBE = 3;
/** Longest epoch: a u64 in decimal (the stream's creation time in ns). */
const MAX_EPOCH_DIGITS = 20;
/**
 * Largest frame a node accepts from a client, in bytes (docs/protocol.md §4).
 * A bigger one would close the socket with 1009, which stops this client, so
 * `control()` refuses it before sending.
 */
export const MAX_CLIENT_FRAME_BYTES = 16384;

/**
 * `transport` option values: `websocket` (the default), `sse` (Server-Sent
 * Events from `/sse`, control requests as `POST /control`; for networks whose
 * proxies drop WebSocket upgrades), or `auto`: WebSocket, and SSE from the
 * moment AUTO_FALLBACK_FAILURES WebSocket opens in a row failed while plain
 * HTTP to the node says it is ready (`/readyz`: a node still starting refuses both).
 */
export const TRANSPORTS = Object.freeze(['websocket', 'sse', 'auto']);
export const AUTO_FALLBACK_FAILURES = 2;
/**
 * With a token provider, the token is refreshed this long before the
 * welcome's `exp` (or at half the time left, if that is sooner): in band on
 * a WebSocket (`refresh` frame), by reopening the stream on SSE.
 */
export const REFRESH_MARGIN_MS = 60000;

/**
 * Default `stallTimeout`, in ms: the longest a dead connection (half-open
 * TCP after a lid closed or a network changed, which the browser may not
 * notice for minutes) goes unnoticed. 1.5 times the node's default ping
 * interval (`--ping-interval`, 20 s): an event stream gets a `: ping`
 * comment at least every interval, so a live one always has one in 30 s,
 * with 10 s to spare for delays. A WebSocket's pings are answered by the
 * browser out of the page's sight, so there the client asks itself: a
 * `{"type":"ping"}` frame after stallTimeout - the probe timeout of quiet.
 */
export const STALL_TIMEOUT_MS = 30000;
/**
 * Time a `ping` frame gets for any frame to come back, in ms (at most half
 * the stallTimeout), after a quiet period and when the page wakes (visible,
 * online). A live node answers at once even while it writes a backlog
 * (docs/protocol.md §6); 5 s covers a slow mobile round trip and a radio
 * waking up.
 */
export const PROBE_TIMEOUT_MS = 5000;
/** Largest delay setTimeout holds (2^31-1 ms); a longer one fires at once. */
const MAX_TIMER_MS = 2147483647;
/** The frame the node answers with `{"type":"pong"}` (docs/protocol.md §4). */
const PING_FRAME = JSON.stringify({ type: 'ping' });

/**
 * The real clock. Wrapped in arrows: a browser's setTimeout refuses any
 * `this` but the window. Tests pass their own (`options.clock`).
 */
const REAL_CLOCK = Object.freeze({
  setTimeout: (f, ms) => setTimeout(f, ms),
  clearTimeout: (t) => clearTimeout(t),
  now: () => Date.now(),
});

/**
 * Codes a `control()` promise is rejected with besides the node's
 * (docs/protocol.md §9): the request was never sent (`not_connected`,
 * `bad_data`, `too_big`), or its socket closed before the answer
 * (`socket_closed`: an agent may have received it; it is not resent).
 */
export const CONTROL_NOT_CONNECTED = 'not_connected';
export const CONTROL_BAD_DATA = 'bad_data';
export const CONTROL_TOO_BIG = 'too_big';
export const CONTROL_SOCKET_CLOSED = 'socket_closed';

/** Why a `control()` request got no reply; `code` says which (docs/protocol.md §9). */
export class ControlError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   */
  constructor(code, message) {
    super(message ? `control request failed: ${code}: ${message}` : `control request failed: ${code}`);
    this.name = 'ControlError';
    this.code = code;
  }
}

/**
 * A position the client may store and send: a safe non-negative integer.
 * Past 2^53 a JSON number loses precision, and the node refuses it.
 * @param {unknown} seq
 */
export function isPosition(seq) {
  return Number.isSafeInteger(seq) && seq >= 0;
}

/**
 * An epoch the client may store and send: a decimal string (docs/protocol.md §3).
 * @param {unknown} epoch
 */
export function isEpoch(epoch) {
  return typeof epoch === 'string' && epoch.length > 0 && epoch.length <= MAX_EPOCH_DIGITS && /^[0-9]+$/.test(epoch);
}

/** Built-in event types (docs/publishing.md §2); custom types contain a `.`. */
export const EVENT_TYPES = Object.freeze([
  'agent_started',
  'agent_thinking',
  'message_delta',
  'tool_executing',
  'tool_completed',
  'agent_completed',
  'error',
]);

/**
 * Messages whose text a client keeps for `onMessage` (docs/publishing.md
 * §10). When a delta of a new message arrives with this many held, the one
 * that had a delta longest ago is forgotten: a later delta of it starts its
 * text again from that delta. Streams interleave a few messages at a time,
 * so this bounds memory on a long-lived page without affecting them.
 */
export const MAX_MESSAGES = 256;

/** A delta event's fields, or null when the event is not one (docs/publishing.md §10). */
function deltaOf(event) {
  const id = event.message_id;
  if (typeof id !== 'string' || id.length === 0 || typeof event.delta !== 'string') return null;
  return { messageId: id, delta: event.delta };
}

/**
 * Assembles streamed text: the text so far of each message, from delta
 * events, whether a node merged several into one frame or not (appending
 * each frame's `delta` is right either way). The client keeps one; it is
 * exported for pages that assemble events they got another way.
 */
export class Messages {
  constructor(max = MAX_MESSAGES) {
    this._max = max;
    /** @type {Map<string, string>} in order of their last delta */
    this._texts = new Map();
  }

  /**
   * Appends a delta event's text. Returns {messageId, delta, text} or null
   * when the event is not a delta event.
   */
  add(event) {
    const d = deltaOf(event ?? {});
    if (!d) return null;
    const text = (this._texts.get(d.messageId) ?? '') + d.delta;
    this._texts.delete(d.messageId);
    if (this._texts.size >= this._max) this._texts.delete(this._texts.keys().next().value);
    this._texts.set(d.messageId, text);
    return { messageId: d.messageId, delta: d.delta, text };
  }

  /** The text so far of a message, or undefined. */
  text(messageId) {
    return this._texts.get(messageId);
  }

  clear() {
    this._texts.clear();
  }
}

/**
 * Close codes after which a reconnect only repeats the client's fault
 * (docs/protocol.md §5): a frame RFC 6455 forbids, binary frame, bad UTF-8,
 * missing resume frame, oversized message.
 */
const FATAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1008, 1009]);
/**
 * Close codes after which the client returns after a short jitter only:
 * drain, slow client, stream reset. Their attempt counter restarts at 0.
 */
const QUICK_CLOSE_CODES = new Set([1012, 4000, 4003]);
/** The token expired: reconnect with a fresh token from the provider. */
const TOKEN_EXPIRED = 4001;

/**
 * Full jitter: uniform in [0, min(max, base * 2^attempt)).
 * @param {number} attempt failed attempts so far (0 for a quick return)
 * @param {{base?: number, max?: number, random?: () => number}} [opts]
 * @returns {number} delay in ms
 */
export function backoffDelay(attempt, opts = {}) {
  const base = opts.base ?? BACKOFF_BASE_MS;
  const max = opts.max ?? BACKOFF_MAX_MS;
  const random = opts.random ?? Math.random;
  const ceiling = Math.min(max, base * 2 ** Math.min(Math.max(attempt, 0), MAX_BACKOFF_EXPONENT));
  return ceiling * random();
}

/**
 * The `sub` claim of a JWT, read without verifying it (the node verifies).
 * Used only to key the stored position per user. Returns undefined when the
 * token cannot be read.
 * @param {string} token
 */
export function tokenSubject(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const json =
      typeof atob === 'function'
        ? new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0)))
        : undefined;
    const sub = json && JSON.parse(json).sub;
    return typeof sub === 'string' ? sub : undefined;
  } catch {
    return undefined;
  }
}

/** Wraps sessionStorage-like (getItem/setItem/removeItem) or Map-like (get/set/delete) storage. */
function storageAdapter(storage) {
  if (!storage) return null;
  if (typeof storage.getItem === 'function') {
    return {
      get: (k) => storage.getItem(k),
      set: (k, v) => storage.setItem(k, v),
      remove: (k) => storage.removeItem(k),
    };
  }
  if (typeof storage.get === 'function' && typeof storage.set === 'function') {
    return {
      get: (k) => storage.get(k) ?? null,
      set: (k, v) => storage.set(k, v),
      remove: (k) => storage.delete(k),
    };
  }
  throw new TypeError('storage must have getItem/setItem/removeItem or get/set/delete');
}

function defaultStorage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    // Access can throw (sandboxed iframes, disabled storage).
    return null;
  }
}

/**
 * A resuming connection to one user's event stream.
 *
 * States: 'idle' (not started), 'connecting', 'open' (welcomed),
 * 'waiting' (backing off before the next attempt), 'stalled' (nothing came
 * in time: the socket was closed and a reconnect follows at once), 'offline'
 * (the browser has no network: no attempts until it is back), 'closed'
 * (stopped for good).
 */
export class AgentcastClient {
  /** @param {import('./agentcast.js').AgentcastOptions} options */
  constructor(options) {
    if (!options || (!options.url && !options.urls)) throw new TypeError('url is required');
    const urls = options.urls ?? (Array.isArray(options.url) ? options.url : [options.url]);
    if (urls.length === 0) throw new TypeError('url is required');
    if (options.token === undefined) throw new TypeError('token is required');
    this.urls = urls.map(String);
    this._token = options.token;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function' && options.transport !== 'sse') {
      throw new TypeError('no WebSocket: pass options.WebSocket (Node 20: run with --experimental-websocket)');
    }
    this._storage = storageAdapter(options.storage === undefined ? defaultStorage() : options.storage);
    this._storageKey = options.storageKey;
    this._user = options.user;
    this._backoff = { base: options.backoffBase ?? BACKOFF_BASE_MS, max: options.backoffMax ?? BACKOFF_MAX_MS };
    this._random = options.random ?? Math.random;
    this._connectTimeout = options.connectTimeout ?? CONNECT_TIMEOUT_MS;
    this._transport = options.transport ?? 'websocket';
    if (!TRANSPORTS.includes(this._transport)) {
      throw new TypeError(`transport must be one of ${TRANSPORTS.join(', ')}`);
    }
    // Called through a wrapper: a browser's fetch refuses any `this` but the window.
    const fetchImpl = options.fetch ?? globalThis.fetch;
    this._fetch = typeof fetchImpl === 'function' ? (...args) => fetchImpl(...args) : undefined;
    if (this._transport !== 'websocket' && typeof this._fetch !== 'function') {
      throw new TypeError('no fetch: pass options.fetch for the sse and auto transports');
    }
    /** The event-stream URLs (`/sse`), one per WebSocket URL unless given. */
    this.sseUrls = (options.sseUrls ?? this.urls.map(sseUrlOf)).map(String);
    /** The transport of the current or last connection: 'websocket' or 'sse'. */
    this.transport = this._transport === 'sse' ? 'sse' : 'websocket';
    /** WebSocket opens in a row that got no welcome while HTTP worked (for `auto`). */
    this._wsFailures = 0;
    /** The last WebSocket open got no welcome; counted at the next open. */
    this._wsFailed = false;
    this._refreshTimer = null;
    /** Timers and time: `{setTimeout, clearTimeout, now}`, a fake one in tests. */
    this._clock = options.clock ?? REAL_CLOCK;
    this._stallTimeout = options.stallTimeout ?? STALL_TIMEOUT_MS;
    if (!(typeof this._stallTimeout === 'number' && this._stallTimeout > 0 && this._stallTimeout <= MAX_TIMER_MS)) {
      throw new TypeError(`stallTimeout must be a number of ms from 1 to ${MAX_TIMER_MS}`);
    }
    this._probeTimeout = Math.min(PROBE_TIMEOUT_MS, this._stallTimeout / 2);
    /** Where `online`, `offline` and (on its document) `visibilitychange` come from. */
    this._window = options.window === undefined ? globalThis : options.window;
    this._unlisten = null;
    /** When anything was last received on the open socket (clock ms). */
    this._heardAt = 0;
    /** When a ping was sent that nothing has followed yet; null when none is out. */
    this._probeSince = null;
    this._watchTimer = null;
    /** The browser said `offline` and has not said `online` since. */
    this._offline = false;
    /** An `_open` is between its timer and its socket (it awaits the token). */
    this._opening = false;
    /** The URL of the current socket, for state reports. */
    this._url = null;

    if (options.lastSeq != null && !isPosition(options.lastSeq)) {
      throw new TypeError(`lastSeq must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}`);
    }
    if (options.epoch != null && !isEpoch(options.epoch)) {
      throw new TypeError('epoch must be a decimal string, as sent in the welcome frame');
    }

    this.state = 'idle';
    /** The last `seq` delivered, or the position resumed from; null before any. */
    this.lastSeq = options.lastSeq ?? null;
    /** The stream epoch of the last welcome, or the one resumed with. */
    this.epoch = options.epoch ?? null;
    /** Events dropped because their `seq` was not after the last one. */
    this.duplicates = 0;
    /** Reconnections made (not counting the first connection). */
    this.reconnects = 0;
    /** Token provider calls (or uses of the static token). */
    this.tokenRequests = 0;

    this._loaded = this.lastSeq !== null;
    /** Opens in a row with a position that got no welcome. */
    this._resumeFailures = 0;
    /** Why the position is dropped at the next welcome (see RESUME_FAILURES_BEFORE_PROBE). */
    this._dropAtWelcome = null;
    this._attempt = 0;
    this._connections = 0;
    this._nextUrl = 0;
    this._ws = null;
    this._timer = null;
    this._stopped = false;
    this._handlers = new Map();
    this._stateHandlers = new Set();
    this._gapHandlers = new Set();
    this._welcomeHandlers = new Set();
    this._errorHandlers = new Set();
    this._messageHandlers = new Set();
    /** Streamed text so far, per message (onMessage). */
    this.messages = new Messages(options.maxMessages ?? MAX_MESSAGES);
    /** Control requests of the open socket waiting for their answer, by id. */
    this._pending = new Map();
    this._nextControl = 0;
    if (options.onState) this._stateHandlers.add(options.onState);
    if (options.onGap) this._gapHandlers.add(options.onGap);
    if (options.onWelcome) this._welcomeHandlers.add(options.onWelcome);
    if (options.onError) this._errorHandlers.add(options.onError);
    if (options.onMessage) this._messageHandlers.add(options.onMessage);
  }

  /**
   * Handler for one event type ('agent_started', ...), 'custom' (any type
   * with a `.`), or '*' (every event). Returns a function that removes it.
   */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this._handlers.get(type)?.delete(handler);
  }

  /** State changes: handler(state, info). Returns a function that removes it. */
  onState(handler) {
    return addTo(this._stateHandlers, handler);
  }

  /** Gaps, with the server's frame: handler({reason, from, to, earliest}). */
  onGap(handler) {
    return addTo(this._gapHandlers, handler);
  }

  /** Every welcome: handler({node, user, position, epoch}). */
  onWelcome(handler) {
    return addTo(this._welcomeHandlers, handler);
  }

  /**
   * Streamed text (docs/publishing.md §10): handler({messageId, type, delta,
   * text, seq, firstSeq, merged, event}) for each frame carrying a delta
   * event, where `text` is the message's text so far on this client. A
   * frame that merges several deltas (`merged` > 1, `firstSeq` its first
   * `seq`) calls it once with their concatenation. Joined from a position
   * before the message (`lastSeq`), the replay rebuilds the text. Returns a
   * function that removes it.
   */
  onMessage(handler) {
    return addTo(this._messageHandlers, handler);
  }

  /** Errors that do not stop the client (a handler threw, a bad frame). */
  onError(handler) {
    return addTo(this._errorHandlers, handler);
  }

  /** Starts connecting. Returns this. */
  connect() {
    if (this.state === 'idle') {
      this._listen();
      this._schedule(0, null);
    }
    return this;
  }

  /** Closes the socket and stops reconnecting. */
  close() {
    this._stop({ reason: 'closed by the client' });
  }

  /**
   * Sends a control request (`data`, a JSON object) to the agents serving
   * this user, over the open socket, and returns a promise of the agent's
   * reply (an object). It is rejected with a ControlError whose `code` is
   * the node's (`no_agent`, `timeout`, `rate_limited`, `too_many_pending`,
   * `bad_reply`, `disabled`, `bad_frame`, `unavailable`) or this client's
   * (`not_connected`, `bad_data`, `too_big`: not sent; `socket_closed`: the
   * socket ended first). A request is sent once, never again after a
   * reconnect: at most once.
   * @param {Record<string, unknown>} data
   * @returns {Promise<Record<string, unknown>>}
   */
  control(data) {
    if (data === null || typeof data !== 'object' || Array.isArray(data)) {
      return Promise.reject(new ControlError(CONTROL_BAD_DATA, 'data must be a JSON object'));
    }
    const ws = this._ws;
    if (this.state !== 'open' || !ws) {
      return Promise.reject(new ControlError(CONTROL_NOT_CONNECTED, `the client is ${this.state}`));
    }
    this._nextControl += 1;
    const id = `c${this._nextControl}`;
    let text;
    try {
      text = JSON.stringify({ type: 'control', id, data });
    } catch (err) {
      return Promise.reject(new ControlError(CONTROL_BAD_DATA, err.message));
    }
    const bytes = new TextEncoder().encode(text).length;
    if (bytes > MAX_CLIENT_FRAME_BYTES) {
      return Promise.reject(
        new ControlError(CONTROL_TOO_BIG, `the frame is ${bytes} bytes, over ${MAX_CLIENT_FRAME_BYTES}`),
      );
    }
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      try {
        ws.send(text);
      } catch (err) {
        this._pending.delete(id);
        reject(new ControlError(CONTROL_NOT_CONNECTED, err.message));
      }
    });
  }

  // --- internals ---

  _setState(state, info = {}) {
    this.state = state;
    for (const h of this._stateHandlers) this._call(h, state, info);
  }

  _call(handler, ...args) {
    try {
      handler(...args);
    } catch (err) {
      this._report(err);
    }
  }

  /**
   * A handler threw or the server sent a frame that is not JSON: tell the
   * error handlers; without any, rethrow outside the socket's callback, as an
   * uncaught error, so it is not silently lost. The stream goes on either way.
   */
  _report(err) {
    if (this._errorHandlers.size === 0) {
      // The real timer even under a test clock: the error must surface.
      setTimeout(() => {
        throw err;
      });
      return;
    }
    for (const h of this._errorHandlers) {
      try {
        h(err);
      } catch {
        /* an error handler that throws is ignored */
      }
    }
  }

  /** The socket ended: its requests will get no answer; none is resent. */
  _rejectPending(why) {
    const pending = this._pending;
    this._pending = new Map();
    for (const { reject } of pending.values()) reject(new ControlError(CONTROL_SOCKET_CLOSED, why));
  }

  _stop(info) {
    if (this._stopped) return;
    this._stopped = true;
    this._unlisten?.();
    this._unlisten = null;
    this._clock.clearTimeout(this._timer);
    this._timer = null;
    this._drop(info.reason ?? 'closed');
    this._setState('closed', info);
  }

  /**
   * Ends the current socket from this side, if there is one: its callbacks
   * are cut (nothing more is read from it), its timers stopped and its
   * waiting control requests rejected with `why`.
   */
  _drop(why) {
    const ws = this._release(why);
    if (!ws) return;
    try {
      ws.close(1000);
    } catch {
      /* already closing */
    }
  }

  /**
   * Lets go of the current socket, closed or about to be: its callbacks cut,
   * its timers stopped, its waiting control requests rejected with `why`.
   * Returns it (null when there was none).
   */
  _release(why) {
    const ws = this._ws;
    this._ws = null;
    this._unwatch();
    this._clock.clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._rejectPending(why);
    if (ws) detach(ws);
    return ws;
  }

  /** Opens a socket after `delay` ms; `info` (null for the first connection) says why. */
  _schedule(delay, info) {
    if (this._stopped) return;
    if (this._offline) {
      // No attempt against a dead network: `online` schedules the next one.
      if (this.state !== 'offline') this._setState('offline', info ?? {});
      return;
    }
    if (info) this._setState('waiting', { ...info, delay, attempt: this._attempt });
    this._timer = this._clock.setTimeout(() => {
      this._timer = null;
      this._opening = true;
      this._open()
        .catch((err) => this._failed({ error: err }))
        .finally(() => {
          this._opening = false;
        });
    }, delay);
  }

  // --- dead connections: the stall watchdog, and the page's network and visibility ---

  /**
   * In a browser (a window with addEventListener and a document), follows
   * `online`, `offline` and `visibilitychange` until close(). Elsewhere (Node)
   * it does nothing.
   */
  _listen() {
    const win = this._window;
    const doc = win?.document;
    if (typeof win?.addEventListener !== 'function' || typeof doc?.addEventListener !== 'function') return;
    const online = () => this._online();
    const offline = () => this._goOffline();
    const visibility = () => {
      if (doc.visibilityState === 'visible') this._wake();
    };
    win.addEventListener('online', online);
    win.addEventListener('offline', offline);
    doc.addEventListener('visibilitychange', visibility);
    this._unlisten = () => {
      win.removeEventListener('online', online);
      win.removeEventListener('offline', offline);
      doc.removeEventListener('visibilitychange', visibility);
    };
  }

  /**
   * The browser has no network: no socket can work and no attempt can
   * succeed until `online`. The socket is closed now (the resume at `online`
   * loses nothing) and retries stop, so no backoff is spent on a dead network.
   */
  _goOffline() {
    if (this._stopped || this._offline) return;
    this._offline = true;
    this._clock.clearTimeout(this._timer);
    this._timer = null;
    this._drop('the network went offline');
    this._setState('offline', {});
  }

  /** The network is back: reconnect at once, or check the open socket. */
  _online() {
    if (this._stopped) return;
    if (!this._offline) {
      // No `offline` before (a network change, say): the socket may be dead.
      this._wake();
      return;
    }
    this._offline = false;
    // A new network: the failures before it say nothing about it.
    this._attempt = 0;
    // An `_open` still awaiting its token goes on by itself.
    if (!this._ws && this._timer === null && !this._opening) this._schedule(0, null);
  }

  /**
   * The page became visible or the network came back: check the open socket
   * now (a timer in a background tab or a sleeping laptop may have waited
   * far longer than asked), and make a pending retry now.
   */
  _wake() {
    if (this._stopped || this._offline) return;
    if (this._ws) {
      this._check(true);
    } else if (this._timer !== null) {
      this._clock.clearTimeout(this._timer);
      this._timer = null;
      this._schedule(0, null);
    }
  }

  /** Something came from the node: the connection is alive. */
  _heard() {
    this._heardAt = this._clock.now();
    this._probeSince = null;
  }

  /** Starts the watchdog of a socket just welcomed. */
  _watch() {
    this._heard();
    this._arm(this.transport === 'sse' ? this._stallTimeout : this._stallTimeout - this._probeTimeout);
  }

  _arm(delay) {
    this._clock.clearTimeout(this._watchTimer);
    this._watchTimer = this._clock.setTimeout(() => {
      this._watchTimer = null;
      this._check(false);
    }, delay);
  }

  _unwatch() {
    this._clock.clearTimeout(this._watchTimer);
    this._watchTimer = null;
    this._probeSince = null;
  }

  /**
   * The watchdog, run by its timer and (`wake`) when the page wakes. It does
   * not reset a timer per frame (a backlog is thousands of frames): each
   * frame only notes the time, and the timer, when it fires, compares and
   * sleeps again for the rest. Any frame proves the connection alive, so a
   * slow but live one is never declared stalled. On a WebSocket, quiet for
   * stallTimeout - probe timeout (or a wake) sends a `ping`; nothing within
   * the probe timeout is a stall. An event stream cannot be asked: the
   * node's `: ping` comments should come every ping interval, so quiet for
   * stallTimeout is a stall.
   */
  _check(wake) {
    const ws = this._ws;
    if (!ws || this.state !== 'open') return;
    const now = this._clock.now();
    if (this._probeSince !== null) {
      // A ping is out and nothing came since.
      const left = this._probeSince + this._probeTimeout - now;
      if (left <= 0) this._stalled(now);
      else this._arm(left);
      return;
    }
    const quiet = now - this._heardAt;
    if (this.transport === 'sse') {
      if (quiet >= this._stallTimeout) this._stalled(now);
      else this._arm(this._stallTimeout - quiet);
      return;
    }
    const limit = this._stallTimeout - this._probeTimeout;
    if (!wake && quiet < limit) {
      this._arm(limit - quiet);
      return;
    }
    this._probeSince = now;
    try {
      ws.send(PING_FRAME);
    } catch {
      this._stalled(now);
      return;
    }
    this._arm(this._probeTimeout);
  }

  /**
   * Nothing came in time: the connection is dead though the socket looks
   * open. Close it and reconnect at once, without backoff (the node is
   * likely fine, the path to it was not), to the next URL; the resume from
   * the position loses and repeats nothing. A failing reconnect backs off
   * as usual.
   */
  _stalled(now) {
    const info = { url: this._url, transport: this.transport, quiet: now - this._heardAt };
    this._drop('the connection stalled');
    this._setState('stalled', info);
    this._schedule(0, null);
  }

  /** Whether plain HTTP reaches a ready node (its `/readyz`), for `auto`. */
  async _httpWorks() {
    const base = this.sseUrls[this._nextUrl % this.sseUrls.length];
    try {
      const res = await this._fetch(new URL('readyz', base.replace(/[^/]*([?].*)?$/, '')).href, { cache: 'no-store' });
      return res.ok;
    } catch {
      return false;
    }
  }

  /** Refreshes the token before `exp` (Unix seconds), when a provider gives fresh ones. */
  _scheduleRefresh(exp) {
    this._clock.clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof this._token !== 'function' || !Number.isSafeInteger(exp)) return;
    const left = exp * 1000 - this._clock.now();
    const delay = Math.max(0, left - Math.min(REFRESH_MARGIN_MS, left / 2));
    this._refreshTimer = this._clock.setTimeout(() => {
      this._refreshTimer = null;
      this._refresh().catch((err) => this._report(err));
    }, delay);
  }

  async _refresh() {
    const ws = this._ws;
    if (!ws || this._stopped) return;
    if (this.transport === 'sse') {
      // No frames on a stream: reopen it with a fresh token, from the position.
      this._drop('the stream was reopened with a fresh token');
      this._schedule(0, { reason: 'token refresh' });
      return;
    }
    const token = await this._getToken();
    if (this._ws !== ws) return;
    ws.send(JSON.stringify({ type: 'refresh', token }));
  }

  async _getToken() {
    this.tokenRequests += 1;
    return typeof this._token === 'function' ? await this._token() : this._token;
  }

  _key(user) {
    if (this._storageKey) return this._storageKey;
    return `agentcast:${this.urls.join(' ')}:${user ?? ''}`;
  }

  _loadPosition(user) {
    if (this._loaded || !this._storage) return;
    this._loaded = true;
    let raw = null;
    try {
      raw = this._storage.get(this._key(user));
      const saved = raw ? JSON.parse(raw) : null;
      if (saved && isPosition(saved.seq) && (saved.epoch == null || isEpoch(saved.epoch))) {
        this.lastSeq = saved.seq;
        this.epoch = saved.epoch ?? null;
        return;
      }
    } catch {
      /* unreadable: dropped below */
    }
    if (raw) {
      // A position this client cannot send (not a safe integer, or an epoch
      // that is not a decimal string): start live and say so at the welcome.
      this._dropAtWelcome = 'stored position unusable';
      try {
        this._storage.remove(this._key(user));
      } catch {
        /* storage disabled */
      }
    }
  }

  _savePosition() {
    if (!this._storage || !isPosition(this.lastSeq)) return;
    try {
      this._storage.set(this._key(this._user), JSON.stringify({ seq: this.lastSeq, epoch: this.epoch }));
    } catch {
      /* storage full or disabled: the in-memory position still works */
    }
  }

  async _open() {
    if (this._stopped) return;
    if (this._connections > 0) this.reconnects += 1;
    this._connections += 1;
    this._setState('connecting', { attempt: this._attempt });
    const token = await this._getToken();
    // Offline meanwhile: `online` reconnects.
    if (this._stopped || this._offline) return;
    if (this._user === undefined) this._user = tokenSubject(token);
    this._loadPosition(this._user);
    if (this._transport === 'auto' && this.transport === 'websocket' && this._wsFailed) {
      // A failed WebSocket open counts only if plain HTTP to the nodes works
      // now: a node that is down fails both, and is no reason to leave it.
      this._wsFailed = false;
      this._wsFailures = (await this._httpWorks()) ? this._wsFailures + 1 : 0;
      if (this._stopped || this._offline) return;
      if (this._wsFailures >= AUTO_FALLBACK_FAILURES) this.transport = 'sse';
    }
    const sse = this.transport === 'sse';
    const i = this._nextUrl % this.urls.length;
    const base = sse ? this.sseUrls[i % this.sseUrls.length] : this.urls[i];
    this._nextUrl += 1;
    // On SSE the token goes in a header (fetch can set one; a WebSocket cannot).
    let url = sse ? base : `${base}${base.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}`;
    let sep = url.includes('?') ? '&' : '?';
    // After RESUME_FAILURES_BEFORE_PROBE refused-looking opens, one plain open.
    const probe = this.lastSeq !== null && this._resumeFailures >= RESUME_FAILURES_BEFORE_PROBE;
    const resuming = this.lastSeq !== null && !probe;
    if (resuming) {
      url += `${sep}last_seq=${this.lastSeq}`;
      sep = '&';
      if (this.epoch) url += `&epoch=${encodeURIComponent(this.epoch)}`;
    }
    if (probe) this._dropAtWelcome = 'resume refused';
    const ws = sse ? new SseSocket(url, controlUrlOf(base), token, this._fetch) : new this._WebSocket(url);
    this._ws = ws;
    this._url = base;
    let welcomed = false;
    const timeout = this._clock.setTimeout(() => {
      if (this._ws !== ws || welcomed) return;
      detach(ws);
      this._ws = null;
      try {
        ws.close();
      } catch {
        /* ignore */
      }
      this._failed({ url: base, reason: 'connect timeout' });
    }, this._connectTimeout);
    // Any byte of an event stream counts as alive, its `: ping` comments
    // included (they make no message); on SSE, onmessage also carries the
    // answers to `POST /control`, which say nothing about the stream.
    if (sse) {
      ws.onactivity = () => {
        if (this._ws === ws) this._heard();
      };
    }
    ws.onmessage = (msg) => {
      if (this._ws !== ws) return;
      if (!sse) this._heard();
      let frame;
      try {
        frame = JSON.parse(typeof msg.data === 'string' ? msg.data : String(msg.data));
      } catch (err) {
        this._report(new Error(`bad frame from the server: ${err.message}`));
        return;
      }
      if (frame.type === 'welcome') {
        welcomed = true;
        this._clock.clearTimeout(timeout);
        this._watch();
        if (!sse) {
          this._wsFailures = 0;
          this._wsFailed = false;
        }
      }
      this._frame(frame, base);
    };
    // A refused or failed handshake, or a lost connection: the spec fires
    // `error` then `close` (1006), but some implementations (Node 20's) fire
    // only `error` for a refused upgrade, so whichever comes first decides.
    // `status`: an event stream's HTTP status when it was refused (fetch
    // sees it, a browser's WebSocket does not).
    const ended = (code, reason, status) => {
      this._clock.clearTimeout(timeout);
      if (this._ws !== ws) return;
      this._release(`the socket closed (${code})`);
      if (!welcomed && !sse) this._wsFailed = true;
      if (!welcomed) {
        // On SSE only a 400 can be the node refusing the position; a node
        // that is down or starting (no answer, 503) is not counted, so its
        // return is not taken for a refusal.
        if (resuming && (!sse || status === 400)) this._resumeFailures += 1;
        if (probe) {
          // The plain open failed too: the nodes are unreachable, not
          // refusing the position. Keep it and try it again.
          this._resumeFailures = 0;
          this._dropAtWelcome = null;
        }
      }
      this._closed(code, reason, welcomed, base);
    };
    ws.onclose = (ev) => ended(ev.code, ev.reason ?? '', ev.status);
    ws.onerror = () => {
      ended(1006, '');
      try {
        ws.close();
      } catch {
        /* not open */
      }
    };
  }

  _failed(info) {
    if (this._stopped) return;
    this._attempt += 1;
    this._schedule(backoffDelay(this._attempt, { ...this._backoff, random: this._random }), info);
  }

  _closed(code, reason, welcomed, url) {
    const info = { code, reason, url, welcomed };
    if (FATAL_CLOSE_CODES.has(code)) {
      this._stop({ ...info, fatal: true });
    } else if (QUICK_CLOSE_CODES.has(code)) {
      this._attempt = 0;
      this._schedule(backoffDelay(0, { ...this._backoff, random: this._random }), info);
    } else if (code === TOKEN_EXPIRED) {
      if (typeof this._token !== 'function') {
        // The same token would be refused: nothing a reconnect can fix.
        this._stop({ ...info, fatal: true, reason: 'token expired and no token provider' });
      } else {
        this._attempt = 0;
        this._schedule(backoffDelay(0, { ...this._backoff, random: this._random }), info);
      }
    } else {
      // 1011, 4002, 1006 (no close frame: network loss, a killed node, or a
      // refused handshake, which a browser cannot tell apart), and the rest.
      this._failed(info);
    }
  }

  _frame(frame, url) {
    switch (frame.type) {
      case 'welcome': {
        this._resumeFailures = 0;
        const dropped = this._dropAtWelcome;
        this._dropAtWelcome = null;
        if (dropped === 'resume refused') {
          // A plain open was welcomed where opens with the position were
          // not: the nodes refuse it. Go on live from this welcome.
          this.lastSeq = null;
          this.epoch = null;
        }
        let epoch = frame.epoch ?? '';
        if (!isEpoch(epoch)) {
          this._report(new Error(`welcome with an epoch that is not a decimal string: ${JSON.stringify(frame.epoch)}`));
          epoch = null;
        }
        if (this.epoch !== null && this.epoch !== epoch && this.lastSeq !== null) {
          // A new stream: the old position means nothing in it. The node
          // says so with a stream_reset gap next; if the socket dies before
          // that, the next resume must not pair the old position with the
          // new epoch.
          this.lastSeq = 0;
        }
        if (this.lastSeq === null) {
          if (isPosition(frame.position)) {
            this.lastSeq = frame.position;
          } else {
            this._report(new Error(`welcome with a position that is not a safe integer: ${frame.position}`));
          }
        }
        this.epoch = epoch;
        this._savePosition();
        this._setState('open', { url, node: frame.node, position: frame.position, epoch, transport: this.transport });
        this._scheduleRefresh(frame.exp);
        for (const h of this._welcomeHandlers) this._call(h, frame);
        if (dropped) {
          const gap = { reason: 'position_dropped', from: undefined, to: undefined, earliest: undefined };
          for (const h of this._gapHandlers) this._call(h, gap);
        }
        return;
      }
      case 'event': {
        const seq = frame.seq;
        if (!isPosition(seq)) {
          // Not a position this client can hold or send back: the event is
          // not delivered and the position stays; a resume reads it again
          // from the node with its stored seq.
          this._report(new Error(`event with a seq that is not a safe integer: ${seq}; not delivered`));
          return;
        }
        if (this.lastSeq !== null && seq <= this.lastSeq) {
          this.duplicates += 1;
          return;
        }
        this.lastSeq = seq;
        this._attempt = 0;
        this._savePosition();
        const event = frame.event ?? {};
        const type = typeof event.type === 'string' ? event.type : '';
        const typed = this._handlers.get(type);
        if (typed) for (const h of typed) this._call(h, event, seq);
        if (type.includes('.')) {
          const custom = this._handlers.get('custom');
          if (custom) for (const h of custom) this._call(h, event, seq);
        }
        const all = this._handlers.get('*');
        if (all) for (const h of all) this._call(h, event, seq);
        const message = this.messages.add(event);
        if (message) {
          const firstSeq = isPosition(frame.first_seq) ? frame.first_seq : seq;
          const merged = Number.isSafeInteger(frame.merged) ? frame.merged : 1;
          const m = { ...message, type, seq, firstSeq, merged, event };
          for (const h of this._messageHandlers) this._call(h, m);
        }
        return;
      }
      case 'gap': {
        if (frame.reason === 'stream_reset') {
          this.lastSeq = 0;
        } else if (isPosition(frame.to)) {
          this.lastSeq = Math.max(this.lastSeq ?? 0, frame.to);
        } else if (frame.to !== undefined) {
          this._report(new Error(`gap with a bound that is not a safe integer: ${frame.to}; position kept`));
        }
        this._savePosition();
        const gap = { reason: frame.reason, from: frame.from, to: frame.to, earliest: frame.earliest };
        for (const h of this._gapHandlers) this._call(h, gap);
        return;
      }
      case 'control_reply':
      case 'control_error': {
        const pending = this._pending.get(frame.id);
        if (!pending) return;
        this._pending.delete(frame.id);
        if (frame.type === 'control_reply') pending.resolve(frame.data ?? {});
        else pending.reject(new ControlError(String(frame.code), frame.message));
        return;
      }
      case 'refreshed':
        this._scheduleRefresh(frame.exp);
        return;
      case 'error':
        // The old expiry stands: the close at it reconnects with a new token.
        if (frame.code === 'refresh_refused') this._report(new Error(`token refresh refused: ${frame.message}`));
        return;
      // `reconnect`: the close that follows says what to do. `pong`: the
      // answer to the stall check's `ping`; its arrival was counted already.
      default:
        return;
    }
  }
}

/** `ws(s)://host/path/ws` -> `http(s)://host/path/sse`. */
function sseUrlOf(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : u.protocol === 'ws:' ? 'http:' : u.protocol;
  u.pathname = u.pathname.replace(/\/ws$/, '') + '/sse';
  return u.href;
}

/** The `POST /control` URL beside an event-stream URL. */
function controlUrlOf(sseUrl) {
  const u = new URL(sseUrl);
  u.search = '';
  u.pathname = u.pathname.replace(/\/sse$/, '') + '/control';
  return u.href;
}

/**
 * An event stream (`GET /sse`, read with fetch) with the surface of a
 * WebSocket the client uses: `onmessage({data})` per frame, `onclose({code,
 * reason})` once (the `close` event's code, else 1006), `send()` for control
 * frames (as `POST /control`, the answer handed to `onmessage`), `close()`.
 * fetch rather than EventSource: it can send the token in a header, and it
 * does not reconnect on its own (the client does, from its position).
 */
class SseSocket {
  constructor(url, controlUrl, token, fetchImpl) {
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    /** Called for every chunk read from the stream, comments included. */
    this.onactivity = null;
    this._controlUrl = controlUrl;
    this._auth = `Bearer ${token}`;
    this._fetch = fetchImpl;
    this._abort = new AbortController();
    this._ended = false;
    this._run(url);
  }

  async _run(url) {
    let res;
    try {
      res = await this._fetch(url, {
        headers: { Accept: 'text/event-stream', Authorization: this._auth },
        signal: this._abort.signal,
        cache: 'no-store',
      });
    } catch {
      return this._end(1006, '');
    }
    // A refusal (401, 429, 503 ...): as a refused WebSocket upgrade.
    if (!res.ok || !res.body) return this._end(1006, `HTTP ${res.status}`, res.status);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        this.onactivity?.();
        buf += value;
        let end;
        while (!this._ended && (end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          this._block(block);
        }
        if (this._ended) return;
      }
    } catch {
      /* aborted, or the connection failed */
    }
    this._end(1006, '');
  }

  _block(block) {
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length === 0) return;
    const text = data.join('\n');
    if (event === 'close') {
      let f = {};
      try {
        f = JSON.parse(text);
      } catch {
        /* a close without its details */
      }
      this._end(Number.isInteger(f.code) ? f.code : 1006, typeof f.reason === 'string' ? f.reason : '');
      return;
    }
    this.onmessage?.({ data: text });
  }

  _end(code, reason, status) {
    if (this._ended) return;
    this._ended = true;
    this._abort.abort();
    this.onclose?.({ code, reason, status });
  }

  send(text) {
    if (this._ended) throw new Error('the stream is closed');
    const answer = (body) => {
      if (!this._ended) this.onmessage?.({ data: body });
    };
    this._fetch(this._controlUrl, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: this._auth },
      body: text,
    })
      .then((res) => res.text())
      .then(answer)
      // Lost: the request stays pending until the stream ends, which rejects it.
      .catch(() => {});
  }

  close() {
    this._end(1000, '');
  }
}

function addTo(set, handler) {
  set.add(handler);
  return () => set.delete(handler);
}

function detach(ws) {
  ws.onactivity = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}
