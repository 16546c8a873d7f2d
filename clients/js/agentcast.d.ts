// Type definitions for the agentcast JavaScript client (agentcast.js).

/** First reconnect delay ceiling in ms; doubles per failed attempt. */
export const BACKOFF_BASE_MS: number;
/** Largest reconnect delay ceiling in ms. */
export const BACKOFF_MAX_MS: number;
/** Time allowed to open a socket and read its welcome, in ms. */
export const CONNECT_TIMEOUT_MS: number;
/**
 * Default `stallTimeout` (30000 ms): 1.5 times the node's default ping
 * interval (20 s), so an event stream's `: ping` comments always fit in it.
 */
export const STALL_TIMEOUT_MS: number;
/**
 * Time a `ping` frame gets for any frame to come back (5000 ms, at most half
 * the stallTimeout), after a quiet period and when the page wakes.
 */
export const PROBE_TIMEOUT_MS: number;
/** The built-in event types. */
export const EVENT_TYPES: readonly BuiltinEventType[];

/** Full jitter: uniform in [0, min(max, base * 2^attempt)), in ms. */
export function backoffDelay(
  attempt: number,
  opts?: { base?: number; max?: number; random?: () => number },
): number;

/** The `sub` claim of a JWT, read without verification; undefined if unreadable. */
export function tokenSubject(token: string): string | undefined;

/** The common envelope fields (docs/publishing.md §2). */
export interface EnvelopeBase<T extends string, D> {
  type: T;
  run_id?: string;
  thread_id?: string;
  agent?: string;
  timestamp?: string;
  data: D;
  [extra: string]: unknown;
}

export type AgentStarted = EnvelopeBase<'agent_started', { input?: unknown; [k: string]: unknown }>;
export type AgentThinking = EnvelopeBase<'agent_thinking', { text?: string; [k: string]: unknown }>;
export type ToolExecuting = EnvelopeBase<'tool_executing', { tool?: string; args?: unknown; [k: string]: unknown }>;
export type ToolCompleted = EnvelopeBase<'tool_completed', { tool?: string; result?: unknown; [k: string]: unknown }>;
export type AgentCompleted = EnvelopeBase<'agent_completed', { output?: unknown; [k: string]: unknown }>;
/** A delta event (docs/publishing.md §10): `delta` appends to message `message_id`. */
export type MessageDelta = EnvelopeBase<'message_delta', Record<string, unknown>> & { message_id: string; delta: string };
export type AgentError = EnvelopeBase<'error', { code?: string; message?: string; [k: string]: unknown }>;
/** A custom event: its type is `<namespace>.<name>`. */
export type CustomEvent = EnvelopeBase<`${string}.${string}`, Record<string, unknown>>;

export interface EventMap {
  agent_started: AgentStarted;
  agent_thinking: AgentThinking;
  message_delta: MessageDelta;
  tool_executing: ToolExecuting;
  tool_completed: ToolCompleted;
  agent_completed: AgentCompleted;
  error: AgentError;
  custom: CustomEvent;
  '*': AgentcastEvent;
}

export type BuiltinEventType = Exclude<keyof EventMap, 'custom' | '*'>;
/** Any event as published; the node forwards any JSON object. */
export type AgentcastEvent =
  | AgentStarted
  | AgentThinking
  | MessageDelta
  | ToolExecuting
  | ToolCompleted
  | AgentCompleted
  | AgentError
  | CustomEvent
  | EnvelopeBase<string, unknown>;

/**
 * The server's gap frame, as it said it (docs/protocol.md §3, §8), or
 * `position_dropped` from the client itself: it dropped a position it could
 * not use (a stored one that is not a safe integer, or one the nodes kept
 * refusing) and started live from the welcome; anything before may be missing.
 */
export interface Gap {
  reason: 'expired' | 'stream_reset' | 'unavailable' | 'position_dropped' | string;
  /** First sequence that may be missing; absent for stream_reset and position_dropped. */
  from?: number;
  /** Last sequence that may be missing; absent for stream_reset. */
  to?: number;
  /** The user's oldest stored event, when known. */
  earliest?: number;
}

export interface Welcome {
  type: 'welcome';
  node: string;
  user: string;
  position: number;
  epoch: string;
  /** The token's exp (Unix seconds); absent from nodes before token refresh. */
  exp?: number;
}

/**
 * 'idle' (not started), 'connecting', 'open' (welcomed), 'waiting' (backing
 * off), 'stalled' (nothing came in time: the socket was closed and a
 * reconnect follows at once), 'offline' (the browser has no network: no
 * attempts until it says `online`), 'closed' (stopped for good).
 */
export type ConnectionState = 'idle' | 'connecting' | 'open' | 'waiting' | 'stalled' | 'offline' | 'closed';

/** What comes with a state change; which fields are set depends on the state. */
export interface StateInfo {
  /** Failed attempts so far ('connecting', 'waiting'). */
  attempt?: number;
  /** Delay before the next attempt in ms ('waiting'). */
  delay?: number;
  /** The node URL ('open', 'stalled', and after a close). */
  url?: string;
  /** Close code of the socket that ended (1006: no close frame, or a refused handshake). */
  code?: number;
  /** Close reason text, or why the client stopped. */
  reason?: string;
  /** Whether the socket that ended had been welcomed. */
  welcomed?: boolean;
  /** The transport of the connection that opened ('open') or stalled ('stalled'). */
  transport?: 'websocket' | 'sse';
  /** 'stalled' only: ms since anything was last received on the connection. */
  quiet?: number;
  /** 'closed' only: the client stopped because a reconnect cannot help. */
  fatal?: boolean;
  /** 'open' only. */
  node?: string;
  position?: number;
  epoch?: string;
  /** A token provider or setup error that made the attempt fail. */
  error?: unknown;
}

/** Timers and time for the client; the real ones by default, a fake one in tests. */
export interface AgentcastClock {
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(timer: unknown): void;
  /** Milliseconds, as Date.now(). */
  now(): number;
}

/** The part of a browser window the client follows: `online`, `offline`, and its document's `visibilitychange`. */
export interface WindowLike {
  addEventListener(type: string, listener: () => void): void;
  removeEventListener(type: string, listener: () => void): void;
  document?: {
    visibilityState: string;
    addEventListener(type: string, listener: () => void): void;
    removeEventListener(type: string, listener: () => void): void;
  };
}

/** sessionStorage, localStorage, or anything with the same three methods. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}
/** A Map<string, string> works too. */
export interface MapLike {
  get(key: string): string | undefined;
  set(key: string, value: string): unknown;
  delete(key: string): unknown;
}

export interface AgentcastOptions {
  /** Node URL(s) such as `wss://events.example.com/ws`; reconnects go to the next one. */
  url: string | string[];
  /** A token, or a function returning one (or a promise of one), called before every connection. */
  token: string | (() => string | Promise<string>);
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocket;
  /** Where the position is kept; default `globalThis.sessionStorage`; `null` keeps it in memory only. */
  storage?: StorageLike | MapLike | null;
  /** Storage key; default `agentcast:<urls joined by a space>:<user>`. */
  storageKey?: string;
  /** User id for the storage key; default the token's `sub`. */
  user?: string;
  /** Start from this position instead of the stored one or live: an integer from 0 to 2^53-1, else a TypeError. */
  lastSeq?: number;
  /** The epoch that goes with `lastSeq`: a decimal string, else a TypeError. */
  epoch?: string;
  /** Backoff base in ms (default BACKOFF_BASE_MS). */
  backoffBase?: number;
  /** Backoff ceiling in ms (default BACKOFF_MAX_MS). */
  backoffMax?: number;
  /** Time for a socket to open and be welcomed, in ms (default CONNECT_TIMEOUT_MS). */
  connectTimeout?: number;
  /** Random source in [0, 1) for the jitter (default Math.random). */
  random?: () => number;
  /**
   * The longest a dead connection goes unnoticed, in ms (default STALL_TIMEOUT_MS;
   * from 1 to 2^31-1, else a TypeError). Any frame received proves the connection
   * alive. On a WebSocket, quiet for stallTimeout minus the probe time
   * (PROBE_TIMEOUT_MS, at most half the stallTimeout) sends a `ping` frame, and nothing
   * by stallTimeout is a stall. On an event stream, which cannot be asked, nothing
   * (the node's `: ping` comments included) for stallTimeout is a stall: keep it above
   * the node's `--ping-interval` there.
   */
  stallTimeout?: number;
  /**
   * Where `online`, `offline` and `visibilitychange` (on `window.document`) come from;
   * default `globalThis`. Without addEventListener or a document (Node), none are followed.
   */
  window?: WindowLike | null;
  /** For tests: timers and time (default the real setTimeout, clearTimeout and Date.now). */
  clock?: AgentcastClock;
  /**
   * 'websocket' (default); 'sse': Server-Sent Events from `/sse`, control requests as
   * `POST /control`; 'auto': WebSocket, then SSE once AUTO_FALLBACK_FAILURES opens in a row
   * failed while the node's `/readyz` answers 200 over plain HTTP.
   */
  transport?: 'websocket' | 'sse' | 'auto';
  /** Event-stream URLs, one per `url`; default each `url` with ws(s) -> http(s) and `/ws` -> `/sse`. */
  sseUrls?: string[];
  /** fetch, for the sse and auto transports; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  onState?: (state: ConnectionState, info: StateInfo) => void;
  onGap?: (gap: Gap) => void;
  onWelcome?: (welcome: Welcome) => void;
  onError?: (error: unknown) => void;
  onMessage?: (message: StreamedText) => void;
  /** Messages whose text is kept for onMessage (default MAX_MESSAGES). */
  maxMessages?: number;
}

/** One frame of streamed text, as given to onMessage. */
export interface StreamedText {
  messageId: string;
  /** The event's type (message_delta, agent_thinking, ...). */
  type: string;
  /** The text this frame appends (several deltas' when merged). */
  delta: string;
  /** The message's text so far on this client. */
  text: string;
  /** The frame's seq (its last delta's). */
  seq: number;
  /** The seq of its first delta: `seq` when the frame merges nothing. */
  firstSeq: number;
  /** Deltas in the frame: 1 when it merges nothing. */
  merged: number;
  /** The (last) event's object, with the frame's `delta`. */
  event: AgentcastEvent;
}

/** Messages whose text a client keeps; the one with the oldest delta is forgotten past it. */
export const MAX_MESSAGES: number;

/** Assembles streamed text from delta events, merged or not. */
export class Messages {
  constructor(max?: number);
  /** Appends a delta event's text; null when the event is not a delta event. */
  add(event: unknown): { messageId: string; delta: string; text: string } | null;
  text(messageId: string): string | undefined;
  clear(): void;
}

/** The `transport` option's values. */
export const TRANSPORTS: readonly ['websocket', 'sse', 'auto'];
/** WebSocket opens in a row that fail before `auto` tries SSE. */
export const AUTO_FALLBACK_FAILURES: number;
/** With a token provider, the token is refreshed this long (ms) before the welcome's `exp`, at most. */
export const REFRESH_MARGIN_MS: number;

/** Failed opens in a row with a position before one open without it (see the README). */
export const RESUME_FAILURES_BEFORE_PROBE: number;
/** A position the client stores and sends: an integer from 0 to 2^53-1. */
export function isPosition(seq: unknown): seq is number;
/** An epoch the client stores and sends: a decimal string of at most 20 digits. */
export function isEpoch(epoch: unknown): epoch is string;

export class AgentcastClient {
  constructor(options: AgentcastOptions);
  readonly urls: string[];
  readonly sseUrls: string[];
  /** The transport of the current or last connection. */
  readonly transport: 'websocket' | 'sse';
  readonly state: ConnectionState;
  /** The last `seq` delivered (or resumed from, or the welcome's position); null before any. */
  readonly lastSeq: number | null;
  /** The epoch of the last welcome, or the one resumed with. */
  readonly epoch: string | null;
  /** Events dropped because their `seq` was not after the last one. */
  readonly duplicates: number;
  /** Reconnections made, not counting the first connection. */
  readonly reconnects: number;
  /** Times the token (or the provider) was used. */
  readonly tokenRequests: number;

  /** Handler per event type, 'custom' (types with a `.`) or '*' (all). Returns a remover. */
  on<K extends keyof EventMap>(type: K, handler: (event: EventMap[K], seq: number) => void): () => void;
  on(type: string, handler: (event: AgentcastEvent, seq: number) => void): () => void;
  onState(handler: (state: ConnectionState, info: StateInfo) => void): () => void;
  onGap(handler: (gap: Gap) => void): () => void;
  onWelcome(handler: (welcome: Welcome) => void): () => void;
  /** A handler threw, a frame was not JSON, or a frame's seq, position, gap bound or epoch could not be held; the stream goes on. */
  onError(handler: (error: unknown) => void): () => void;
  /** Streamed text: one call per frame carrying a delta event, with the text so far. */
  onMessage(handler: (message: StreamedText) => void): () => void;
  /** The text so far of each message seen by this client. */
  readonly messages: Messages;

  /** Starts connecting; returns the client. */
  connect(): this;
  /** Closes the socket (code 1000) and stops reconnecting. */
  close(): void;
  /**
   * Sends a control request to the user's agents and resolves with the
   * agent's reply; rejects with a ControlError (docs/protocol.md §9). Sent
   * at most once: never resent after a reconnect.
   */
  control(data: Record<string, unknown>): Promise<Record<string, unknown>>;
}

/** Largest client frame a node accepts, in bytes. */
export const MAX_CLIENT_FRAME_BYTES: number;
/** Not sent: the client was not open. */
export const CONTROL_NOT_CONNECTED: 'not_connected';
/** Not sent: data was not a JSON object. */
export const CONTROL_BAD_DATA: 'bad_data';
/** Not sent: the frame would be over MAX_CLIENT_FRAME_BYTES. */
export const CONTROL_TOO_BIG: 'too_big';
/** The socket ended before the answer; an agent may have received the request. */
export const CONTROL_SOCKET_CLOSED: 'socket_closed';

export type ControlErrorCode =
  | 'no_agent'
  | 'timeout'
  | 'rate_limited'
  | 'too_many_pending'
  | 'bad_reply'
  | 'disabled'
  | 'bad_frame'
  | 'unavailable'
  | 'not_connected'
  | 'bad_data'
  | 'too_big'
  | 'socket_closed';

/** Why a control request got no reply. */
export class ControlError extends Error {
  constructor(code: string, message?: string);
  readonly code: ControlErrorCode;
}
