// The REST API (ThingsBoard's): login, token refresh before expiry, JSON calls whose failures become ApiError with
// the server's own message.

const STORAGE_KEY = "nanoiot.session";
/** Refresh this many seconds before the access token expires (or at half its life if that is shorter). */
const REFRESH_MARGIN_S = 60;

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** The claims of a JWT (not verified: the server does that; used for its expiry only). */
export function jwtClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return {};
  }
}

/** The message to show for a failed call: the server's ``message``, plus ``rpcError`` when it names one. */
function describe(status, body, text) {
  if (body && typeof body === "object") {
    const parts = [];
    if (body.rpcError) parts.push(body.rpcError);
    if (body.message) parts.push(body.message);
    else if (body.error) parts.push(typeof body.error === "string" ? body.error : JSON.stringify(body.error));
    if (parts.length) return `${status}: ${parts.join(" — ")}`;
  }
  if (text) return `${status}: ${text.slice(0, 300)}`;
  return `${status}: ${status === 504 ? "no answer in time (gateway timeout)" : "request failed"}`;
}

export class Api {
  constructor({ onSession = () => {}, onExpired = () => {} } = {}) {
    this.onSession = onSession; // called with the session (or null) whenever it changes
    this.onExpired = onExpired; // called with a message when the session cannot be kept
    this.session = null; // {token, refreshToken, user}
    this.refreshTimer = null;
    this.refreshing = null;
  }

  /** Restores a session kept in sessionStorage (this tab only); resolves to it or null. */
  async restore() {
    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "null");
    } catch {
      saved = null;
    }
    if (!saved || !saved.token) return null;
    this.session = saved;
    const exp = jwtClaims(saved.token).exp;
    if (!exp || exp * 1000 - Date.now() < REFRESH_MARGIN_S * 1000) {
      try {
        await this.refresh();
      } catch {
        this.drop();
        return null;
      }
    }
    try {
      this.session.user = await this.get("/api/auth/user");
    } catch {
      this.drop();
      return null;
    }
    this.keep(this.session);
    return this.session;
  }

  async login(username, password) {
    const tokens = await this.request("POST", "/api/auth/login", { username, password }, { auth: false });
    this.session = { token: tokens.token, refreshToken: tokens.refreshToken, user: null };
    this.session.user = await this.get("/api/auth/user");
    this.keep(this.session);
    return this.session;
  }

  logout() {
    this.drop();
  }

  keep(session) {
    this.session = session;
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
    this.schedule();
    this.onSession(session);
  }

  drop() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    this.session = null;
    sessionStorage.removeItem(STORAGE_KEY);
    this.onSession(null);
  }

  schedule() {
    clearTimeout(this.refreshTimer);
    const claims = jwtClaims(this.session.token);
    if (!claims.exp) return;
    const now = Date.now();
    const life = claims.exp * 1000 - (claims.iat ? claims.iat * 1000 : now);
    const margin = Math.min(REFRESH_MARGIN_S * 1000, life / 2);
    const delay = Math.max(1000, claims.exp * 1000 - margin - now);
    // setTimeout's delay is a 32-bit number of ms.
    this.refreshTimer = setTimeout(() => {
      this.refresh().catch((err) => {
        this.drop();
        this.onExpired(`Your session could not be renewed (${err.message}); log in again.`);
      });
    }, Math.min(delay, 2 ** 31 - 1));
  }

  /** POST /api/auth/token with the refresh token; one at a time. */
  refresh() {
    if (!this.refreshing) {
      const user = this.session && this.session.user;
      this.refreshing = this.request("POST", "/api/auth/token", { refreshToken: this.session.refreshToken },
        { auth: false })
        .then((tokens) => {
          this.keep({ token: tokens.token, refreshToken: tokens.refreshToken, user });
          return this.session;
        })
        .finally(() => {
          this.refreshing = null;
        });
    }
    return this.refreshing;
  }

  get(path) {
    return this.request("GET", path);
  }

  post(path, body) {
    return this.request("POST", path, body);
  }

  delete(path) {
    return this.request("DELETE", path);
  }

  /** One call; resolves to the parsed JSON (null for an empty body), rejects with ApiError. A 401 on an
   *  authenticated call refreshes the token once and retries. */
  async request(method, path, body, { auth = true, retried = false, signal } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (auth && this.session) headers["X-Authorization"] = `Bearer ${this.session.token}`;
    let response;
    try {
      response = await fetch(path, {
        method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `Cannot reach the server: ${err.message}`, null);
    }
    const text = await response.text();
    let parsed = null;
    if (text) {
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = undefined;
      }
    }
    if (response.ok) {
      return parsed === undefined ? text : parsed;
    }
    if (response.status === 401 && auth && !retried && this.session) {
      try {
        await this.refresh();
      } catch (err) {
        this.drop();
        this.onExpired("Your session has expired; log in again.");
        throw new ApiError(401, describe(401, parsed, text), parsed);
      }
      return this.request(method, path, body, { auth, retried: true, signal });
    }
    throw new ApiError(response.status, describe(response.status, parsed, parsed === undefined ? text : ""), parsed);
  }
}
