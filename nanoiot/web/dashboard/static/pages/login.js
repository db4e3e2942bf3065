// The login form: POST /api/auth/login; the server's message is shown on failure.

import { h, field } from "../dom.js";

export function loginPage(view, { api }, next) {
  const [userField, username] = field("Email", h("input", { type: "email", name: "username", autocomplete: "username",
    required: true }));
  const [passField, password] = field("Password", h("input", { type: "password", name: "password",
    autocomplete: "current-password", required: true }));
  const error = h("p.error", { role: "alert", id: "login-error" });
  const submit = h("button", { type: "submit" }, "Log in");
  const form = h("form.card.login", { "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Log in to NanoIoT"),
    userField, passField, error, submit,
    h("p.hint", {}, "Demo server (make run): tenant@nanoiot.io / tenant, customer@nanoiot.io / customer."));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    submit.disabled = true;
    try {
      await api.login(username.value.trim(), password.value);
      if (location.hash === next) window.dispatchEvent(new HashChangeEvent("hashchange"));
      else location.hash = next;
    } catch (err) {
      error.textContent = `Login failed — ${err.message}`;
      password.select();
    } finally {
      submit.disabled = false;
    }
  });
  view.append(form);
  username.focus();
  return null;
}
