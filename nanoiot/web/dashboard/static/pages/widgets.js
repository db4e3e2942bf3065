// Control widgets bound to RPC methods, configured per device and kept server-side in the device's
// ``additionalInfo.nanoiotWidgets`` (saved with POST /api/device): switch, slider, knob, button, LED.

import { h, clear, field } from "../dom.js";
import { sendRpc, truthy, numeric } from "./rpc.js";
import { statusLine } from "./common.js";

export const WIDGET_TYPES = ["switch", "slider", "knob", "button", "led"];
const RPC_TIMEOUT = 10000;

function errorText(err) {
  return err && err.message ? err.message : String(err);
}

/** The widgets stored on a device (a missing or malformed list is an empty one). */
export function widgetsOf(device) {
  const info = device.additionalInfo;
  const list = info && typeof info === "object" ? info.nanoiotWidgets : null;
  return Array.isArray(list) ? list.filter((w) => w && WIDGET_TYPES.includes(w.type)) : [];
}

/** Saves ``widgets`` on the device: the latest device is read first so that other edits are kept. */
export async function saveWidgets(api, id, widgets) {
  const device = await api.get(`/api/device/${id}`);
  const info = device.additionalInfo && typeof device.additionalInfo === "object" ? device.additionalInfo : {};
  device.additionalInfo = { ...info, nanoiotWidgets: widgets };
  return api.post("/api/device", device);
}

// --- the widgets ----------------------------------------------------------------------------------------------------

function switchWidget(api, id, w, say) {
  let state = null;
  const setMethod = w.method || "setValue";
  const getMethod = w.getMethod || "getValue";
  const button = h("button.switch", { type: "button", role: "switch", "aria-checked": "false",
    "aria-label": w.label || setMethod }, h("span.knob-dot"));
  const show = () => {
    button.setAttribute("aria-checked", state === true ? "true" : "false");
    button.dataset.state = state === null ? "unknown" : state ? "on" : "off";
  };
  button.addEventListener("click", async () => {
    const value = !(state === true);
    button.disabled = true;
    say(`${setMethod} {"value": ${value}}…`, "busy");
    try {
      await sendRpc(api, id, { method: setMethod, params: { value }, timeout: RPC_TIMEOUT });
      state = value;
      say(`Turned ${value ? "on" : "off"}.`);
    } catch (err) {
      say(`${setMethod} failed — ${errorText(err)}`, "error");
    } finally {
      button.disabled = false;
      show();
    }
  });
  show();
  say(`Reading ${getMethod}…`, "busy");
  sendRpc(api, id, { method: getMethod, params: {}, timeout: RPC_TIMEOUT }).then(
    (answer) => {
      state = truthy(answer);
      show();
      say(`State read: ${state ? "on" : "off"}.`);
    },
    (err) => say(`State unknown: ${getMethod} failed — ${errorText(err)}`, "error"));
  return [button, null];
}

function rangeOf(w) {
  const min = Number.isFinite(Number(w.min)) && w.min !== "" && w.min !== undefined ? Number(w.min) : 0;
  let max = Number.isFinite(Number(w.max)) && w.max !== "" && w.max !== undefined ? Number(w.max) : 100;
  if (max <= min) max = min + 1;
  return [min, max];
}

async function setNumber(api, id, w, value, say) {
  const method = w.method || "setValue";
  say(`${method} {"value": ${value}}…`, "busy");
  try {
    await sendRpc(api, id, { method, params: { value }, timeout: RPC_TIMEOUT });
    say(`Set to ${value}.`);
  } catch (err) {
    say(`${method} failed — ${errorText(err)}`, "error");
  }
}

function readNumber(api, id, w, say, apply) {
  if (!w.getMethod) return;
  say(`Reading ${w.getMethod}…`, "busy");
  sendRpc(api, id, { method: w.getMethod, params: {}, timeout: RPC_TIMEOUT }).then((answer) => {
    const value = numeric(answer);
    if (Number.isNaN(value)) say(`${w.getMethod} answered ${JSON.stringify(answer)}: not a number`, "error");
    else {
      apply(value);
      say(`Value read: ${value}.`);
    }
  }, (err) => say(`Value unknown: ${w.getMethod} failed — ${errorText(err)}`, "error"));
}

function sliderWidget(api, id, w, say) {
  const [min, max] = rangeOf(w);
  const input = h("input", { type: "range", min, max, step: w.step || 1, value: min,
    "aria-label": w.label || "value" });
  const out = h("output", {}, String(min));
  input.addEventListener("input", () => { out.textContent = input.value; });
  input.addEventListener("change", () => setNumber(api, id, w, Number(input.value), say));
  readNumber(api, id, w, say, (value) => { input.value = value; out.textContent = input.value; });
  return [h("div.slider", {}, input, out), null];
}

const KNOB_SWEEP = 270; // degrees from min to max

function knobWidget(api, id, w, say) {
  const [min, max] = rangeOf(w);
  const step = Number(w.step) || (max - min > 20 ? 1 : (max - min) / 100);
  let value = min;
  let commitTimer = null;
  const svgNs = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("viewBox", "0 0 100 100");
  svg.setAttribute("aria-hidden", "true");
  const track = document.createElementNS(svgNs, "path");
  track.setAttribute("class", "knob-track");
  const arc = document.createElementNS(svgNs, "path");
  arc.setAttribute("class", "knob-arc");
  const text = document.createElementNS(svgNs, "text");
  text.setAttribute("x", "50");
  text.setAttribute("y", "56");
  text.setAttribute("text-anchor", "middle");
  svg.append(track, arc, text);
  const dial = h("div.knob", { role: "slider", tabindex: 0, "aria-label": w.label || "value", "aria-valuemin": min,
    "aria-valuemax": max });
  dial.append(svg);

  const point = (deg) => {
    const rad = ((deg - 90) * Math.PI) / 180;
    return `${(50 + 40 * Math.cos(rad)).toFixed(2)} ${(50 + 40 * Math.sin(rad)).toFixed(2)}`;
  };
  const arcPath = (from, to) => `M ${point(from)} A 40 40 0 ${to - from > 180 ? 1 : 0} 1 ${point(to)}`;
  track.setAttribute("d", arcPath(-KNOB_SWEEP / 2, KNOB_SWEEP / 2));
  const show = () => {
    const deg = -KNOB_SWEEP / 2 + ((value - min) / (max - min)) * KNOB_SWEEP;
    arc.setAttribute("d", arcPath(-KNOB_SWEEP / 2, Math.max(deg, -KNOB_SWEEP / 2 + 0.01)));
    text.textContent = String(Math.round(value * 100) / 100);
    dial.setAttribute("aria-valuenow", value);
  };
  const set = (next, commitNow) => {
    value = Math.min(max, Math.max(min, Math.round(next / step) * step));
    value = Math.round(value * 1e6) / 1e6;
    show();
    clearTimeout(commitTimer);
    commitTimer = setTimeout(() => setNumber(api, id, w, value, say), commitNow ? 0 : 400);
  };
  dial.addEventListener("keydown", (event) => {
    const big = Math.max(step, (max - min) / 10);
    const moves = { ArrowUp: step, ArrowRight: step, ArrowDown: -step, ArrowLeft: -step, PageUp: big, PageDown: -big };
    if (event.key in moves) set(value + moves[event.key]);
    else if (event.key === "Home") set(min);
    else if (event.key === "End") set(max);
    else return;
    event.preventDefault();
  });
  let dragging = false;
  const fromPointer = (event) => {
    const box = dial.getBoundingClientRect();
    const deg = (Math.atan2(event.clientX - (box.left + box.width / 2), -(event.clientY - (box.top + box.height / 2)))
      * 180) / Math.PI;
    const clamped = Math.min(KNOB_SWEEP / 2, Math.max(-KNOB_SWEEP / 2, deg));
    return min + ((clamped + KNOB_SWEEP / 2) / KNOB_SWEEP) * (max - min);
  };
  dial.addEventListener("pointerdown", (event) => {
    dragging = true;
    dial.setPointerCapture(event.pointerId);
    dial.focus();
    value = fromPointer(event);
    show();
  });
  dial.addEventListener("pointermove", (event) => {
    if (!dragging) return;
    value = Math.min(max, Math.max(min, fromPointer(event)));
    show();
  });
  dial.addEventListener("pointerup", () => {
    if (!dragging) return;
    dragging = false;
    set(value, true);
  });
  show();
  readNumber(api, id, w, say, (read) => { value = Math.min(max, Math.max(min, read)); show(); });
  return [dial, () => clearTimeout(commitTimer)];
}

function buttonWidget(api, id, w, say) {
  const method = w.method || "press";
  const button = h("button.action", { type: "button" }, w.label || method);
  button.addEventListener("click", async () => {
    button.disabled = true;
    say(`${method}…`, "busy");
    try {
      const answer = await sendRpc(api, id, { method, params: w.params ?? {}, oneway: Boolean(w.oneway),
        timeout: RPC_TIMEOUT });
      say(w.oneway ? "Delivered." : `Answer: ${answer === null ? "(empty)" : JSON.stringify(answer)}`);
    } catch (err) {
      say(`${method} failed — ${errorText(err)}`, "error");
    } finally {
      button.disabled = false;
    }
  });
  return [button, null];
}

function ledWidget(api, id, w, say) {
  const method = w.getMethod || w.method || "getValue";
  const every = Math.max(1000, Number(w.pollMs) || 5000);
  const led = h("span.led", { role: "img", "aria-label": "unknown", "data-state": "unknown" });
  const label = h("span.led-text", {}, "unknown");
  let timer = null;
  let stopped = false;
  const poll = async () => {
    try {
      const answer = await sendRpc(api, id, { method, params: {},
        timeout: Math.max(5000, Math.min(every, RPC_TIMEOUT)) });
      const on = truthy(answer);
      led.dataset.state = on ? "on" : "off";
      label.textContent = on ? "on" : "off";
      say(`${method} → ${JSON.stringify(answer)} at ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      led.dataset.state = "unknown";
      label.textContent = "unknown";
      say(`${method} failed — ${errorText(err)}`, "error");
    }
    led.setAttribute("aria-label", label.textContent);
    if (!stopped) timer = setTimeout(poll, every);
  };
  poll();
  return [h("div.led-wrap", {}, led, label), () => { stopped = true; clearTimeout(timer); }];
}

const BUILDERS = { switch: switchWidget, slider: sliderWidget, knob: knobWidget, button: buttonWidget, led: ledWidget };

// --- the panel ------------------------------------------------------------------------------------------------------

/** The widgets panel of a device page; returns [element, stop]. */
export function widgetsPanel(api, id, device, notify) {
  let widgets = widgetsOf(device);
  let stops = [];
  const grid = h("div.widgets");
  const [panelStatus, sayPanel] = statusLine();

  function render() {
    stops.forEach((stop) => stop && stop());
    stops = [];
    clear(grid);
    if (!widgets.length) grid.append(h("p.hint", {}, "No widgets yet: add one below."));
    widgets.forEach((w, index) => {
      const [status, say] = statusLine();
      let control;
      let stop;
      try {
        [control, stop] = BUILDERS[w.type](api, id, w, say);
      } catch (err) {
        control = h("p.error", {}, `This widget cannot be shown: ${errorText(err)}`);
      }
      stops.push(stop);
      const remove = h("button.remove", { type: "button", title: "Remove this widget",
        "aria-label": `Remove widget ${w.label || w.type}` }, "×");
      remove.addEventListener("click", () => save(widgets.filter((_, i) => i !== index), "Widget removed."));
      grid.append(h(`div.widget.w-${w.type}`, { "data-widget": w.type, "data-label": w.label || "" },
        h("div.widget-head", {}, h("h3", {}, w.label || w.type), h("span.tag", {}, w.type), remove),
        h("div.widget-body", {}, control), status));
    });
  }

  async function save(next, done) {
    sayPanel("Saving…", "busy");
    try {
      const saved = await saveWidgets(api, id, next);
      widgets = widgetsOf(saved);
      render();
      sayPanel(done);
      return true;
    } catch (err) {
      sayPanel(`Could not save the widgets — ${errorText(err)}`, "error");
      return false;
    }
  }

  // The editor: fields shown according to the widget type.
  const [typeField, type] = field("Type", h("select", { name: "widgetType" },
    WIDGET_TYPES.map((t) => h("option", { value: t }, t))));
  const [labelField, label] = field("Label", h("input", { name: "widgetLabel", required: true }));
  const [methodField, method] = field("Method", h("input", { name: "widgetMethod", placeholder: "setValue" }));
  const [getField, getMethod] = field("Read with", h("input", { name: "widgetGetMethod", placeholder: "getValue" }),
    "Two-way method giving the current state");
  const [paramsField, params] = field("Params (JSON)", h("input", { name: "widgetParams", placeholder: "{}",
    class: "mono" }));
  const oneway = h("input", { type: "checkbox", name: "widgetOneway", id: `widget-oneway-${id}` });
  const onewayField = h("div.field.check", {}, oneway, h("label", { for: oneway.id }, "one-way"));
  const [minField, min] = field("Min", h("input", { type: "number", name: "widgetMin", value: 0, step: "any" }));
  const [maxField, max] = field("Max", h("input", { type: "number", name: "widgetMax", value: 100, step: "any" }));
  const [pollField, pollMs] = field("Poll every (ms)", h("input", { type: "number", name: "widgetPollMs", value: 5000,
    min: 1000, step: 500 }));
  const shown = {
    switch: [methodField, getField], slider: [methodField, getField, minField, maxField],
    knob: [methodField, getField, minField, maxField], button: [methodField, paramsField, onewayField],
    led: [getField, pollField],
  };
  const optional = [methodField, getField, paramsField, onewayField, minField, maxField, pollField];
  const showFields = () => {
    for (const f of optional) f.hidden = !shown[type.value].includes(f);
    method.placeholder = type.value === "button" ? "reboot" : "setValue";
  };
  type.addEventListener("change", showFields);
  showFields();
  const editor = h("form.widget-editor", { "aria-labelledby": `widget-editor-${id}` },
    h("h3", { id: `widget-editor-${id}` }, "Add a widget"),
    h("div.grid", {}, typeField, labelField, ...optional), h("button", { type: "submit" }, "Add widget"));
  editor.addEventListener("submit", async (event) => {
    event.preventDefault();
    const w = { type: type.value, label: label.value.trim() };
    const value = (input) => input.value.trim();
    if (!shown[w.type].includes(methodField) || !value(method)) {
      if (w.type === "button") {
        sayPanel("A button needs a method.", "error");
        return;
      }
    } else w.method = value(method);
    if (shown[w.type].includes(getField) && value(getMethod)) w.getMethod = value(getMethod);
    if (w.type === "switch") w.getMethod = w.getMethod || "getValue";
    if (w.type === "led") w.getMethod = w.getMethod || "getValue";
    if (w.type === "button") {
      try {
        w.params = value(params) ? JSON.parse(value(params)) : {};
      } catch (err) {
        sayPanel(`Params are not valid JSON: ${err.message}`, "error");
        return;
      }
      w.oneway = oneway.checked;
    }
    if (w.type === "slider" || w.type === "knob") {
      w.min = Number(min.value);
      w.max = Number(max.value);
      if (!(w.max > w.min)) {
        sayPanel("Max must be greater than min.", "error");
        return;
      }
    }
    if (w.type === "led") w.pollMs = Math.max(1000, Number(pollMs.value) || 5000);
    if (await save([...widgets, w], `Widget ${w.label} added.`)) {
      label.value = "";
      editor.closest("details").open = false;
    }
  });

  render();
  const panel = h("section.card", { "aria-labelledby": "widgets-title" },
    h("h2", { id: "widgets-title" }, "Control widgets"), grid, panelStatus,
    h("details.editor", {}, h("summary", {}, "Add a widget"), editor));
  return [panel, () => stops.forEach((stop) => stop && stop())];
}
