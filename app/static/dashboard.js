// The dashboard's shell: a hash router over four views (probe list with devices, new probe, one
// probe, the what-if heat map). Hash routes keep it one static file set the service serves as is: no
// server-side routing.
import { request } from "./api.js";
import { h } from "./dom.js";
import { setUpForm } from "./form.js";
import { formatBytes, modelLabel, planText, timeText } from "./format.js";
import { showJob } from "./job.js";
import { showRecommendation } from "./recommend.js";
import { setUpWhatIf } from "./whatif.js";

const LIST_POLL_MS = 2000;
// job statuses: UNFINISHED of client/fitprobe_client/status.py, the values the API sends
const ACTIVE = ["queued", "running"];
const views = { list: "list-view", new: "new-view", job: "job-view", whatif: "whatif-view",
  recommend: "recommend-view" };
let route = 0; // bumped on every navigation, so loops of the page we left stop

function show(view) {
  for (const [name, id] of Object.entries(views)) document.getElementById(id).hidden = name !== view;
}

function navigate() {
  const current = ++route;
  const isCurrent = () => route === current;
  document.getElementById("error").textContent = "";
  const match = /^#\/probes\/([\w-]+)$/.exec(location.hash);
  const recommendation = /^#\/recommendations\/([\w-]+)$/.exec(location.hash);
  if (match) {
    show("job");
    showJob(document.getElementById("job-view"), match[1], isCurrent);
  } else if (recommendation) {
    show("recommend");
    showRecommendation(document.getElementById("recommend-view"), recommendation[1], isCurrent);
  } else if (location.hash === "#/whatif") {
    show("whatif");
    setUpWhatIf(document.getElementById("whatif-view"));
  } else if (location.hash === "#/new") {
    show("new");
    document.getElementById("f-model").focus();
  } else {
    show("list");
    watchList(isCurrent);
  }
}

// ---- probe list --------------------------------------------------------------------------------
let rows = [];

async function watchList(isCurrent) {
  while (isCurrent()) {
    await refreshList();
    await new Promise((resolve) => setTimeout(resolve, LIST_POLL_MS));
  }
}

async function refreshList() {
  const status = document.getElementById("filter-status").value;
  try {
    // the compact view: rows without trials and reports, a few hundred bytes each
    const body = await request(`/v1/probes?view=compact&limit=100${status ? `&status=${status}` : ""}`);
    rows = body.items;
    document.getElementById("error").textContent = "";
  } catch (err) {
    document.getElementById("error").textContent = `cannot list probes: ${err.message}`;
  }
  fillFilter("filter-model", rows.map((row) => modelLabel(row.model)));
  fillFilter("filter-device", rows.map((row) => row.device).filter(Boolean));
  renderList();
  await refreshDevices();
}

// Offer the models and devices the listed probes used; keep the user's choice while the list moves.
function fillFilter(id, values) {
  const select = document.getElementById(id);
  const chosen = select.value;
  const options = [...new Set([...values, chosen].filter(Boolean))].sort();
  const current = [...select.options].slice(1).map((o) => o.value);
  if (options.join("\n") === current.join("\n")) return;
  select.replaceChildren(h("option", { value: "" }, "any"), ...options.map((v) => h("option", { value: v }, v)));
  select.value = chosen;
}

function renderList() {
  const model = document.getElementById("filter-model").value;
  const device = document.getElementById("filter-device").value;
  const shown = rows.filter((row) => (!model || modelLabel(row.model) === model) && (!device || row.device === device));
  document.getElementById("jobs").replaceChildren(...shown.map((row) => h("tr", { dataset: { id: row.id } },
    h("td", {}, h("a", { href: `#/probes/${row.id}` }, h("code", {}, row.id))),
    h("td", { class: `status ${row.does_not_fit ? "does-not-fit" : row.status}` },
      (row.does_not_fit ? "does not fit" : row.status) + (row.cached ? " (cached)" : "")),
    h("td", {}, row.phase ?? ""),
    h("td", {}, modelLabel(row.model)),
    h("td", {}, row.spec?.seq_len ?? "(unreadable)"),
    h("td", {}, row.device ?? "-"),
    h("td", {}, row.max_micro_batch ? `${row.max_micro_batch} / ${row.safe_micro_batch}` : "-"),
    h("td", {}, row.plan ? planText(row.plan) : "-"),
    h("td", {}, row.verified === null ? "-" : row.verified ? "yes" : "no"),
    h("td", {}, timeText(row.created_at)),
    h("td", {}, ACTIVE.includes(row.status)
      ? h("button", { type: "button", class: "danger small", "aria-label": `cancel probe ${row.id}`,
        onclick: (event) => cancel(row.id, event.target) }, "Cancel")
      : ""),
  )));
  if (!shown.length) {
    document.getElementById("jobs").append(h("tr", {}, h("td", { colspan: 11, class: "meta" },
      rows.length ? "no probe matches these filters" : "no probes yet: start one under New probe")));
  }
}

async function cancel(id, button) {
  button.disabled = true;
  try {
    await request(`/v1/probes/${id}`, { method: "DELETE" });
  } catch (err) {
    document.getElementById("error").textContent = `cannot cancel ${id}: ${err.message}`;
  }
  await refreshList();
}

// ---- devices -----------------------------------------------------------------------------------
async function refreshDevices() {
  const root = document.getElementById("devices");
  try {
    const { devices } = await request("/v1/devices");
    // what each device runs comes from the list: a running probe names its device
    const running = Object.fromEntries(rows.filter((r) => r.status === "running" && r.device).map((r) => [r.device, r]));
    root.replaceChildren(h("ul", { class: "devices" }, devices.map((d) => h("li", {},
      h("strong", {}, d.device), ` ${d.name} · `,
      d.capacity_bytes ? `capacity ${formatBytes(d.capacity_bytes)} · ` : "",
      `total ${formatBytes(d.total_bytes)} · free ${formatBytes(d.free_bytes)}`,
      d.other_processes?.length ? ` · ${d.other_processes.length} other process(es) hold `
        + formatBytes(d.other_processes.reduce((sum, p) => sum + (p.used_bytes ?? 0), 0)) : "",
      " · ", running[d.device]
        ? h("span", {}, "running ", h("a", { href: `#/probes/${running[d.device].id}` }, running[d.device].id))
        : "idle"))));
  } catch (err) {
    root.replaceChildren(h("p", { class: "error" }, `cannot read devices: ${err.message}`));
  }
}

for (const id of ["filter-model", "filter-device"]) document.getElementById(id).addEventListener("change", renderList);
document.getElementById("filter-status").addEventListener("change", refreshList);
setUpForm((job) => { location.hash = `#/probes/${job.id}`; },
  (job) => { location.hash = `#/recommendations/${job.id}`; });
window.addEventListener("hashchange", navigate);
navigate();
