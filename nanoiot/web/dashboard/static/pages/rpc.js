// Sending one command (REST v2) and telling what came back.

/** POST /api/rpc/{oneway|twoway}/{deviceId}; resolves to the answer (null when none), rejects with ApiError. */
export function sendRpc(api, deviceId, { method, params = {}, oneway = false, persistent = false, timeout }) {
  const body = { method, params };
  if (persistent) body.persistent = true;
  if (timeout) body.timeout = Number(timeout);
  return api.post(`/api/rpc/${oneway ? "oneway" : "twoway"}/${deviceId}`, body);
}

/** A switch/LED state read from an answer: ``true``, ``{"value": 1}``, ``"on"``... */
export function truthy(answer) {
  let value = answer;
  if (value && typeof value === "object" && "value" in value) value = value.value;
  if (typeof value === "string") return ["true", "on", "1", "yes"].includes(value.toLowerCase());
  return Boolean(value);
}

/** A number read from an answer: ``21.5`` or ``{"value": 21.5}``; NaN when there is none. */
export function numeric(answer) {
  const value = answer && typeof answer === "object" && "value" in answer ? answer.value : answer;
  return typeof value === "number" ? value : Number.parseFloat(value);
}
