// Devices: paged and searchable, presence live from the WebSocket, access tokens for those allowed, create.

import { h, clear, field } from "../dom.js";
import { listDevices, deviceId, presenceBadge, pager, seedPresence, statusLine } from "./common.js";

const PAGE_SIZE = 20;

export function devicesPage(view, { api, presence }) {
  let page = 0;
  let search = "";
  let stops = [];
  const [searchField, searchInput] = field("Search by name", h("input", { type: "search", name: "textSearch" }));
  const searchForm = h("form.inline", { role: "search" }, searchField, h("button", { type: "submit" }, "Search"));
  const tbody = h("tbody");
  const [listStatus, sayList] = statusLine();
  const [pagerEl, updatePager] = pager((step) => {
    page = Math.max(0, page + step);
    load();
  }, "Device pages");
  const table = h("div.table-wrap", {},
    h("table.devices", {},
      h("caption", {}, "Your devices"),
      h("thead", {}, h("tr", {}, ["Name", "Type", "Label", "Status", "Access token"].map(
        (t) => h("th", { scope: "col" }, t)))),
      tbody));

  searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    search = searchInput.value.trim();
    page = 0;
    load();
  });

  async function load() {
    sayList("Loading…", "busy");
    try {
      const data = await listDevices(api, { page, pageSize: PAGE_SIZE, textSearch: search });
      seedPresence(presence, data.data);
      stops.forEach((stop) => stop());
      stops = [];
      clear(tbody, data.data.map(row));
      if (!data.data.length) {
        tbody.append(h("tr", {}, h("td", { colspan: 5 }, search ? "No device matches." : "No devices yet.")));
      }
      updatePager(page, data);
      sayList(`${data.totalElements} device${data.totalElements === 1 ? "" : "s"}`);
    } catch (err) {
      sayList(`Could not load devices — ${err.message}`, "error");
    }
  }

  function row(device) {
    const id = deviceId(device);
    const [badge, stop] = presenceBadge(presence, id);
    stops.push(stop);
    const tokenCell = h("td.token");
    const show = h("button", { type: "button", class: "small", "aria-label": `Show access token of ${device.name}` },
      "Show");
    show.addEventListener("click", async () => {
      show.disabled = true;
      try {
        const credentials = await api.get(`/api/device/${id}/credentials`);
        clear(tokenCell, h("code", {}, credentials.credentialsId || `(${credentials.credentialsType})`));
      } catch (err) {
        clear(tokenCell, h("span.error", {}, err.message));
      }
    });
    tokenCell.append(show);
    return h("tr", { "data-device": id },
      h("th", { scope: "row" }, h("a", { href: `#/device/${id}` }, device.name)),
      h("td", {}, device.type), h("td", {}, device.label || ""), h("td", {}, badge), tokenCell);
  }

  // --- create ---------------------------------------------------------------------------------------------------
  const [nameField, nameInput] = field("Name", h("input", { name: "name", required: true, maxlength: 255 }));
  const [typeField, typeInput] = field("Type", h("input", { name: "type", placeholder: "default" }));
  const [labelField, labelInput] = field("Label", h("input", { name: "label" }));
  const [tokenField, tokenInput] = field("Access token", h("input", { name: "accessToken", autocomplete: "off" }),
    "Empty: the server generates one.");
  const [createStatus, sayCreate] = statusLine();
  const createForm = h("form.card.create", { "aria-labelledby": "create-title" },
    h("h2", { id: "create-title" }, "Create a device"),
    h("div.grid", {}, nameField, typeField, labelField, tokenField),
    h("button", { type: "submit" }, "Create device"), createStatus);
  createForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: nameInput.value.trim(), type: typeInput.value.trim() || "default" };
    if (labelInput.value.trim()) body.label = labelInput.value.trim();
    const token = tokenInput.value.trim();
    sayCreate("Creating…", "busy");
    try {
      const query = token ? `?accessToken=${encodeURIComponent(token)}` : "";
      const device = await api.post(`/api/device${query}`, body);
      sayCreate(`Created ${device.name}.`);
      createForm.reset();
      load();
    } catch (err) {
      sayCreate(`Could not create the device — ${err.message}`, "error");
    }
  });

  view.append(h("h1", {}, "Devices"), searchForm, listStatus, table, pagerEl, createForm);
  load();
  return () => stops.forEach((stop) => stop());
}
