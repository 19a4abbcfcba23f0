// The batches a run has besides training (probe/evaluate.py, probe/generate.py): the evaluation batch and
// the generation batch, each beside the state training keeps resident, with the capacity that state left,
// so a user sees why the batch is what it is. The CLI's text and the pre-flight verdict say the same.
import { h, table } from "./dom.js";
import { formatBytes } from "./format.js";

/** The two sections for `report` (either may be absent: only what the job asked for). */
export function noGradSections(report) {
  return [
    report?.evaluation ? evaluationSection(report.evaluation) : null,
    report?.generation ? generationSection(report.generation) : null,
  ].filter(Boolean);
}

function residentText(section) {
  const left = section.capacity_left_bytes === null || section.capacity_left_bytes === undefined ? ""
    : `, ${formatBytes(section.capacity_left_bytes)} of ${formatBytes(section.capacity_bytes)} left`;
  return `beside ${section.resident} (${formatBytes(section.resident_bytes)} resident${left})`;
}

function batchLine(search, name) {
  return search.max === 0 ? `even ${name} 1 does not fit (${search.trial_count} trials)`
    : `max ${search.max}, safe ${search.safe} (${search.trial_count} trials)`;
}

function trialsTable(trials, label, unit) {
  return table([unit, "outcome", "peak"],
    trials.map((t) => h("tr", { class: t.fits ? "" : "oom-row" },
      h("td", {}, t.micro_batch), h("td", {}, t.fits ? "fits" : "OOM"), h("td", {}, formatBytes(t.peak_allocated_bytes)))),
    { "aria-label": label, class: "trials-table" });
}

function evaluationSection(evaluation) {
  const kept = evaluation.compute_metrics && evaluation.eval_steps_fit !== null
    ? h("p", { id: "eval-kept" }, `compute_metrics keeps every step's logits on the device: `
      + `${evaluation.eval_steps_fit} step(s)${evaluation.eval_steps ? ` of the eval set's ${evaluation.eval_steps}` : ""} fit; `
      + (evaluation.eval_accumulation_steps ? `export eval_accumulation_steps=${evaluation.eval_accumulation_steps}`
        : "the whole eval set's logits fit"))
    : null;
  return h("section", { id: "evaluation", "aria-labelledby": "evaluation-heading" },
    h("h3", { id: "evaluation-heading" }, "Evaluation batch"),
    h("p", { id: "eval-batch" }, h("strong", {}, `per_device_eval_batch_size=${evaluation.per_device_eval_batch_size}`),
      `: ${batchLine(evaluation.batch, "eval batch")}`),
    h("p", { class: "meta", id: "eval-resident" }, residentText(evaluation)),
    kept,
    trialsTable(evaluation.batch.trials, "evaluation trials", "eval batch"));
}

function generationSection(generation) {
  const longest = `${generation.longest_new_tokens_at_batch_1}${generation.longest_limit_reached ? " (the limit)" : ""}`;
  return h("section", { id: "generation", "aria-labelledby": "generation-heading" },
    h("h3", { id: "generation-heading" }, "Generation batch"),
    h("p", { id: "generate-batch" }, h("strong", {}, `batch ${generation.batch.safe || generation.batch.max}`),
      `: ${batchLine(generation.batch, "batch")} for ${generation.prompt_tokens}-token prompts + `
      + `${generation.max_new_tokens} new tokens (${generation.cache_implementation} cache)`),
    h("p", { class: "meta", id: "generate-resident" }, residentText(generation)),
    h("p", { id: "generate-cache" }, `KV cache per sequence: ${formatBytes(generation.cache_bytes_per_sequence)} at `
      + `${generation.cache_tokens} tokens (arithmetic: ${formatBytes(generation.cache_bytes_per_sequence_arithmetic)}); `
      + `longest generation at batch 1: ${longest} new tokens`),
    trialsTable(generation.batch.trials, "generation trials", "batch"));
}
