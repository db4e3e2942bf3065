// Live events over /api/ws/rpc: one socket per session, subscriptions kept across reconnects, listeners per page.

export class Live {
  /** ``tokenOf()``: the current access token; ``onState(text, ok)``: the connection's state for the header;
   *  ``onError(message)``: a refused subscription or a bad frame. */
  constructor({ tokenOf, onState = () => {}, onError = () => {} }) {
    this.tokenOf = tokenOf;
    this.onState = onState;
    this.onError = onError;
    this.socket = null;
    this.wanted = new Map(); // deviceId or "*" -> number of holders
    this.listeners = new Set();
    this.reopenListeners = new Set();
    this.opened = 0;
    this.retryMs = 1000;
    this.timer = null;
    this.stopped = true;
    this.seq = 0;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.wanted.clear();
    this.opened = 0;
    if (this.socket) this.socket.close(1000, "logout");
    this.socket = null;
    this.onState("offline", false);
  }

  /** Reconnect with a new token (after a refresh: the socket closes when the token it opened with expires). */
  renew() {
    if (this.stopped) return;
    if (this.socket) {
      const old = this.socket;
      this.socket = null;
      old.onclose = null;
      old.close(1000, "token renewed");
    }
    this.connect();
  }

  connect() {
    clearTimeout(this.timer);
    const token = this.tokenOf();
    if (!token || this.stopped) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/api/ws/rpc?token=${encodeURIComponent(token)}`);
    this.socket = socket;
    this.onState("connecting…", false);
    socket.onopen = () => {
      this.retryMs = 1000;
      this.onState("live", true);
      for (const target of this.wanted.keys()) this.send({ cmd: "subscribe", deviceId: target, id: this.nextId() });
      this.opened += 1;
      // Events sent while no socket was open are lost: pages read their state again.
      if (this.opened > 1) for (const listener of this.reopenListeners) listener();
    };
    socket.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        this.onError("The server sent a frame that is not JSON");
        return;
      }
      if (frame.event) {
        for (const listener of this.listeners) {
          try {
            listener(frame);
          } catch (err) {
            this.onError(`Showing a live event failed: ${err.message}`);
          }
        }
      } else if (frame.status && frame.status >= 400) {
        const error = frame.error || {};
        this.onError(`Live events: ${frame.status} ${error.message || ""}`.trim());
      }
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.stopped) return;
      const why = event.code === 4001 ? "token expired" : event.reason || `closed (${event.code})`;
      // 4001: the token expired; the API refreshes it, so reconnect at once with the current one.
      const delay = event.code === 4001 ? 200 : this.retryMs;
      this.retryMs = Math.min(this.retryMs * 2, 15000);
      this.onState(`reconnecting (${why})…`, false);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  nextId() {
    this.seq += 1;
    return `d${this.seq}`;
  }

  send(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  /** Subscribes to a device ("*": every device this user may see) until the returned function is called. */
  subscribe(target) {
    const count = this.wanted.get(target) || 0;
    this.wanted.set(target, count + 1);
    if (count === 0) this.send({ cmd: "subscribe", deviceId: target, id: this.nextId() });
    return () => {
      const left = (this.wanted.get(target) || 1) - 1;
      if (left > 0) {
        this.wanted.set(target, left);
      } else {
        this.wanted.delete(target);
        this.send({ cmd: "unsubscribe", deviceId: target, id: this.nextId() });
      }
    };
  }

  /** Calls ``listener()`` each time the socket opens again (after a reconnect or a renewed token). */
  onReopen(listener) {
    this.reopenListeners.add(listener);
    return () => this.reopenListeners.delete(listener);
  }

  /** Calls ``listener(frame)`` for each event frame until the returned function is called. */
  listen(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}
