// The what-if page (#/whatif): a what-if table drawn as a heat map. Rows are settings, columns seq_lens;
// a cell's shade is its max micro-batch against the table's largest, so "what must change to fit" reads
// as where the colour starts; its text names the safe micro-batch (the one that leaves the headroom free)
// apart from the max. The table comes from a job the page submits (POST /v1/whatif) or loads by
// id, polled until done (it is minutes of estimates, so the service runs it as a job), or from
// `fitprobe whatif --json` output pasted or loaded from a file.
import { request } from "./api.js";
import { h } from "./dom.js";
import { formatBytes } from "./format.js";

const SHADES = 5; // heat-0 (does not fit) … heat-5 (the table's largest micro-batch)
const POLL_MS = 1000;
const words = (text) => text.split(",").map((w) => w.trim()).filter(Boolean);

/** The submit/load form: a job's status line while it runs, its heat map in `out` once it succeeded. */
function jobForm(out) {
  const field = (id, label, value, hint) => [h("label", { for: id }, label),
    h("input", { id, name: id, value, placeholder: hint ?? "" })];
  const status = h("p", { id: "whatif-status", class: "meta", role: "status", "aria-live": "polite" });
  const loadId = h("input", { id: "whatif-job-id", name: "whatif-job-id", placeholder: "a what-if job's id" });
  let polling = 0; // a newer job replaces the one being polled
  const follow = async (id) => {
    const mine = ++polling;
    for (;;) {
      let job;
      try {
        job = await request(`/v1/whatif/${encodeURIComponent(id)}`);
      } catch (err) {
        status.replaceChildren(h("span", { class: "error", role: "alert" }, err.message));
        return;
      }
      if (mine !== polling) return;
      const done = job.progress ? ` · ${job.progress.done}/${job.progress.total} cells` : "";
      status.textContent = `what-if job ${job.id}: ${job.status}${done}`;
      if (job.status === "succeeded") return out.replaceChildren(heatMap(job.table));
      if (job.status === "failed" || job.status === "cancelled") {
        return out.replaceChildren(h("p", { class: "error", role: "alert" }, job.error ?? job.status));
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  };
  const form = h("form", { id: "whatif-form", "aria-label": "submit a what-if table" },
    ...field("whatif-model", "model", "", "preset:llama-3.2-1b, builtin:gpt-nano, hf:org/name"),
    ...field("whatif-gpu", "card (gpu)", "", "e.g. A100-40GB; or give a capacity"),
    ...field("whatif-capacity", "or capacity", "", "e.g. 24GiB"),
    ...field("whatif-seq-lens", "seq_lens", "1024,2048"),
    ...field("whatif-finetuning", "finetuning", "full,lora,qlora"),
    ...field("whatif-checkpointing", "checkpointing", "off,on"),
    ...field("whatif-optimizers", "optimizers", "adamw_torch_fused,adamw_bnb_8bit,paged_adamw_8bit"),
    ...field("whatif-precisions", "precisions", "bf16-mixed,bf16"),
    h("button", { type: "submit" }, "Estimate the table"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = (id) => form.querySelector(`#${id}`).value.trim();
    const body = { model: value("whatif-model"), seq_lens: words(value("whatif-seq-lens")).map(Number),
      finetuning: words(value("whatif-finetuning")), checkpointing: words(value("whatif-checkpointing")),
      optimizers: words(value("whatif-optimizers")) };
    if (value("whatif-precisions")) body.precisions = words(value("whatif-precisions"));
    if (value("whatif-gpu")) body.gpu = value("whatif-gpu");
    if (value("whatif-capacity")) body.capacity_bytes = value("whatif-capacity");
    try {
      const job = await request("/v1/whatif", { method: "POST", body });
      loadId.value = job.id;
      follow(job.id);
    } catch (err) {
      status.replaceChildren(h("span", { class: "error", role: "alert" }, err.message));
    }
  });
  const load = h("form", { id: "whatif-load", "aria-label": "load a what-if job" },
    h("label", { for: "whatif-job-id" }, "or load a job by id"), loadId, h("button", { type: "submit" }, "Load"));
  load.addEventListener("submit", (event) => {
    event.preventDefault();
    if (loadId.value.trim()) follow(loadId.value.trim());
  });
  return [form, load, status];
}

/** Sets up the paste box and file input in `root` once; every change redraws the map. */
export function setUpWhatIf(root) {
  if (root.dataset.ready) return;
  root.dataset.ready = "1";
  const input = h("textarea", { id: "whatif-json", rows: 6, placeholder: '{"model": …, "rows": [...]}',
    "aria-describedby": "whatif-help" });
  const file = h("input", { id: "whatif-file", type: "file", accept: ".json,application/json" });
  const out = h("div", { id: "whatif-map" });
  const draw = () => {
    if (!input.value.trim()) return out.replaceChildren();
    try {
      out.replaceChildren(heatMap(JSON.parse(input.value)));
    } catch (err) {
      out.replaceChildren(h("p", { class: "error", role: "alert" }, `not a what-if table: ${err.message}`));
    }
  };
  input.addEventListener("input", draw);
  file.addEventListener("change", async () => {
    input.value = await file.files[0].text();
    draw();
  });
  root.replaceChildren(
    h("h2", {}, "What-if table"),
    h("p", { class: "meta" }, "Which settings fit on the card, at which seq_len, with which micro-batch "
      + "(estimated under fake tensors: no device is used)."),
    ...jobForm(out),
    h("p", { id: "whatif-help", class: "meta" }, "Or paste or load the output of ",
      h("code", {}, "fitprobe whatif --model M --gpu CARD --seq-len 1024,2048,4096 --json"),
      ": which settings fit on the card, at which seq_len, with which micro-batch (estimated)."),
    h("label", { for: "whatif-json" }, "what-if JSON"), input,
    h("label", { for: "whatif-file" }, "or load a file"), file, out);
}

/** A fitting cell's text: its max micro-batch, the safe one apart, and the max's peak. */
const cellText = (cell) => (cell.max_micro_batch
  ? `${cell.max_micro_batch} · safe ${cell.safe_micro_batch ?? 0} (${formatBytes(cell.peak_bytes)})` : "does not fit");

/** The heat map of a what-if table (probe/whatif.py WhatIf.to_dict()). */
export function heatMap(table) {
  if (!Array.isArray(table.rows) || !Array.isArray(table.seq_lens)) throw new Error("it has no rows and seq_lens");
  const largest = Math.max(1, ...table.rows.flatMap((row) => row.cells.map((c) => c.max_micro_batch ?? 0)));
  const shade = (b) => (b ? Math.max(1, Math.round((b / largest) * SHADES)) : 0);
  // a table from before the precisions axis has no precision in its rows' settings: its one precision is the table's
  const precisions = [...new Set(table.rows.map((row) => row.setting?.precision ?? table.precision))];
  return h("figure", {},
    h("figcaption", { class: "meta" }, `${table.model} · ${precisions.join(", ") || table.precision} · capacity `
      + `${formatBytes(table.capacity_bytes)} · estimated, not run on a device · each cell: max micro-batch · `
      + `safe micro-batch, which leaves the headroom free (peak at the max) · model context ${table.context} tokens`),
    h("table", { class: "heat-map", "aria-label": "what-if heat map" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "setting"),
        table.seq_lens.map((s) => h("th", { scope: "col" }, `seq_len ${s}`)),
        h("th", { scope: "col" }, "longest seq at micro-batch 1"))),
      h("tbody", {}, table.rows.map((row) => h("tr", {},
        h("th", { scope: "row" }, row.label),
        row.cells.map((cell) => cell.max_micro_batch === null
          ? h("td", { class: "heat-cell na", title: cell.note ?? "" }, "n/a")
          : h("td", { class: `heat-cell heat-${shade(cell.max_micro_batch)}`,
            dataset: { microBatch: cell.max_micro_batch, safeMicroBatch: cell.safe_micro_batch ?? 0 } }, cellText(cell))),
        h("td", { class: "longest", title: row.longest?.note ?? "" },
          row.longest?.seq_len === null || !row.longest ? "n/a"
            : row.longest.seq_len ? String(row.longest.seq_len) : "none on the grid"))))));
}
