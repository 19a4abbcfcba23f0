// The one way the page talks to the API: JSON in, JSON out, the bearer token added when we have one.
// When the server answers 401 the page asks for a token once (a <dialog>, not window.prompt, so it is
// labelled and keyboard-friendly) and keeps it in sessionStorage: it lives as long as the tab, and
// never lands in localStorage where it would outlive the session.
const TOKEN_KEY = "fitprobe-token";
let asking = null; // one question at a time, however many requests got a 401 together

export class ApiError extends Error {
  constructor(status, body) {
    super(typeof body?.detail === "string" ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

function askForToken(rejected) {
  const dialog = document.getElementById("token-dialog");
  if (asking) {
    if (rejected) dialog.querySelector(".token-rejected").hidden = false; // a token tried meanwhile was refused
    return asking;
  }
  const form = dialog.querySelector("form");
  const input = dialog.querySelector("input");
  dialog.querySelector(".token-rejected").hidden = !rejected;
  input.value = "";
  asking = new Promise((resolve) => {
    form.addEventListener("submit", () => {
      // method="dialog" closes it; the value travels through sessionStorage
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      asking = null;
      resolve(true);
    }, { once: true });
    dialog.addEventListener("cancel", () => { asking = null; resolve(false); }, { once: true });
  });
  dialog.showModal();
  input.focus();
  return asking;
}

export async function request(path, { method = "GET", body, headers = {}, raw = false } = {}) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const sent = { ...headers };
    if (token) sent.Authorization = `Bearer ${token}`;
    if (body !== undefined) sent["Content-Type"] = "application/json";
    // no-store: our own If-None-Match must reach the server and its 304 must reach us
    const response = await fetch(path, { method, headers: sent, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body) });
    if (response.status === 401) {
      // sent before a token was entered (or with one replaced since): not a verdict on the current one, retry
      if (sessionStorage.getItem(TOKEN_KEY) !== token) continue;
      if (token) sessionStorage.removeItem(TOKEN_KEY);
      if (await askForToken(Boolean(token))) continue;
    }
    if (raw) return response;
    const parsed = response.status === 204 || response.status === 304 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, parsed);
    return parsed;
  }
}
