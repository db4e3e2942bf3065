// The RPC debug terminal (ThingsBoard's widget): a ``method params`` line, one-way, two-way or persistent, a timeout;
// each command gets a line with the answer or the failure, never silence.

import { h, field } from "../dom.js";
import { sendRpc } from "./rpc.js";

const HELP = "Type a method and optional JSON params, e.g. getValue or setGpio {\"pin\": 7, \"value\": 1}. " +
  "Commands: help, clear. ↑/↓ recall earlier lines.";

/** Splits "method params" into [method, params]; throws with a readable message when params are not JSON. */
export function parseCommand(line) {
  const text = line.trim();
  const match = text.match(/^(\S+)\s*([\s\S]*)$/);
  if (!match) throw new Error("Type a method name first");
  const [, method, rest] = match;
  if (!rest) return [method, {}];
  try {
    return [method, JSON.parse(rest)];
  } catch (err) {
    throw new Error(`params are not valid JSON (${err.message}); quote strings: ${method} "text"`);
  }
}

export function terminal(api, id) {
  const log = h("ol.terminal-log", { role: "log", "aria-live": "polite", "aria-label": "Terminal output" });
  const [lineField, line] = field("Command", h("input", { name: "command", autocomplete: "off", spellcheck: "false",
    placeholder: "getValue {}", class: "mono" }));
  const [modeField, mode] = field("Call", h("select", { name: "mode" },
    h("option", { value: "twoway" }, "two-way"), h("option", { value: "oneway" }, "one-way")));
  const persistent = h("input", { type: "checkbox", name: "persistent", id: `persistent-${id}` });
  const persistentField = h("div.field.check", {}, persistent, h("label", { for: persistent.id }, "persistent"));
  const [timeoutField, timeout] = field("Timeout (ms)", h("input", { type: "number", name: "timeout", min: 0,
    step: 1000, value: 10000 }));
  const send = h("button", { type: "submit" }, "Send");
  const form = h("form.terminal-form", { "aria-label": "Send a command" }, lineField,
    h("div.row", {}, modeField, persistentField, timeoutField, send));
  const history = [];
  let recall = 0;

  function print(kind, text) {
    const item = h(`li.${kind}`, {}, text);
    log.append(item);
    while (log.children.length > 200) log.firstElementChild.remove();
    log.scrollTop = log.scrollHeight;
    return item;
  }

  line.addEventListener("keydown", (event) => {
    if (event.key === "ArrowUp" && recall > 0) {
      recall -= 1;
      line.value = history[recall];
      event.preventDefault();
    } else if (event.key === "ArrowDown" && recall < history.length) {
      recall += 1;
      line.value = history[recall] || "";
      event.preventDefault();
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = line.value.trim();
    if (!text) {
      print("err", "Nothing to send: " + HELP);
      return;
    }
    history.push(text);
    recall = history.length;
    line.value = "";
    if (text === "clear") {
      log.replaceChildren();
      return;
    }
    if (text === "help") {
      print("info", HELP);
      return;
    }
    let method;
    let params;
    try {
      [method, params] = parseCommand(text);
    } catch (err) {
      print("err", `✗ ${err.message}`);
      return;
    }
    const oneway = mode.value === "oneway";
    const isPersistent = persistent.checked;
    const kind = `${isPersistent ? "persistent " : ""}${oneway ? "one-way" : "two-way"}`;
    print("cmd", `> ${method} ${JSON.stringify(params)}  (${kind})`);
    const pending = print("busy", "… waiting");
    const started = performance.now();
    try {
      const answer = await sendRpc(api, id, { method, params, oneway, persistent: isPersistent,
        timeout: timeout.value });
      const ms = Math.round(performance.now() - started);
      pending.className = "out";
      if (isPersistent) {
        pending.textContent = `✓ queued, rpcId ${answer && answer.rpcId} (${ms} ms): `
          + "its progress is in the table below";
      } else if (oneway) {
        pending.textContent = `✓ delivered (${ms} ms)`;
      } else {
        pending.textContent = `← ${answer === null ? "(empty answer)" : JSON.stringify(answer)}  (${ms} ms)`;
      }
    } catch (err) {
      pending.className = "err";
      pending.textContent = `✗ ${err.message}`;
    }
  });

  print("info", HELP);
  return h("section.card.terminal", { "aria-labelledby": "terminal-title" },
    h("h2", { id: "terminal-title" }, "RPC debug terminal"), log, form);
}
