// The recommendation page (#/recommendations/{id}): which settings to run on the card, every candidate
// estimated (probe/recommend.py), ranked: keeps the headroom, fits, keeps the method, fewest numerics
// changes, least extra compute, larger micro-batch. Polls GET /v1/recommendations/{id} until it is done.
import { request } from "./api.js";
import { h, table } from "./dom.js";
import { formatBytes } from "./format.js";

const POLL_MS = 1000;
const TERMINAL = ["succeeded", "failed", "cancelled"];

/** Shows recommendation `id` in `root` until it is done or `isCurrent()` turns false. */
export async function showRecommendation(root, id, isCurrent) {
  root.replaceChildren(h("p", { role: "status" }, `loading recommendation ${id}…`));
  while (isCurrent()) {
    let job;
    try {
      job = await request(`/v1/recommendations/${encodeURIComponent(id)}`);
    } catch (err) {
      root.replaceChildren(h("p", { class: "error", role: "alert" }, `cannot show recommendation ${id}: ${err.message}`));
      return;
    }
    if (!isCurrent()) return;
    render(root, job);
    if (TERMINAL.includes(job.status)) return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function render(root, job) {
  const done = job.progress ? ` · ${job.progress.done}/${job.progress.total} candidates estimated` : "";
  const answer = job.recommendation;
  root.replaceChildren(...[
    h("p", {}, h("a", { href: "#/" }, "← all probes")),
    h("h2", {}, "Recommendation ", h("code", {}, job.id)),
    h("p", { class: "meta", id: "recommend-status", role: "status" }, `${job.status}${done}`),
    job.error ? h("p", { class: "error", role: "alert" }, job.error) : null,
    answer ? answerSection(answer) : null,
  ].filter(Boolean));
}

function answerSection(answer) {
  const first = answer.first_fitting === null ? null : answer.candidates[answer.first_fitting];
  const compute = (c) => (c.extra_compute === null || c.extra_compute === undefined ? "-"
    : `${c.extra_compute >= 0 ? "+" : ""}${(100 * c.extra_compute).toFixed(1)}%`);
  return h("section", { "aria-labelledby": "recommend-heading" },
    h("h3", { id: "recommend-heading" }, `${answer.model} · seq_len ${answer.seq_len} on ${formatBytes(answer.capacity_bytes)}`),
    h("p", { id: "recommend-first" }, first
      ? [h("strong", {}, "Run: "), `${first.label}, micro-batch ${first.safe_micro_batch || 1} (max ${first.max_micro_batch})`]
      : "Nothing fits: no combination of these settings trains at micro-batch 1 on this card."),
    table(["#", "settings", "max", "safe", "peak", "extra compute", "numerics changed"],
      answer.candidates.map((c, i) => h("tr", { class: [i === answer.first_fitting ? "chosen" : "", c.max_micro_batch ? "" : "oom-row"].join(" ").trim() },
        h("td", {}, i + 1), h("td", {}, c.label),
        h("td", {}, c.max_micro_batch ?? "n/a"), h("td", {}, c.max_micro_batch === null ? "" : c.safe_micro_batch ?? 0),
        h("td", {}, formatBytes(c.peak_bytes)), h("td", {}, compute(c)),
        h("td", {}, c.numerics.length ? c.numerics.join("; ") : (c.note ?? "none")))),
      { id: "recommend-table", "aria-label": "candidates, ranked" }),
    h("p", { class: "meta" }, `Not modelled: ${answer.not_modelled}`));
}
