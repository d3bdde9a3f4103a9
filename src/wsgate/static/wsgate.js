// wsgate.js: the browser client for wsgate (one ES module, no build step, no dependencies).
//
//   import { connect } from "/client/wsgate.js";
//   const client = connect("ws://127.0.0.1:8765/ws", { token: () => getToken() });
//   for await (const event of client.run("hi")) console.log(event.seq, event.type);
//
// The same semantics as wsgate.client for Python (docs/client.md): the token (a string, or a
// function returning one or a promise of one) is sent as the wsgate.v1 subprotocol pair, asked
// for again on every connect and on auth.expiring (sent as auth.refresh); a dropped connection is
// reconnected with full-jitter backoff that honours each close code and resumed with last_seq,
// duplicates dropped by seq. A browser sees only 1006 for a refused handshake: with `checkUrl`
// (the admin listener's /auth/check) the client asks why, and stops when retrying cannot help.

/**
 * @typedef {{type: string, seq?: number, run_id?: string, message_id?: string, [field: string]: any}} WsgateEvent
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} State
 * @typedef {{resumed?: boolean, session_id?: string, delay?: number, code?: number, reason?: string,
 *   refusal?: string, status?: number}} StateDetail refusal: why a handshake was refused (checkUrl's answer)
 * @typedef {object} Options
 * @property {string | (() => string | Promise<string>)} token
 * @property {(state: State, detail: StateDetail) => void} [onState] told of every change
 * @property {(event: WsgateEvent) => void} [onEvent] everything that is not a run's (pushes, errors...)
 * @property {string} [checkUrl] where to ask why a handshake was refused (POST, Bearer token)
 * @property {number} [backoffBase] seconds the first reconnect waits at most (0.5)
 * @property {number} [backoffMax] seconds the doubling stops at (30)
 */

/** Close codes after which reconnecting cannot help. */
const FINAL = { 1000: "closed", 1008: "policy violation", 4403: "forbidden", 4409: "session moved" };
/** Errors that refuse a user_message before it starts a run. */
const REFUSALS = new Set(["too_many_runs", "draining", "runs_elsewhere", "bad_message"]);

export class RunInterrupted extends Error {}

/** A run's events, as they come: an async iterator fed without waiting. */
class Channel {
  constructor() { this.items = []; this.waiting = null; }
  push(item) {
    if (this.waiting) { const resolve = this.waiting; this.waiting = null; resolve(item); }
    else this.items.push(item);
  }
  next() {
    return this.items.length ? Promise.resolve(this.items.shift()) : new Promise((r) => { this.waiting = r; });
  }
}

export class Client {
  /** @param {string} url @param {Options} options */
  constructor(url, options) {
    this.url = url;
    this.options = { backoffBase: 0.5, backoffMax: 30, ...options };
    /** @type {State} */
    this.state = "connecting";
    /** The fields of session.ready or session.resumed. */
    this.session = {};
    this.lastSeq = 0;
    this.ws = null;
    this.runs = new Map(); // by message id: {channel, started}
    this.ids = 0;
    this.attempt = 0;
    this.reconnectAfter = null;
    this.closed = null;
    this.openWaiters = [];
    /** Resolves at the first session.ready; rejects if the client stops before. */
    this.ready = new Promise((resolve, reject) => { this.readyResolve = resolve; this.readyReject = reject; });
    this.connect();
  }

  async token() {
    const token = this.options.token;
    return typeof token === "function" ? await token() : token;
  }

  setState(state, detail = {}) {
    this.state = state;
    if (this.options.onState) this.options.onState(state, detail);
  }

  async connect() {
    const token = await this.token();
    const ws = new WebSocket(this.url, ["wsgate.v1", "bearer." + token]);
    let opened = false;
    let greeted = false;
    ws.onopen = () => { opened = true; };
    ws.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (!greeted) { greeted = true; this.greet(ws, data); return; }
      if (data.type === "session.resumed") { this.resumed(ws, data); return; }
      this.dispatch(data);
    };
    ws.onclose = (event) => this.lost(event, opened, token);
  }

  greet(ws, ready) {
    const previous = this.session;
    if (previous.resume_token) {
      ws.send(JSON.stringify({
        type: "session.resume", session_id: previous.session_id,
        resume_token: previous.resume_token, last_seq: this.lastSeq,
      }));
      this.fresh = ready;
      return;
    }
    this.session = ready;
    this.lastSeq = 0;
    this.opened(ws, false);
  }

  resumed(ws, answer) {
    if (answer.recovered) {
      this.session = { ...this.session, ...answer };
    } else {
      for (const [id, run] of this.runs) {
        if (run.started) { run.channel.push(new RunInterrupted(`the session was not recovered (${answer.reason})`)); this.runs.delete(id); }
      }
      this.session = { ...this.fresh, session_id: answer.session_id, resume_token: answer.resume_token };
      this.lastSeq = 0;
    }
    this.opened(ws, Boolean(answer.recovered));
  }

  opened(ws, resumed) {
    this.ws = ws;
    this.attempt = 0;
    this.setState("open", { resumed, session_id: this.session.session_id });
    this.readyResolve();
    for (const resolve of this.openWaiters.splice(0)) resolve();
  }

  dispatch(data) {
    if (typeof data.seq === "number") {
      if (data.seq <= this.lastSeq) return; // seen before: a resume's replay gives nothing twice
      this.lastSeq = data.seq;
    }
    if (data.type === "auth.expiring") this.refresh().catch(() => {});
    if (data.type === "session.draining") this.reconnectAfter = data.reconnect_after;
    const run = data.message_id !== undefined ? this.runs.get(data.message_id) : undefined;
    if (run) { run.started = true; run.channel.push(data); return; }
    if (data.type === "error" && REFUSALS.has(data.code)) {
      for (const run of this.runs.values()) {
        if (!run.started) { run.started = true; run.channel.push(new RunInterrupted(`${data.code}: ${data.message}`)); return; }
      }
    }
    if (this.options.onEvent) this.options.onEvent(data);
  }

  async lost(event, opened, token) {
    this.ws = null;
    if (this.closed) { this.setState("closed", { code: this.closed.code, reason: this.closed.reason }); return; }
    const code = event.code;
    const reason = event.reason || "";
    const detail = { code, reason };
    if (!opened && this.options.checkUrl) {
      // A browser sees 1006 for any refused handshake: ask the gateway why, over HTTP.
      try {
        const response = await fetch(this.options.checkUrl, { method: "POST", headers: { Authorization: "Bearer " + token } });
        const answer = await response.json();
        if (!answer.admitted) {
          detail.refusal = `${answer.status} ${answer.reason}`;
          detail.status = answer.status;
          const fixed = typeof this.options.token !== "function"; // a new token cannot come
          if ([400, 403, 404].includes(answer.status) || (answer.status === 401 && fixed)) {
            return this.stop(answer.status, `refused: ${detail.refusal}`);
          }
        }
      } catch (e) { /* no answer: reconnect as for any drop */ }
    }
    if (code in FINAL || (code === 4401 && typeof this.options.token !== "function")) {
      return this.stop(code, reason || FINAL[code] || "token expired");
    }
    let delay = code === 4401 ? 0 : this.backoff();
    if (code === 1001) {
      const hint = /reconnect after ([\d.]+) s/.exec(reason);
      if (hint) delay = parseFloat(hint[1]);
      else if (this.reconnectAfter !== null) delay = this.reconnectAfter;
      this.reconnectAfter = null;
    }
    this.attempt += 1;
    this.setState("reconnecting", { ...detail, delay });
    setTimeout(() => { if (!this.closed) this.connect(); }, delay * 1000);
  }

  backoff() {
    const { backoffBase, backoffMax } = this.options;
    return Math.random() * Math.min(backoffMax, backoffBase * 2 ** Math.min(this.attempt, 32));
  }

  stop(code, reason) {
    this.closed = { code, reason };
    for (const run of this.runs.values()) run.channel.push(new RunInterrupted(reason));
    this.readyReject(new Error(reason));
    this.setState("closed", { code, reason });
  }

  /** Send once open (waiting while reconnecting). @param {object} message */
  async send(message) {
    while (!this.ws) {
      if (this.closed) throw new Error(this.closed.reason);
      await new Promise((resolve) => this.openWaiters.push(resolve));
    }
    this.ws.send(JSON.stringify(message));
  }

  /**
   * Start a run: its events, the last one agent_completed.
   * @param {string} text @returns {AsyncGenerator<WsgateEvent>}
   */
  async *run(text) {
    const id = `c${++this.ids}`;
    const run = { channel: new Channel(), started: false };
    this.runs.set(id, run);
    try {
      await this.send({ type: "user_message", text, id });
      while (true) {
        const item = await run.channel.next();
        if (item instanceof Error) throw item;
        yield item;
        if (item.type === "agent_completed") return;
      }
    } finally {
      this.runs.delete(id);
    }
  }

  cancel(runId) { return this.send({ type: "run.cancel", run_id: runId }); }

  async refresh() { return this.send({ type: "auth.refresh", token: await this.token() }); }

  close() {
    this.closed = { code: 1000, reason: "closed by the client" };
    if (this.ws) this.ws.close(1000); else this.setState("closed", this.closed);
  }
}

/** @param {string} url @param {Options} options @returns {Client} */
export function connect(url, options) {
  return new Client(url, options);
}
