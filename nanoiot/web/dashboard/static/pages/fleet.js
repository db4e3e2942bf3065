// The fleet view: pick devices (by type or by hand), send one command to all of them as a bulk RPC, and watch the
// per-status counts fill in (GET /api/rpc/bulk/{batchId}, fetched again on each of the batch's live events and
// every few seconds).

import { h, clear, field } from "../dom.js";
import { listDevices, deviceId, pager, statusLine } from "./common.js";

const COUNTED = ["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL", "TIMEOUT", "EXPIRED", "FAILED", "DELETED"];
const FINAL = ["SUCCESSFUL", "EXPIRED", "FAILED", "DELETED"];
const PICK_PAGE_SIZE = 25;
const POLL_MS = 2000;

export function fleetPage(view, { api, live }) {
  const selected = new Map(); // deviceId -> name
  let pickPage = 0;
  let pickSearch = "";
  let stopWatching = () => {};

  // --- targets --------------------------------------------------------------------------------------------------
  const byType = h("input", { type: "radio", name: "target", value: "type", id: "target-type", checked: true });
  const bySelection = h("input", { type: "radio", name: "target", value: "selection", id: "target-selection" });
  const types = h("datalist", { id: "device-types" });
  const [typeField, typeInput] = field("Device type", h("input", { name: "deviceType", list: "device-types",
    autocomplete: "off" }));
  const typeCount = h("p.hint", { "aria-live": "polite" });
  const typePanel = h("div.target-panel", {}, typeField, types, typeCount);

  const [searchField, searchInput] = field("Search", h("input", { type: "search", name: "pickSearch" }));
  const pickList = h("ul.pick-list");
  const selectedCount = h("p.hint", { "aria-live": "polite" }, "0 devices selected");
  const [pickStatus, sayPick] = statusLine();
  const [pickPager, updatePickPager] = pager((step) => {
    pickPage = Math.max(0, pickPage + step);
    loadPick();
  }, "Device pages");
  const selectPage = h("button", { type: "button" }, "Select all on this page");
  const clearSelection = h("button", { type: "button" }, "Clear selection");
  const selectionPanel = h("div.target-panel", { hidden: true },
    h("div.row", {}, searchField, selectPage, clearSelection), pickStatus, pickList, pickPager, selectedCount);

  const showTarget = () => {
    typePanel.hidden = !byType.checked;
    selectionPanel.hidden = !bySelection.checked;
    if (bySelection.checked && !pickList.children.length) loadPick();
  };
  byType.addEventListener("change", showTarget);
  bySelection.addEventListener("change", showTarget);

  const updateSelected = () => {
    selectedCount.textContent = `${selected.size} device${selected.size === 1 ? "" : "s"} selected`;
  };

  async function loadPick() {
    sayPick("Loading…", "busy");
    try {
      const data = await listDevices(api, { page: pickPage, pageSize: PICK_PAGE_SIZE, textSearch: pickSearch });
      clear(pickList, data.data.map((device) => {
        const id = deviceId(device);
        const box = h("input", { type: "checkbox", id: `pick-${id}`, value: id, checked: selected.has(id) });
        box.addEventListener("change", () => {
          if (box.checked) selected.set(id, device.name);
          else selected.delete(id);
          updateSelected();
        });
        return h("li", {}, box, h("label", { for: box.id }, device.name, h("span.tag", {}, device.type)));
      }));
      updatePickPager(pickPage, data);
      sayPick("");
    } catch (err) {
      sayPick(`Could not load devices — ${err.message}`, "error");
    }
  }
  let searchTimer = null;
  searchInput.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      pickSearch = searchInput.value.trim();
      pickPage = 0;
      loadPick();
    }, 250);
  });
  selectPage.addEventListener("click", () => {
    for (const box of pickList.querySelectorAll("input[type=checkbox]")) {
      box.checked = true;
      selected.set(box.value, box.nextElementSibling.firstChild.textContent);
    }
    updateSelected();
  });
  clearSelection.addEventListener("click", () => {
    selected.clear();
    for (const box of pickList.querySelectorAll("input[type=checkbox]")) box.checked = false;
    updateSelected();
  });

  // Types seen among the first devices, for the type field's suggestions; and how many a type has.
  listDevices(api, { pageSize: 100 }).then((data) => {
    clear(types, [...new Set(data.data.map((d) => d.type))].sort().map((t) => h("option", { value: t })));
  }, (err) => { typeCount.textContent = `Could not list device types — ${err.message}`; });
  let countTimer = null;
  typeInput.addEventListener("input", () => {
    clearTimeout(countTimer);
    const type = typeInput.value.trim();
    typeCount.textContent = "";
    if (!type) return;
    if (api.session.user.authority === "CUSTOMER_USER") {
      typeCount.textContent = "The server finds your devices of this type when the command is sent.";
      return;
    }
    countTimer = setTimeout(async () => {
      try {
        const data = await listDevices(api, { pageSize: 1, type });
        if (typeInput.value.trim() === type) {
          typeCount.textContent = `${data.totalElements} device${data.totalElements === 1 ? "" : "s"} of type ${type}`;
        }
      } catch (err) {
        typeCount.textContent = `Could not count devices of type ${type} — ${err.message}`;
      }
    }, 300);
  });

  // --- the command ----------------------------------------------------------------------------------------------
  const [methodField, method] = field("Method", h("input", { name: "method", required: true, autocomplete: "off" }));
  const [paramsField, params] = field("Params (JSON)", h("input", { name: "params", placeholder: "{}", class: "mono",
    autocomplete: "off" }));
  const oneway = h("input", { type: "checkbox", name: "oneway", id: "fleet-oneway" });
  const onewayField = h("div.field.check", {}, oneway, h("label", { for: oneway.id }, "one-way"));
  const [timeoutField, timeout] = field("Timeout (ms)", h("input", { type: "number", name: "timeout", min: 0,
    step: 1000, value: 60000, title: "How long each device's command may wait for it" }));
  const [sendStatus, saySend] = statusLine();
  const send = h("button", { type: "submit" }, "Send to all");
  const form = h("form.card", { "aria-labelledby": "fleet-command" },
    h("h2", { id: "fleet-command" }, "Command"),
    h("fieldset", {}, h("legend", {}, "Devices"),
      h("div.row", {}, h("span.radio", {}, byType, h("label", { for: byType.id }, "by type")),
        h("span.radio", {}, bySelection, h("label", { for: bySelection.id }, "selected devices"))),
      typePanel, selectionPanel),
    h("div.row", {}, methodField, paramsField, onewayField, timeoutField), send, sendStatus);

  // --- the batch's progress -------------------------------------------------------------------------------------
  const progressCard = h("section.card.batch", { "aria-labelledby": "batch-title", hidden: true });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let parsed = {};
    try {
      parsed = params.value.trim() ? JSON.parse(params.value) : {};
    } catch (err) {
      saySend(`Params are not valid JSON: ${err.message}`, "error");
      return;
    }
    const body = { method: method.value.trim(), params: parsed, oneway: oneway.checked };
    if (timeout.value) body.timeout = Number(timeout.value);
    if (byType.checked) {
      if (!typeInput.value.trim()) {
        saySend("Give a device type.", "error");
        typeInput.focus();
        return;
      }
      body.deviceType = typeInput.value.trim();
    } else {
      if (!selected.size) {
        saySend("Select at least one device.", "error");
        return;
      }
      body.deviceIds = [...selected.keys()];
    }
    send.disabled = true;
    saySend("Sending…", "busy");
    try {
      const batch = await api.post("/api/rpc/bulk", body);
      saySend(`Batch ${batch.batchId} accepted: ${batch.total} command${batch.total === 1 ? "" : "s"}.`);
      stopWatching();
      stopWatching = watch(batch, body);
    } catch (err) {
      saySend(`The bulk RPC was refused — ${err.message}`, "error");
    } finally {
      send.disabled = false;
    }
  });

  function watch(batch, body) {
    const counts = new Map();
    const grid = h("dl.counts", {}, [...COUNTED, "REJECTED", "NOT YET QUEUED"].map((status) => {
      const value = h("dd.zero", { "data-status": status }, "0");
      counts.set(status, value);
      return h("div", { class: `count ${status.replace(/ /g, "_")}` }, h("dt", {}, status), value);
    }));
    const bar = h("progress", { max: batch.total, value: 0, "aria-labelledby": "batch-progress" });
    const barText = h("span", { id: "batch-progress" }, `0 of ${batch.total} finished`);
    const [status, say] = statusLine();
    const cancel = h("button", { type: "button" }, "Cancel unfinished");
    clear(progressCard,
      h("h2", { id: "batch-title" }, `Batch ${batch.batchId.slice(0, 8)}: ${body.method}`),
      h("p.meta", {}, `${batch.total} device${batch.total === 1 ? "" : "s"}`,
        body.deviceType ? ` of type ${body.deviceType}` : " selected", " · id ", h("code", {}, batch.batchId)),
      h("div.progress", {}, bar, barText), grid, status, cancel);
    progressCard.hidden = false;
    let stopped = false;
    let timer = null;
    let inflight = false;
    let again = false;

    async function refresh() {
      if (stopped) return;
      if (inflight) {
        again = true;
        return;
      }
      inflight = true;
      clearTimeout(timer);
      try {
        const state = await api.get(`/api/rpc/bulk/${batch.batchId}?rpcIds=false`);
        const c = state.statusCounts || {};
        const show = (name, value) => {
          const dd = counts.get(name);
          dd.textContent = String(value || 0);
          dd.classList.toggle("zero", !value);
        };
        for (const s of COUNTED) show(s, c[s]);
        show("REJECTED", state.rejectedCount);
        show("NOT YET QUEUED", state.notYetQueued);
        const finished = FINAL.reduce((sum, s) => sum + (c[s] || 0), 0) + (state.rejectedCount || 0);
        bar.value = finished;
        barText.textContent = `${finished} of ${state.total} finished${state.queueing ? " (still queueing)" : ""}`;
        if (finished >= state.total && !state.queueing) {
          say(`Done: ${c.SUCCESSFUL || 0} successful of ${state.total}.`);
          cancel.disabled = true;
          stopped = true;
        } else {
          say(`Updated ${new Date().toLocaleTimeString()}.`);
        }
      } catch (err) {
        say(`Could not read the batch — ${err.message}`, "error");
      } finally {
        inflight = false;
      }
      if (stopped) return;
      if (again) {
        again = false;
        refresh();
      } else {
        timer = setTimeout(refresh, POLL_MS);
      }
    }

    // A live event of one of the batch's commands: read the counts again soon (several events, one read).
    let soon = null;
    const unsubscribe = live.subscribe("*");
    const unlisten = live.listen((frame) => {
      const initiator = frame.rpc && frame.rpc.initiator;
      if (!initiator || initiator.batchId !== batch.batchId || soon) return;
      soon = setTimeout(() => {
        soon = null;
        refresh();
      }, 200);
    });
    const unreopen = live.onReopen(() => refresh());
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        const result = await api.delete(`/api/rpc/bulk/${batch.batchId}`);
        say(`Cancelled ${result.deleted} unfinished command${result.deleted === 1 ? "" : "s"}.`);
        refresh();
      } catch (err) {
        cancel.disabled = false;
        say(`Could not cancel — ${err.message}`, "error");
      }
    });
    refresh();
    return () => {
      stopped = true;
      clearTimeout(timer);
      clearTimeout(soon);
      unreopen();
      unlisten();
      unsubscribe();
    };
  }

  view.append(h("h1", {}, "Fleet"), h("p.hint", {}, "One command to many devices: each gets its own persistent RPC."),
    form, progressCard);
  updateSelected();
  return () => {
    stopWatching();
    clearTimeout(searchTimer);
    clearTimeout(countTimer);
  };
}
