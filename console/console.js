// The agentcast console: one user's stream as the browser client sees it.
// Served by the node at /console/ (src/console.rs); no build step, no
// dependencies beyond the client the node serves beside it.
//
// The token comes from the URL fragment (#token=...), which browsers do not
// send to the server, or from the form. It is kept in this tab's
// sessionStorage and removed from the address bar, so it does not end up in
// history, bookmarks or screenshots.
//
// What the page has shown is kept in sessionStorage too, written in the same
// task as the client's position, so a reload resumes after the last event
// shown and still shows the runs seen before it.
//
// A run in progress has a Stop button: it sends the control request
// {"action":"cancel","run_id":...} through the client (docs/protocol.md
// section 9) and shows the agent's answer or the error code. The run shows as
// cancelled only when its agent_completed with {"status":"cancelled"}
// arrives: the reply says the agent took the request, the event says the run
// is over.
//
// Streamed text (delta events, docs/publishing.md section 10) grows in one
// line per message: each delta appends to it, whether a node merged several
// into one frame or not, and the saved view keeps the text so far in that
// line's entry, so a reload shows it and the live deltas go on appending.
//
// The header says in plain words how the connection is (live, connecting,
// reconnecting, offline, stalled, closed: the client's states, see
// clients/js/README.md "Dead connections") and how long ago the last event
// came, so a reader can tell a quiet agent from a dead connection.

import { AgentcastClient, TRANSPORTS, tokenSubject } from './agentcast.js';

/** Events kept for a reload; older ones leave the page and the saved view. */
const MAX_KEPT_EVENTS = 500;
/** Gap notices kept; each is one line, and more than this is a broken stream. */
const MAX_KEPT_NOTICES = 50;
/** Characters of an event's data shown in its line; the rest is in the tooltip. */
const MAX_SUMMARY_CHARS = 160;
/** "last event … ago" counts whole seconds: it is redrawn as each one passes. */
const SINCE_REFRESH_MS = 1000;
const TOKEN_KEY = 'agentcast-console:token';
const TRANSPORT_KEY = 'agentcast-console:transport';
/** Read before the token is taken out of the URL. */
const HASH = new URLSearchParams(location.hash.slice(1));

/**
 * The client's transport: `#transport=websocket|sse|auto` in the URL (kept
 * for the tab), else `auto`: the WebSocket, and Server-Sent Events where a
 * proxy drops WebSocket upgrades.
 */
function readTransport() {
  const store = storage();
  const asked = HASH.get('transport');
  if (asked && TRANSPORTS.includes(asked)) {
    try {
      store?.setItem(TRANSPORT_KEY, asked);
    } catch {
      /* storage disabled: this page only */
    }
    return asked;
  }
  try {
    const kept = store?.getItem(TRANSPORT_KEY);
    if (kept && TRANSPORTS.includes(kept)) return kept;
  } catch {
    /* storage disabled */
  }
  return 'auto';
}
const VIEW_KEY_PREFIX = 'agentcast-console:view:';
/** Heading for events that carry no run_id. */
const NO_RUN = '(no run)';

const $ = (id) => document.getElementById(id);

/** Per-type label and how a run's status changes when the event arrives. */
const KINDS = {
  agent_started: { label: 'started', status: 'running' },
  agent_thinking: { label: 'thinking' },
  message_delta: { label: 'answer' },
  tool_executing: { label: 'tool' },
  tool_completed: { label: 'tool done' },
  agent_completed: { label: 'completed', status: 'completed' },
  error: { label: 'error', status: 'failed' },
};

/** The message a delta event appends to, or null when it is not one. */
function messageOf(event) {
  const id = event.message_id;
  return typeof id === 'string' && id && typeof event.delta === 'string' ? id : null;
}

/** A run's status after `event`, or undefined when the event does not change it. */
function statusAfter(event) {
  if (event.type === 'agent_completed' && event.data?.status === 'cancelled') return 'cancelled';
  return KINDS[event.type]?.status;
}

/** One line for the answer to a Stop: the agent's status, or the whole reply. */
function replyText(reply) {
  return typeof reply.status === 'string' ? reply.status : JSON.stringify(reply);
}

function storage() {
  try {
    return window.sessionStorage;
  } catch {
    return null;
  }
}

function readToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const fromUrl = params.get('token');
  const store = storage();
  if (fromUrl) {
    try {
      store?.setItem(TOKEN_KEY, fromUrl);
    } catch {
      /* storage disabled: the token lives only in this page */
    }
    history.replaceState(null, '', location.pathname + location.search);
    return fromUrl;
  }
  try {
    return store?.getItem(TOKEN_KEY) ?? null;
  } catch {
    return null;
  }
}

/** One line of text for an event's data. */
function summary(event) {
  const d = event.data ?? {};
  const text = (v) => (typeof v === 'string' ? v : JSON.stringify(v));
  let s;
  switch (event.type) {
    case 'agent_started':
      s = d.input !== undefined ? text(d.input) : '';
      break;
    case 'agent_thinking':
      s = d.text !== undefined ? text(d.text) : '';
      break;
    case 'tool_executing':
      s = `${d.tool ?? '?'}(${d.args !== undefined ? text(d.args) : ''})`;
      break;
    case 'tool_completed':
      s = `${d.tool ?? '?'} → ${d.result !== undefined ? text(d.result) : ''}`;
      break;
    case 'agent_completed':
      s = d.output !== undefined ? text(d.output) : d.status !== undefined ? text(d.status) : '';
      break;
    case 'error':
      s = [d.code, d.message].filter(Boolean).join(': ');
      break;
    default:
      s = JSON.stringify(d);
  }
  return s.length > MAX_SUMMARY_CHARS ? `${s.slice(0, MAX_SUMMARY_CHARS)}…` : s;
}

/** A gap frame in plain words. */
function gapText(gap) {
  const range =
    typeof gap.from === 'number' && typeof gap.to === 'number'
      ? gap.from === gap.to
        ? `Event ${gap.from} may be missing`
        : `Events ${gap.from} to ${gap.to} may be missing`
      : 'Some events may be missing';
  switch (gap.reason) {
    case 'expired':
      return `${range}: the stream removed them (its age, size or per-user limit) before this page could read them.`;
    case 'stream_reset':
      return 'The stream was recreated, so the position this page had no longer exists. What follows is everything the new stream holds.';
    case 'unavailable':
      return `${range}: the node could not read them from NATS.`;
    case 'position_dropped':
      return 'The position this page had could not be used (not a valid number, or refused by the nodes), so it goes on live from now: earlier events may be missing.';
    default:
      return `${range} (${gap.reason}).`;
  }
}

/** How long ago, `ms` milliseconds, in plain words: "12 s ago", "3 min ago". */
function agoText(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s ago`;
  const min = Math.floor(s / 60);
  return min < 60 ? `${min} min ago` : `${Math.floor(min / 60)} h ago`;
}

/**
 * The connection's state in plain words. `opened`: a connection was live
 * before (so a new one is a reconnect); `stall`: what the last stall said,
 * shown while the reconnect that follows it runs (the client reports
 * `stalled` and starts connecting in the same moment).
 */
function stateText(state, info, opened, stall) {
  switch (state) {
    case 'connecting':
      if (!opened && !info.attempt) return 'connecting…';
      return stall ? `reconnecting… (${stall})` : 'reconnecting…';
    case 'open':
      return 'live';
    case 'waiting': {
      const why = info.reason || (info.code ? `closed with ${info.code}` : 'connection lost');
      return `reconnecting in ${(info.delay / 1000).toFixed(1)} s (${why})`;
    }
    case 'stalled':
      return `stalled: ${stallText(info)}`;
    case 'offline':
      return 'offline: waiting for the network';
    case 'closed':
      return `closed: ${info.reason || 'closed'}`;
    default:
      return state;
  }
}

/** What a stall's info says: how long nothing came on the connection. */
function stallText(info) {
  if (typeof info.quiet !== 'number') return 'nothing received';
  return `nothing received for ${Math.round(info.quiet / 1000)} s`;
}

class Console {
  constructor(token) {
    this.user = tokenSubject(token) ?? '';
    this.viewKey = VIEW_KEY_PREFIX + this.user;
    this.events = []; // [{seq, event}], oldest first
    this.notices = [];
    this.runs = new Map(); // run id -> {section, list, status}
    /** Streamed messages shown: `${run}\n${type}\n${message_id}` -> {entry, li, textEl}. */
    this.messages = new Map();
    const saved = this.load();
    /** The stream epoch the shown events belong to (null: not known yet). */
    this.epoch = typeof saved.epoch === 'string' ? saved.epoch : null;
    /** When the last event arrived (Date.now(); null: none yet), kept across a reload. */
    this.lastEventAt = typeof saved.lastEventAt === 'number' ? saved.lastEventAt : null;
    /** Whether a connection was live yet: the next one is a reconnect. */
    this.opened = false;
    /** The last stall in words, until the reconnect after it is live. */
    this.stall = null;
    // A streamed message's entry also holds the seq of its last delta.
    this.resumedFrom = saved.events.length ? Math.max(...saved.events.map((e) => e.last ?? e.seq)) : null;
    for (const e of saved.events) this.show(e.seq, e.event, e.last);
    for (const n of saved.notices) this.notice(n, false);
    $('user').textContent = this.user || '(unknown)';
    $('count').textContent = String(this.events.length);
    this.sinceTimer = null;
    this.since();
    if (this.resumedFrom !== null) {
      $('position').dataset.resumedFrom = String(this.resumedFrom);
      $('detail').textContent = `Resumed in this tab after event ${this.resumedFrom}.`;
    }

    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    this.client = new AgentcastClient({
      url: `${scheme}://${location.host}/ws`,
      token,
      user: this.user,
      transport: readTransport(),
    });
    this.client.onState((state, info) => this.state(state, info));
    this.client.onWelcome((w) => {
      const epoch = w.epoch ?? '';
      if (this.epoch !== null && this.epoch !== epoch) {
        // A new stream: the events shown belong to the old one and their
        // seqs mean nothing in the new one. The node sends a stream_reset
        // gap next, which the notices show.
        this.clear();
      }
      this.epoch = epoch;
      this.save();
      $('node').textContent = w.node;
      $('epoch').textContent = w.epoch || '–';
      this.position();
    });
    this.client.onGap((gap) => {
      this.notice({ text: gapText(gap), reason: gap.reason, from: gap.from, to: gap.to }, true);
      this.position();
    });
    this.client.onError((err) => {
      $('detail').textContent = `Error: ${err.message}`;
    });
    this.client.on('*', (event, seq) => {
      this.lastEventAt = Date.now();
      this.since();
      this.show(seq, event);
      this.save();
      this.position();
    });
    this.client.connect();
  }

  load() {
    try {
      const raw = storage()?.getItem(this.viewKey);
      const v = raw ? JSON.parse(raw) : null;
      if (v && Array.isArray(v.events) && Array.isArray(v.notices)) return v;
    } catch {
      /* unreadable: start with an empty view */
    }
    return { events: [], notices: [] };
  }

  save() {
    try {
      const view = { epoch: this.epoch, lastEventAt: this.lastEventAt, events: this.events, notices: this.notices };
      storage()?.setItem(this.viewKey, JSON.stringify(view));
    } catch {
      /* storage full or disabled: a reload starts with an empty view */
    }
  }

  /** Forgets every event shown (the notices stay). */
  clear() {
    this.events = [];
    this.runs.clear();
    this.messages.clear();
    $('runs').replaceChildren();
    $('position').removeAttribute('data-resumed-from');
  }

  state(state, info) {
    if (state === 'stalled') this.stall = `stalled: ${stallText(info)}`;
    const el = $('state');
    el.dataset.state = state;
    el.textContent = stateText(state, info, this.opened, this.stall);
    if (state === 'open') {
      this.opened = true;
      this.stall = null;
    }
    // Which transport carries the page: `websocket` or `sse` (title and tests).
    if (info.transport) {
      el.dataset.transport = info.transport;
      el.title = info.transport === 'sse' ? 'connected over Server-Sent Events' : 'connected over a WebSocket';
    }
    if (state === 'closed' && info.fatal) {
      $('detail').textContent =
        'The node refused this token or the stream for good; open the page with a fresh token (#token=…).';
    }
  }

  /**
   * Redraws how long ago the last event came, and again when the next whole
   * second since it passes (a fixed interval would lag by up to a second).
   */
  since() {
    clearTimeout(this.sinceTimer);
    if (this.lastEventAt === null) {
      $('since').textContent = 'none yet';
      return;
    }
    const ago = Math.max(0, Date.now() - this.lastEventAt);
    $('since').textContent = agoText(ago);
    this.sinceTimer = setTimeout(() => this.since(), SINCE_REFRESH_MS - (ago % SINCE_REFRESH_MS));
  }

  position() {
    const c = this.client;
    $('position').textContent = c.lastSeq === null ? '–' : String(c.lastSeq);
    $('count').textContent = String(this.events.length);
  }

  notice(n, persist) {
    this.notices.push(n);
    const p = document.createElement('p');
    p.className = 'gap';
    p.dataset.reason = n.reason ?? '';
    if (typeof n.from === 'number') p.dataset.from = String(n.from);
    if (typeof n.to === 'number') p.dataset.to = String(n.to);
    p.textContent = n.text;
    $('notices').prepend(p);
    while (this.notices.length > MAX_KEPT_NOTICES) {
      this.notices.shift();
      $('notices').lastElementChild?.remove();
    }
    if (persist) this.save();
  }

  run(id) {
    let run = this.runs.get(id);
    if (run) return run;
    const section = document.createElement('section');
    section.className = 'run';
    section.dataset.run = id;
    const h = document.createElement('h2');
    const name = document.createElement('span');
    name.textContent = id;
    const status = document.createElement('span');
    status.className = 'status';
    const side = document.createElement('span');
    side.className = 'side';
    // What the agent said to a Stop, or why the request failed.
    const answer = document.createElement('span');
    answer.className = 'control';
    const stop = document.createElement('button');
    stop.type = 'button';
    stop.className = 'stop';
    stop.textContent = 'Stop';
    stop.hidden = true;
    side.append(answer, stop, status);
    h.append(name, side);
    const list = document.createElement('ol');
    section.append(h, list);
    // Newest run first: the one being watched is at the top.
    $('runs').prepend(section);
    run = { section, list, status, stop, answer };
    if (id !== NO_RUN) stop.addEventListener('click', () => this.stop(id, run));
    this.runs.set(id, run);
    return run;
  }

  /**
   * Asks the agents to cancel run `id`. Sent once (the client never resends
   * a control request); the button stays disabled until the answer, and
   * after it while the agent says `cancelled`.
   */
  async stop(id, run) {
    run.stop.disabled = true;
    run.stop.textContent = 'Stopping…';
    run.answer.textContent = '';
    delete run.answer.dataset.code;
    delete run.answer.dataset.reply;
    try {
      const reply = await this.client.control({ action: 'cancel', run_id: id });
      run.answer.dataset.reply = replyText(reply);
      run.answer.textContent = `stop: ${replyText(reply)}`;
      run.stop.textContent = 'Stop';
      // Taken: the cancelled event ends the run. Anything else (a run the
      // agent does not know, already over): the button may be tried again.
      run.stop.disabled = reply.status === 'cancelled';
    } catch (err) {
      const code = err?.code ?? 'failed';
      run.answer.dataset.code = code;
      run.answer.textContent = `stop failed: ${code}`;
      run.answer.title = err?.message ?? '';
      run.stop.textContent = 'Stop';
      run.stop.disabled = false;
    }
  }

  /** Sets a run's status; the Stop button is there only while it runs. */
  setStatus(run, status) {
    run.status.textContent = status;
    run.section.dataset.status = status;
    run.stop.hidden = status !== 'running' || run.section.dataset.run === NO_RUN;
  }

  /** Shows an event; `last`: a saved message's last delta seq. */
  show(seq, event, last = seq) {
    const id = typeof event.run_id === 'string' && event.run_id ? event.run_id : NO_RUN;
    const messageId = messageOf(event);
    const key = messageId === null ? null : `${id}\n${event.type}\n${messageId}`;
    const shown = key === null ? undefined : this.messages.get(key);
    if (shown) {
      // The message's line grows; its entry keeps the text so far.
      shown.entry.event = { ...event, delta: shown.entry.event.delta + event.delta };
      shown.entry.last = seq;
      shown.li.dataset.lastSeq = String(seq);
      shown.textEl.textContent = shown.entry.event.delta;
      shown.li.title = JSON.stringify(shown.entry.event);
      const run = this.run(id);
      if ($('runs').firstElementChild !== run.section) $('runs').prepend(run.section);
      return;
    }
    const entry = { seq, event };
    this.events.push(entry);
    const run = this.run(id);
    const kind = KINDS[event.type];
    const li = document.createElement('li');
    li.className = `event ${kind ? event.type : 'custom'}`;
    if (event.type === 'agent_completed' && event.data?.status === 'cancelled') li.classList.add('cancelled');
    li.dataset.seq = String(seq);
    li.dataset.type = String(event.type ?? '');
    const seqEl = document.createElement('span');
    seqEl.className = 'seq';
    seqEl.textContent = `#${seq}`;
    const typeEl = document.createElement('span');
    typeEl.className = 'type';
    typeEl.textContent = kind ? kind.label : String(event.type ?? '?');
    const textEl = document.createElement('span');
    textEl.className = 'text';
    textEl.textContent = summary(event);
    if (key !== null) {
      // Streamed text is shown whole: it is what the reader came for.
      entry.last = last;
      li.classList.add('message');
      li.dataset.message = messageId;
      li.dataset.lastSeq = String(last);
      textEl.textContent = event.delta;
      this.messages.set(key, { entry, li, textEl });
    }
    li.title = JSON.stringify(event);
    li.append(seqEl, typeEl, textEl);
    run.list.append(li);
    const status = statusAfter(event);
    if (status) {
      this.setStatus(run, status);
    } else if (!run.section.dataset.status) {
      this.setStatus(run, 'running');
    }
    // The run that moved last goes to the top.
    if ($('runs').firstElementChild !== run.section) $('runs').prepend(run.section);
    while (this.events.length > MAX_KEPT_EVENTS) this.forget();
  }

  /** Drops the oldest event from the view, and its run when it was the last. */
  forget() {
    const old = this.events.shift();
    for (const [key, m] of this.messages) if (m.entry === old) this.messages.delete(key);
    const el = document.querySelector(`li[data-seq="${old.seq}"]`);
    const list = el?.parentElement;
    el?.remove();
    if (list && list.children.length === 0) {
      const section = list.parentElement;
      this.runs.delete(section.dataset.run);
      section.remove();
    }
  }
}

function start() {
  const token = readToken();
  if (token) {
    new Console(token);
    return;
  }
  const form = $('login');
  form.hidden = false;
  $('state').textContent = 'no token';
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = $('token-input').value.trim();
    if (!value) return;
    form.hidden = true;
    try {
      storage()?.setItem(TOKEN_KEY, value);
    } catch {
      /* kept in this page only */
    }
    new Console(value);
  });
}

start();
