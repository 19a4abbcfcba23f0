// The what-if page (#/whatif): a `fitprobe whatif --json` table, pasted or loaded from a file, drawn as
// a heat map. Rows are settings, columns seq_lens; a cell's shade is its max micro-batch against the
// table's largest, so "what must change to fit" reads as where the colour starts. The table is
// computed by the CLI (it is minutes of estimates, not a request the service should run inline).
import { h } from "./dom.js";
import { formatBytes } from "./format.js";

const SHADES = 5; // heat-0 (does not fit) … heat-5 (the table's largest micro-batch)

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
    h("p", { id: "whatif-help", class: "meta" }, "Paste or load the output of ",
      h("code", {}, "fitprobe whatif --model M --gpu CARD --seq-len 1024,2048,4096 --json"),
      ": which settings fit on the card, at which seq_len, with which micro-batch (estimated)."),
    h("label", { for: "whatif-json" }, "what-if JSON"), input,
    h("label", { for: "whatif-file" }, "or load a file"), file, out);
}

/** The heat map of a what-if table (probe/whatif.py WhatIf.to_dict()). */
export function heatMap(table) {
  if (!Array.isArray(table.rows) || !Array.isArray(table.seq_lens)) throw new Error("it has no rows and seq_lens");
  const largest = Math.max(1, ...table.rows.flatMap((row) => row.cells.map((c) => c.max_micro_batch ?? 0)));
  const shade = (b) => (b ? Math.max(1, Math.round((b / largest) * SHADES)) : 0);
  return h("figure", {},
    h("figcaption", { class: "meta" }, `${table.model} · ${table.precision} · capacity `
      + `${formatBytes(table.capacity_bytes)} · estimated, not run on a device · each cell: max micro-batch `
      + `(peak) · model context ${table.context} tokens`),
    h("table", { class: "heat-map", "aria-label": "what-if heat map" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "setting"),
        table.seq_lens.map((s) => h("th", { scope: "col" }, `seq_len ${s}`)),
        h("th", { scope: "col" }, "longest seq at micro-batch 1"))),
      h("tbody", {}, table.rows.map((row) => h("tr", {},
        h("th", { scope: "row" }, row.label),
        row.cells.map((cell) => cell.max_micro_batch === null
          ? h("td", { class: "heat-cell na", title: cell.note ?? "" }, "n/a")
          : h("td", { class: `heat-cell heat-${shade(cell.max_micro_batch)}`, dataset: { microBatch: cell.max_micro_batch } },
            cell.max_micro_batch ? `${cell.max_micro_batch} (${formatBytes(cell.peak_bytes)})` : "does not fit")),
        h("td", { class: "longest", title: row.longest?.note ?? "" },
          row.longest?.seq_len === null || !row.longest ? "n/a"
            : row.longest.seq_len ? String(row.longest.seq_len) : "none on the grid"))))));
}
