// A device: its RPC debug terminal, its control widgets and its persistent RPC table (live from the WebSocket).

import { h, clear, field, formatTime } from "../dom.js";
import { presenceBadge, pager, seedPresence, statusLine } from "./common.js";
import { terminal } from "./terminal.js";
import { widgetsPanel } from "./widgets.js";

const STATUSES = ["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL", "TIMEOUT", "EXPIRED", "FAILED"];
const PAGE_SIZE = 10;

export function devicePage(view, { api, live, presence }, id) {
  const stops = [];
  const title = h("h1", {}, "Device");
  const [status, say] = statusLine();
  view.append(h("p", {}, h("a", { href: "#/devices" }, "← Devices")), title, status);
  say("Loading…", "busy");
  let left = false;
  api.get(`/api/device/info/${id}`).then((device) => {
    if (left) return;
    say("");
    seedPresence(presence, [device]);
    clear(title, device.name, " ");
    const [badge, stopBadge] = presenceBadge(presence, id);
    stops.push(stopBadge);
    title.append(badge);
    view.append(h("p.meta", {}, `Type ${device.type}`, device.label ? ` · ${device.label}` : "", ` · id `,
      h("code", {}, id)));
    const [widgets, stopWidgets] = widgetsPanel(api, id, device);
    stops.push(stopWidgets);
    const [table, stopTable] = persistentTable(api, live, id);
    stops.push(stopTable);
    view.append(h("div.columns", {}, terminal(api, id), widgets), table);
  }, (err) => say(`Could not load the device — ${err.message}`, "error"));
  return () => {
    left = true;
    stops.forEach((stop) => stop());
  };
}

function shortId(value) {
  return typeof value === "string" ? value.slice(0, 8) : "";
}

function initiatorText(initiator) {
  if (!initiator || typeof initiator !== "object") return "—";
  const parts = [initiator.type || "?"];
  if (initiator.batchId) parts.push(`batch ${shortId(initiator.batchId)}`);
  if (initiator.id) parts.push(shortId(typeof initiator.id === "object" ? initiator.id.id : initiator.id));
  if (initiator.userId && !initiator.id) parts.push(`user ${shortId(initiator.userId)}`);
  return parts.join(" ");
}

function requestText(rpc) {
  const body = (rpc.request && rpc.request.body) || {};
  return `${body.method || "?"} ${body.params ?? ""}${rpc.request && rpc.request.oneway ? " (one-way)" : ""}`;
}

/** The persistent RPC table: filter by status, paged, delete; rows follow the device's RPC events. */
function persistentTable(api, live, id) {
  let page = 0;
  const rows = new Map(); // rpcId -> tr
  let recount = null;
  let loads = 0;
  let summary = { totalElements: 0, totalPages: 0, hasNext: false };
  const latest = new Map(); // rpcId -> {rpc, at}: the last event of each command, and when it came
  const [filterField, filter] = field("Status", h("select", { name: "rpcStatus" },
    h("option", { value: "" }, "all"), STATUSES.map((s) => h("option", { value: s }, s))));
  const refresh = h("button", { type: "button" }, "Refresh");
  const tbody = h("tbody");
  const [tableStatus, say] = statusLine();
  const [pagerEl, updatePager] = pager((step) => {
    page = Math.max(0, page + step);
    load();
  }, "Persistent RPC pages");

  function fill(tr, rpc) {
    tr.dataset.status = rpc.status;
    const remove = h("button.small", { type: "button", "aria-label": `Delete RPC ${rpc.id.id}` }, "Delete");
    remove.addEventListener("click", async () => {
      remove.disabled = true;
      try {
        await api.delete(`/api/rpc/persistent/${rpc.id.id}`);
        tr.remove();
        rows.delete(rpc.id.id);
        say(`Deleted RPC ${shortId(rpc.id.id)}.`);
      } catch (err) {
        remove.disabled = false;
        say(`Could not delete RPC ${shortId(rpc.id.id)} — ${err.message}`, "error");
      }
    });
    const response = rpc.response === null || rpc.response === undefined ? "—" : JSON.stringify(rpc.response);
    clear(tr,
      h("td", {}, h("span", { class: `badge rpc-status ${rpc.status}`, "data-col": "status" }, rpc.status)),
      h("td", {}, formatTime(rpc.createdTime)),
      h("td", {}, formatTime(rpc.expirationTime)),
      h("td.mono", { title: rpc.id.id }, requestText(rpc)),
      h("td.mono", { "data-col": "response" }, response),
      h("td", { title: JSON.stringify(rpc.initiator) }, initiatorText(rpc.initiator)),
      h("td", {}, remove));
  }

  function row(rpc) {
    const tr = h("tr", { "data-rpc": rpc.id.id });
    fill(tr, rpc);
    rows.set(rpc.id.id, tr);
    return tr;
  }

  function summarize() {
    updatePager(page, summary);
    const plural = summary.totalElements === 1 ? "" : "s";
    say(`${summary.totalElements} persistent RPC${plural}${filter.value ? ` ${filter.value}` : ""}`);
  }

  async function load() {
    say("Loading…", "busy");
    const query = new URLSearchParams({ pageSize: PAGE_SIZE, page, sortProperty: "createdTime", sortOrder: "DESC" });
    if (filter.value) query.set("rpcStatus", filter.value);
    const started = performance.now();
    loads += 1;
    const mine = loads;
    try {
      const data = await api.get(`/api/rpc/persistent/device/${id}?${query}`);
      if (mine !== loads) return; // a later read is under way: it wins
      rows.clear();
      // An event that came while this page was read is newer than the page's copy of its command.
      const fresh = data.data.map((rpc) => {
        const seen = latest.get(rpc.id.id);
        return seen && seen.at >= started ? seen.rpc : rpc;
      }).filter((rpc) => rpc.status !== "DELETED" && (!filter.value || rpc.status === filter.value));
      clear(tbody, fresh.map(row));
      if (!fresh.length) tbody.append(h("tr.empty", {}, h("td", { colspan: 7 }, "No persistent RPC.")));
      summary = { totalElements: data.totalElements, totalPages: data.totalPages, hasNext: data.hasNext };
      summarize();
    } catch (err) {
      if (mine === loads) say(`Could not load persistent RPCs — ${err.message}`, "error");
    }
  }

  filter.addEventListener("change", () => {
    page = 0;
    load();
  });
  refresh.addEventListener("click", load);

  const unsubscribe = live.subscribe(id);
  const unlisten = live.listen((frame) => {
    if (!frame.rpc || frame.deviceId !== id || !frame.persistent) return;
    const rpc = frame.rpc;
    const rpcId = rpc.id.id;
    if (frame.event === "RPC_DELETED") rpc.status = "DELETED";
    latest.set(rpcId, { rpc, at: performance.now() });
    if (latest.size > 1000) latest.delete(latest.keys().next().value);
    const tr = rows.get(rpcId);
    const matches = !filter.value || filter.value === rpc.status;
    if (frame.event === "RPC_DELETED") {
      if (tr) {
        tr.remove();
        rows.delete(rpcId);
      }
      return;
    }
    if (tr && matches) fill(tr, rpc);
    else if (tr) {
      tr.remove();
      rows.delete(rpcId);
    } else if (matches && page === 0) {
      const empty = tbody.querySelector("tr.empty");
      if (empty) empty.remove();
      tbody.prepend(row(rpc));
      while (tbody.children.length > PAGE_SIZE) {
        const last = tbody.lastElementChild;
        rows.delete(last.dataset.rpc);
        last.remove();
      }
      summary.totalElements += 1;
      summary.totalPages = Math.ceil(summary.totalElements / PAGE_SIZE);
      summary.hasNext = summary.totalPages > page + 1;
      summarize();
      // Read the page again soon, as the server has it (one read for a burst of new commands).
      clearTimeout(recount);
      recount = setTimeout(load, 500);
    }
  });

  const unreopen = live.onReopen(load);
  load();
  const section = h("section.card", { "aria-labelledby": "persistent-title" },
    h("h2", { id: "persistent-title" }, "Persistent RPCs"),
    h("div.row", {}, filterField, refresh), tableStatus,
    h("div.table-wrap", {}, h("table.rpcs", {},
      h("thead", {}, h("tr", {}, ["Status", "Created", "Expires", "Request", "Response", "Initiator", ""].map(
        (t) => h("th", { scope: "col" }, t)))), tbody)),
    pagerEl);
  return [section, () => {
    clearTimeout(recount);
    unreopen();
    unlisten();
    unsubscribe();
  }];
}
