// Shared by the pages: listing the user's devices, presence badges, pagers.

import { h, clear } from "../dom.js";

/** A page of the user's devices (ThingsBoard's device infos: each with ``active``): the tenant's for a tenant
 * admin, its customer's for a customer user. */
export function listDevices(api, { page = 0, pageSize = 20, textSearch = "", type = "" } = {}) {
  const user = api.session.user;
  const query = new URLSearchParams({ pageSize, page, sortProperty: "name", sortOrder: "ASC" });
  if (textSearch) query.set("textSearch", textSearch);
  if (type) query.set("type", type);
  if (user.authority === "CUSTOMER_USER") {
    return api.get(`/api/customer/${user.customerId.id}/deviceInfos?${query}`);
  }
  return api.get(`/api/tenant/deviceInfos?${query}`);
}

/** What the server said of each device's presence when it was read (a live event seen since wins). */
export function seedPresence(presence, infos) {
  for (const info of infos) {
    if (typeof info.active === "boolean") presence.seed(deviceId(info), info.active);
  }
}

export function deviceId(device) {
  return device.id && typeof device.id === "object" ? device.id.id : device.id;
}

/** A badge that follows the device's presence until ``stop`` of the returned pair is called. */
export function presenceBadge(presence, id) {
  const badge = h("span.badge", { "data-presence": id });
  const show = (entry) => {
    const state = entry ? (entry.online ? "online" : "offline") : "unknown";
    badge.textContent = entry && entry.online && entry.transport ? `online (${entry.transport})` : state;
    badge.className = `badge presence ${state}`;
    badge.title = entry ? `${entry.seeded ? "as read" : "since"} ${new Date(entry.at).toLocaleTimeString()}`
      : "presence not known yet";
  };
  show(presence.get(id));
  const stop = presence.watch((deviceIdSeen, entry) => {
    if (deviceIdSeen === id) show(entry);
  });
  return [badge, stop];
}

/** Previous/next buttons and "page x of y" for a PageData. */
export function pager(onPage, label) {
  const prev = h("button", { type: "button", onclick: () => onPage(-1) }, "← Previous");
  const next = h("button", { type: "button", onclick: () => onPage(1) }, "Next →");
  const text = h("span.page-info", { "aria-live": "polite" });
  const nav = h("nav.pager", { "aria-label": label }, prev, text, next);
  const update = (pageIndex, data) => {
    const total = Math.max(1, data.totalPages || 0);
    clear(text, `Page ${pageIndex + 1} of ${total} · ${data.totalElements} in all`);
    prev.disabled = pageIndex === 0;
    next.disabled = !data.hasNext;
  };
  return [nav, update];
}

/** A status line under a control: ``say(text, kind)`` with kind "ok", "error" or "busy". */
export function statusLine() {
  const el = h("p.status-line", { role: "status" });
  const say = (text, kind = "ok") => {
    el.textContent = text;
    el.className = `status-line ${kind}`;
    el.setAttribute("role", kind === "error" ? "alert" : "status");
  };
  return [el, say];
}
