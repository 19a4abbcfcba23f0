// The peak of each trial by category (probe/breakdown.py): one stacked bar per fitting trial, its parts
// adding up to the peak, every bar on one scale (the largest peak is the full width), so a user sees what
// grows with the micro-batch (activations, the loss head) and what does not (weights, gradients, state).
import { h } from "./dom.js";
import { formatBytes } from "./format.js";

// the report's category names, as the legend writes them
const LABELS = {
  weights: "weights", batch: "batch", gradients: "gradients", optimizer_state: "optimizer state",
  activations: "activations", loss_head: "loss head", temporaries: "temporaries",
};

/** The section for `trials`; where none has a breakdown, the report's reason (`note`) or nothing. */
export function breakdownSection(trials, note) {
  const shown = trials.filter((t) => t.fits && t.breakdown);
  if (!shown.length) {
    return note ? h("p", { class: "meta", id: "breakdown-note" }, note) : null;
  }
  const widest = Math.max(...shown.map((t) => t.peak_allocated_bytes));
  const categories = Object.keys(shown[0].breakdown);
  return h("section", { "aria-labelledby": "breakdown-heading", id: "breakdown" },
    h("h3", { id: "breakdown-heading" }, "What the peak holds"),
    h("div", { class: "breakdown-bars" }, shown.map((t) => bar(t, widest))),
    h("p", { class: "legend" }, categories.map((name) =>
      h("span", { class: "legend-item" }, h("span", { class: `swatch ${name}` }), ` ${LABELS[name] ?? name} `))));
}

function bar(trial, widest) {
  const parts = Object.entries(trial.breakdown).filter(([, bytes]) => bytes > 0);
  const words = parts.map(([name, bytes]) => `${LABELS[name] ?? name} ${formatBytes(bytes)}`).join(" + ");
  // sizes through the CSSOM: the page's Content-Security-Policy refuses inline style attributes
  const stacked = h("div", {
    class: "bar", role: "img",
    "aria-label": `micro-batch ${trial.micro_batch}: peak ${formatBytes(trial.peak_allocated_bytes)} = ${words}`,
  }, parts.map(([name, bytes]) => {
    const segment = h("span", { class: `segment ${name}`, dataset: { category: name, bytes },
      title: `${LABELS[name] ?? name}: ${formatBytes(bytes)}` });
    segment.style.flexGrow = String(bytes);
    return segment;
  }));
  stacked.style.width = `${(100 * trial.peak_allocated_bytes) / widest}%`;
  return h("div", { class: "breakdown-row", dataset: { microBatch: trial.micro_batch } },
    h("span", { class: "breakdown-label" }, `micro-batch ${trial.micro_batch}`),
    stacked,
    h("span", { class: "breakdown-peak" }, formatBytes(trial.peak_allocated_bytes)));
}
