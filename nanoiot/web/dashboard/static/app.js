// The dashboard's shell: session, header, alerts, live presence, and a hash router (#/devices, #/device/<id>,
// #/fleet) so that the server serves one page.

import { Api } from "./api.js";
import { h, clear } from "./dom.js";
import { Live } from "./live.js";
import { loginPage } from "./pages/login.js";
import { devicesPage } from "./pages/devices.js";
import { devicePage } from "./pages/device.js";
import { fleetPage } from "./pages/fleet.js";

const main = document.getElementById("main");
const alerts = document.getElementById("alerts");

/** Shows a failure (or a notice) at the top of the page until dismissed; never silent. */
function notify(message, kind = "error") {
  const item = h(`div.alert.${kind}`, {},
    h("span", {}, message),
    h("button", { type: "button", class: "link", "aria-label": "Dismiss", onclick: () => item.remove() }, "×"));
  alerts.append(item);
  while (alerts.children.length > 4) alerts.firstElementChild.remove();
}

/** Who is online: read with the device infos (``active``), then as the WebSocket tells:
 * deviceId -> {online, transport, at, seeded}. */
class Presence {
  constructor() {
    this.state = new Map();
    this.listeners = new Set();
  }
  update(frame) {
    if (frame.event !== "DEVICE_ONLINE" && frame.event !== "DEVICE_OFFLINE") return;
    const entry = { online: frame.event === "DEVICE_ONLINE", transport: frame.transport, at: Date.now() };
    this.state.set(frame.deviceId, entry);
    for (const listener of this.listeners) listener(frame.deviceId, entry);
  }
  seed(deviceId, online) {
    const known = this.state.get(deviceId);
    if (known && !known.seeded) return; // a live event is newer than any read
    const entry = { online, transport: known ? known.transport : null, at: Date.now(), seeded: true };
    this.state.set(deviceId, entry);
    for (const listener of this.listeners) listener(deviceId, entry);
  }
  get(deviceId) {
    return this.state.get(deviceId);
  }
  watch(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

const liveLabel = document.getElementById("live");
const api = new Api({
  onSession: (session) => showSession(session),
  onExpired: (message) => {
    notify(message);
    route();
  },
});
const live = new Live({
  tokenOf: () => api.session && api.session.token,
  onState: (text, ok) => {
    liveLabel.textContent = text;
    liveLabel.classList.toggle("ok", ok);
  },
  onError: (message) => notify(message),
});
const presence = new Presence();
live.listen((frame) => presence.update(frame));

let lastToken = null;
function showSession(session) {
  document.getElementById("nav").hidden = !session;
  document.getElementById("session").hidden = !session;
  if (!session) {
    lastToken = null;
    live.stop();
    return;
  }
  const user = session.user;
  document.getElementById("who").textContent = user ? `${user.email} (${user.authority})` : "";
  if (lastToken === null) {
    lastToken = session.token;
    live.start();
    live.subscribe("*"); // presence of every device this user may see, for the whole session
  } else if (lastToken !== session.token) {
    lastToken = session.token;
    live.renew();
  }
}

document.getElementById("logout").addEventListener("click", () => {
  api.logout();
  location.hash = "#/login";
});

window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason;
  notify(`Unexpected failure: ${reason && reason.message ? reason.message : reason}`);
});
window.addEventListener("error", (event) => notify(`Unexpected error: ${event.message}`));

const ctx = { api, live, presence, notify, navigate: (hash) => { location.hash = hash; } };
let cleanup = null;

function route() {
  if (cleanup) {
    try {
      cleanup();
    } catch (err) {
      notify(`Leaving the page failed: ${err.message}`);
    }
    cleanup = null;
  }
  const hash = location.hash || "#/devices";
  const [, page, arg] = hash.match(/^#\/([^/]*)\/?(.*)$/) || [null, "devices", ""];
  const view = h("div.page");
  clear(main, view);
  if (!api.session) {
    cleanup = loginPage(view, ctx, page === "login" ? "#/devices" : hash);
    return;
  }
  for (const link of document.querySelectorAll("#nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${page}`);
  }
  if (page === "device" && arg) cleanup = devicePage(view, ctx, decodeURIComponent(arg));
  else if (page === "fleet") cleanup = fleetPage(view, ctx);
  else if (page === "login") location.hash = "#/devices";
  else cleanup = devicesPage(view, ctx);
  main.focus({ preventScroll: true });
}

window.addEventListener("hashchange", route);
api.restore().then(route, (err) => {
  notify(`Could not restore the session: ${err.message}`);
  route();
});
