// Type declarations for @chat-gateway/client.

export declare const VERSION: string;

export declare const State: {
  readonly DISCONNECTED: "disconnected";
  readonly CONNECTING: "connecting";
  readonly CONNECTED: "connected";
  readonly CLOSED: "closed";
};
export type State = (typeof State)[keyof typeof State];

export declare const CloseCode: {
  readonly NORMAL: 1000;
  readonly GOING_AWAY: 1001;
  readonly ABNORMAL: 1006;
  readonly POLICY_VIOLATION: 1008;
  readonly TRY_AGAIN_LATER: 1013;
  readonly NO_PONG: 4000;
  readonly SERVER_DISCONNECT: 4001;
  readonly GAP: 4002;
};

/**
 * A stored message (`Message` in the gateway's `/openapi.json`). A message never
 * changed has no `version`, `edited_at` or `deleted_at`; once changed it has all three,
 * with `edited_at` and `deleted_at` each a time or `null`. Test for a tombstone with
 * `m.deleted_at != null` (true only when it is a string), not `!== undefined`.
 */
export interface Message {
  id: string;
  room: string;
  seq: number;
  author: string;
  /** "" on a tombstone. */
  text: string;
  created_at: string;
  /** 2 after the first change, one more per change; absent while never changed. */
  version?: number;
  /** The last edit; null on a changed message never edited (only deleted). */
  edited_at?: string | null;
  /** When it was deleted; null on a changed message not deleted. */
  deleted_at?: string | null;
  /** By reaction: how many users reacted and the first ten; absent when none. */
  reactions?: Reactions;
  /** On a reply: the seq of the message (same room) it replies to. */
  reply_to?: number;
  /** The user ids the message mentions, each once; absent when none. */
  mentions?: string[];
  /** Its replies so far; absent until the first reply. */
  thread?: Thread;
}

/** A message's thread summary: how many replies (a deleted reply's tombstone
 * still counts), the last one's seq and creation time. */
export interface Thread {
  replies: number;
  last_seq: number;
  last_at: string;
}

/** An earlier text of an edited message (`versions()`): version 1 is as posted;
 * `edited_at` is when the edit that replaced it was made. */
export interface Version {
  version: number;
  text: string;
  edited_at: string;
}

/** A page of replies (`replies()`): pass `next` as `after` for the following one. */
export interface RepliesPage {
  messages: Message[];
  has_more: boolean;
  next: number | null;
}

/** A message's reactions summary, by reaction (in order of first use). */
export type Reactions = Record<string, { count: number; users: string[] }>;

export type ErrorCode =
  | "invalid_json" | "invalid_request" | "unauthorized" | "forbidden" | "not_found"
  | "too_large" | "rate_limited" | "unavailable" | "too_many_subscriptions"
  | "idempotency_conflict" | "message_deleted" | "internal"
  // raised by the client itself
  | "closed" | "unsubscribed" | "no_websocket" | "connect_failed" | "invalid_frame"
  | "token_refresh_failed"
  | (string & {});

export declare class GatewayError extends Error {
  constructor(code: ErrorCode, message: string, extra?: Record<string, unknown>);
  /** The server's code (`error.code` of the body or frame), or one of the client's. */
  code: ErrorCode;
  /** The server's sentence, e.g. "a bearer token is required". */
  message: string;
  /** HTTP status of a failed request or refused upgrade. */
  status?: number;
  /** Seconds to wait before trying again, when the gateway said so (`retry_after` of
   * the body or frame, else the `Retry-After` header). */
  retryAfter?: number;
  /** The error object as the gateway sent it. */
  detail: Record<string, unknown>;
  /** For a refused subscribe or typing frame: the room. */
  room?: string;
  /** For an error answering a frame without a ref: "refresh" or "typing". */
  frame?: "refresh" | "typing";
}

export interface StateEvent {
  state: State;
  /** connecting: how many attempts failed before this one. */
  attempt?: number;
  /** connected: the gateway's base URL. */
  url?: string;
  /** disconnected / closed: WebSocket close code (1006 for a failed upgrade). */
  code?: number;
  reason?: string;
  /** HTTP status of a refused upgrade (seen in Node with `ws`; in a browser, which
   * hides it, a 401 is learnt from the HTTP API). */
  status?: number;
  /** disconnected: ms until the next attempt. */
  delay?: number;
  /** closed / disconnected after a refused upgrade: the server's error (code, message,
   * status, retryAfter; in a browser, learnt from the HTTP API). */
  error?: GatewayError;
}

export interface ChangeEvent {
  kind: "updated" | "deleted";
  room: string;
  /** The room's change number (resumed with `changes_since` across reconnections). */
  change: number;
  message: Message;
}

/** `reactions_updated`: the summary of the message at `seq` now (`{}`: none left),
 * numbered in the same change stream as edits and deletes. */
export interface ThreadUpdatedEvent {
  room: string;
  change: number;
  /** The message replied to. */
  seq: number;
  thread: Thread;
}

export interface ReactionsUpdatedEvent {
  room: string;
  change: number;
  seq: number;
  reactions: Reactions;
}

/** The answer to a subscribe: the room's latest seq and last change number. */
export interface SubscribedEvent {
  room: string;
  seq: number;
  /** The room's last change number (0: none yet). */
  change: number;
}

/** Someone is typing in a room (not sent to the typist's own connections). */
export interface TypingEvent {
  room: string;
  user: string;
}

/** A user's first connection to a room appeared (`join`) or their last one went. */
export interface PresenceEvent {
  room: string;
  action: "join" | "leave";
  user: string;
}

/** An ephemeral event (`POST /v1/publish`, broadcasts): not stored, no seq. */
export interface EphemeralEvent {
  room: string;
  event: string;
  data: Record<string, unknown>;
}

/** The server ended a subscription (server API, or a refreshed token without the room). */
export interface UnsubscribedEvent {
  room: string;
  reason?: string;
}

/** A read receipt: `user` has read `room` up to `seq`. */
export interface ReadEvent {
  room: string;
  user: string;
  seq: number;
}

/** A read position: read up to `seq`, `unread` messages after it, `mentions` of
 * them (not deleted, not the user's own) mentioning the user. */
export interface ReadState {
  room: string;
  seq: number;
  unread: number;
  mentions: number;
}

export interface Events {
  state: StateEvent;
  connecting: StateEvent;
  connected: StateEvent;
  disconnected: StateEvent;
  closed: StateEvent;
  message: Message;
  change: ChangeEvent;
  reactions: ReactionsUpdatedEvent;
  /** `thread_updated`: a reply to the message at `seq` committed; `thread` is its
   * summary now, in the same change stream as edits and reactions. */
  thread: ThreadUpdatedEvent;
  event: EphemeralEvent;
  presence: PresenceEvent;
  typing: TypingEvent;
  read: ReadEvent;
  subscribed: SubscribedEvent;
  unsubscribed: UnsubscribedEvent;
  refreshed: { exp: number };
  error: GatewayError;
  /** A frame of a type this client does not know. */
  frame: { type: string; [field: string]: unknown };
}

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (ev: any) => void): void;
}

export interface ClientOptions {
  /** A user token (JWT). */
  token?: string;
  /** Called for a token when there is none, it expires within `refreshMargin`, or the
   * server closed the socket for its expiry; the new one is sent in band (`refresh`). */
  getToken?: () => Promise<string> | string;
  /** Open mode only: the name shown in presence and used as the author of publishes. */
  user?: string;
  /** A WebSocket class; default: the global one, else the `ws` package. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** fetch for the HTTP calls; default: the global one. */
  fetch?: typeof fetch;
  /** Backoff bounds in ms (full jitter between them). Defaults 500 and 20000. */
  minDelay?: number;
  maxDelay?: number;
  /** Ping every `pingInterval` ms; no frame within `pongTimeout` ms after: reconnect. */
  pingInterval?: number;
  pongTimeout?: number;
  /** Seconds before a token's expiry at which a new one is fetched. Default 30. */
  refreshMargin?: number;
}

export interface Page {
  messages: Message[];
  has_more: boolean;
}

export declare function backoff(attempt: number, base: number, max: number): number;
export declare function tokenExpiry(token: string): number | undefined;
/** The GatewayError of an HTTP answer carrying the gateway's error body. */
export declare function errorOfResponse(status: number, body: unknown,
                                        retryAfterHeader?: string | null): GatewayError;

export declare class Client {
  constructor(url: string | string[], options?: ClientOptions);
  readonly state: State;
  on<K extends keyof Events>(type: K, listener: (ev: Events[K]) => void): () => void;
  once<K extends keyof Events>(type: K, listener: (ev: Events[K]) => void): () => void;
  off<K extends keyof Events>(type: K, listener: (ev: Events[K]) => void): void;
  /** Resolves once connected; rejects if the client is closed for good first. */
  connect(): Promise<void>;
  close(reason?: string): void;
  subscribe(room: string, options?: { since?: number }): Promise<SubscribedEvent>;
  unsubscribe(room: string): void;
  /** The seq of the last message of the room delivered to the application. */
  cursor(room: string): number | undefined;
  /** Resolves with the stored message; stored once even when resent after a drop. */
  publish(
    room: string,
    text: string,
    options?: { key?: string; replyTo?: number; mentions?: string[] },
  ): Promise<Message>;
  /** One page of the replies to the message at `seq`, ascending by seq. */
  replies(room: string, seq: number, options?: { after?: number; limit?: number }):
    Promise<RepliesPage>;
  /** The earlier texts of the message at `seq` (its author, a moderator, an API key). */
  versions(room: string, seq: number):
    Promise<{ room: string; seq: number; version: number; versions: Version[] }>;
  /**
   * An event to every subscriber of an ephemeral room (nothing stored); resolves on the
   * gateway's ack. Sent once: rejected (`disconnected`) without a connection or when it
   * closes first; `wrong_room_kind` in a stored room, `forbidden` where the namespace
   * takes publishes from API keys only. Subscribers get it as `event`.
   */
  emit(room: string, event: string, data?: Record<string, unknown>): Promise<void>;
  /** Edit the message at `seq` (own, or any as a moderator); resolves with it as edited. */
  edit(room: string, seq: number, text: string, options?: { key?: string }): Promise<Message>;
  /** Delete the message at `seq`; resolves with the tombstone. */
  delete(room: string, seq: number, options?: { key?: string }): Promise<Message>;
  /** Add this user's reaction (1..32 characters) to the message at `seq`, once per
   * user; resolves with the message and its reactions. */
  react(room: string, seq: number, reaction: string): Promise<Message>;
  /** Remove this user's reaction from the message at `seq`; resolves with the message. */
  unreact(room: string, seq: number, reaction: string): Promise<Message>;
  /** Tell the room's other subscribers that this user is typing (the room must be held). */
  typing(room: string): void;
  /** While disconnected, try to connect at once instead of after the backoff delay. */
  reconnectNow(): void;
  history(room: string, options?: { limit?: number; before?: number; after?: number }):
    Promise<Page>;
  pages(room: string, options?: { limit?: number; before?: number; after?: number }):
    AsyncGenerator<Message[], void, void>;
  /** Highlights: [start, end) in code points of message.text (index Array.from(text)). */
  search(q: string, options?: { rooms?: string[]; limit?: number; cursor?: string }):
    Promise<{
      results: { message: Message; highlights: [number, number][] }[];
      next_cursor: string | null;
    }>;
  presence(room: string): Promise<{ room: string; users: string[] }>;
  /** Open mode: the position of `options.user`. */
  markRead(room: string, seq: number): Promise<ReadState>;
  readState(room: string): Promise<ReadState>;
  /** Every room this user has a position in (`GET /v1/read`). */
  readPositions(): Promise<{ rooms: ReadState[] }>;
  /** Moderation: a token whose `moderate` claim grants the room, or an API key as token. */
  ban(room: string, user: string, options?: { duration?: number; reason?: string }):
    Promise<ModerationAction>;
  unban(room: string, user: string): Promise<ModerationAction>;
  bans(room: string): Promise<Restriction[]>;
  mute(room: string, user: string, options?: { duration?: number; reason?: string }):
    Promise<ModerationAction>;
  unmute(room: string, user: string): Promise<ModerationAction>;
  mutes(room: string): Promise<Restriction[]>;
  setSlowMode(room: string, seconds: number): Promise<{ room: string; slow_mode: number }>;
  roomSettings(room: string): Promise<{ room: string; slow_mode: number }>;
  moderationLog(room: string, options?: { limit?: number; cursor?: string }):
    Promise<{ room: string; actions: ModerationAction[]; next_cursor: string | null }>;
}

export interface Restriction {
  user: string;
  reason: string;
  by: string;
  created_at: string;
  expires_at: string | null;
}

export interface ModerationAction {
  id: number;
  room: string;
  action: "banned" | "unbanned" | "muted" | "unmuted" | "slow_mode";
  by: string;
  created_at: string;
  user?: string;
  reason?: string;
  expires_at?: string | null;
  slow_mode?: number;
}

export interface SharedClientOptions extends ClientOptions {
  /** Where the worker script is; default `worker.js` next to this module (the gateway
   * serves it at /sdk/worker.js). Must be of the page's origin. */
  workerUrl?: string | URL;
}

/** The surface of `Client`, served by a SharedWorker holding one connection for every
 * tab of the origin (same URLs and credentials); each tab keeps its own rooms and
 * cursors. `close()` leaves this tab's rooms; the connection closes with the last tab. */
export declare class SharedClient extends Client {
  readonly shared: true;
}

/** Opt-in: one socket per browser, not per tab. A `SharedClient` where `SharedWorker`
 * exists, else (Node, browsers without it) a plain `Client`. */
export declare function sharedClient(url: string | string[],
                                     options?: SharedClientOptions): Client | SharedClient;
