// The job page (#/probes/{id}): the memory curve as trials arrive, the plan and why, the verification,
// and the plan as a framework's config. It polls GET /v1/probes/{id} with If-None-Match: while
// nothing changed the server answers an empty 304, so an open tab costs one indexed read a second.
// (EventSource cannot send the bearer token, which is why this is polling and not the SSE stream.)
import { request } from "./api.js";
import { noGradSections } from "./batches.js";
import { breakdownSection } from "./breakdown.js";
import { lossChart, memoryChart } from "./chart.js";
import { h, table } from "./dom.js";
import { deviationText, elapsedText, formatBytes, modelLabel, planText, timeText } from "./format.js";

const POLL_MS = 1000;
// job statuses: TERMINAL of client/fitprobe_client/status.py, the values the API sends
const TERMINAL = ["succeeded", "failed", "cancelled"];
// the CLI's and the pre-flight verdict's words for an estimate (client/fitprobe_client/verdict.py ESTIMATED)
const ESTIMATED = "estimated, not run on a device";
const FORMATS = ["hf", "accelerate", "deepspeed", "lightning", "axolotl", "torchtune"];

/** Shows job `id` in `root` until `isCurrent()` turns false (the user went to another page). */
export async function showJob(root, id, isCurrent) {
  let etag = null, job = null;
  root.replaceChildren(h("p", { role: "status" }, `loading probe ${id}…`));
  while (isCurrent()) {
    try {
      const response = await request(`/v1/probes/${encodeURIComponent(id)}`,
        { raw: true, headers: etag ? { "If-None-Match": etag } : {} });
      if (response.status === 200) {
        etag = response.headers.get("ETag");
        job = await response.json();
        if (isCurrent()) render(root, job);
      } else if (response.status !== 304) {
        const body = await response.json().catch(() => ({}));
        root.replaceChildren(h("p", { class: "error", role: "alert" }, body.detail || `HTTP ${response.status}`));
        return;
      }
    } catch (err) {
      console.error(err);
      const message = `cannot show probe ${id}: ${err.message}; retrying`;
      const where = root.querySelector(".poll-error"); // absent until the first render succeeds
      if (where) where.replaceChildren(message);
      else root.replaceChildren(h("p", { class: "error", role: "alert" }, message));
    }
    if (job && TERMINAL.includes(job.status)) return;
    // a 304 re-renders nothing, but the clock moves on
    const elapsed = root.querySelector("#job-elapsed");
    if (elapsed && job) elapsed.textContent = elapsedText(job);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

/** The status a person reads: a probe that succeeded in finding that nothing fits says so, in red. */
function statusBadge(job) {
  const cached = job.cached ? " (cached)" : "";
  if (job.report?.does_not_fit) {
    return h("span", { class: "status does-not-fit", id: "job-status",
      title: "the probe ran to the end: even micro-batch 1 does not fit" }, `does not fit${cached}`);
  }
  return h("span", { class: `status ${job.status}`, id: "job-status" }, job.status + cached);
}

function render(root, job) {
  const search = job.report?.search;
  const spec = job.spec ?? {}; // null when the stored row could not be read: job.error says why
  const capacity = job.report?.device?.capacity_bytes ?? spec.capacity_bytes;
  const keep = root.querySelector(".exports"); // keeps the chosen format and fetched config across renders
  const notFitting = job.report?.does_not_fit;
  root.replaceChildren(...[
    h("p", {}, h("a", { href: "#/" }, "← all probes")),
    h("h2", {}, "Probe ", h("code", {}, job.id), " ", statusBadge(job)),
    h("p", { class: "meta" },
      `${modelLabel(spec.model)} · seq_len ${spec.seq_len} · ${spec.precision} · ${spec.optimizer}`,
      spec.finetuning === "lora" ? ` · LoRA r=${spec.lora?.rank}` : "",
      spec.gradient_checkpointing ? " · checkpointing" : "",
      ` · ${spec.mode} · device ${job.device ?? "not yet assigned"} · phase ${job.phase ?? "-"}`,
      ` · submitted ${timeText(job.created_at)}`),
    TERMINAL.includes(job.status) ? null : progressLine(job),
    TERMINAL.includes(job.status) ? null
      : h("button", { type: "button", class: "danger", id: "cancel-job", onclick: () => cancel(job.id, root) },
        "Cancel this probe"),
    job.error ? h("p", { class: "error", role: "alert" }, job.error) : null,
    h("p", { class: "poll-error", role: "status" }),
    notFitting ? doesNotFitSection(notFitting, spec) : null,
    job.report?.headroom_shortfall ? shortfallSection(job.report.headroom_shortfall) : null,
    curveSection(job, search, capacity),
    breakdownSection(job.trials.length ? job.trials : (search?.trials ?? []), job.report?.device?.breakdown_note),
    ...noGradSections(job.report),
    job.plan ? planSection(job.plan) : null,
    job.plan && spec.mode === "estimate" ? h("p", { class: "meta", id: "estimate-note" },
      h("strong", {}, "Not verified: "), `${ESTIMATED}. `, job.report?.device?.accuracy_note ?? "") : null,
    job.verification ? verificationSection(job.verification, job.plan) : null,
    job.status === "succeeded" && job.plan ? (keep ?? exportsSection(job)) : null,
  ].filter(Boolean));
}

// What a running job is doing now, as the CLI's progress line says it: the trial in progress (or the phase)
// and the time since it started, which ticks between polls.
function progressLine(job) {
  const doing = job.trying_micro_batch
    ? `trying micro-batch ${job.trying_micro_batch}`
    : (job.phase ?? job.status).replaceAll("_", " ");
  return h("p", { class: "meta", id: "job-progress", role: "status" },
    h("span", { id: "job-doing" }, doing), " · ", h("span", { id: "job-elapsed" }, elapsedText(job)));
}

async function cancel(id, root) {
  const button = root.querySelector("#cancel-job");
  button.disabled = true;
  try {
    await request(`/v1/probes/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    root.querySelector(".poll-error").replaceChildren(`cannot cancel: ${err.message}`);
    button.disabled = false;
  }
}

function curveSection(job, search, capacity) {
  // a cached job ran no trials of its own: its curve is the one the cached report measured
  const trials = job.trials.length ? job.trials : (search?.trials ?? []);
  // an estimate's trials ran on fake tensors: its "measured" basis is a count, not a device's answer
  const basis = job.spec?.mode === "estimate" ? ESTIMATED : search?.safe_micro_batch_basis;
  const caption = search?.max_micro_batch === 0
    ? `even micro-batch 1 does not fit in ${formatBytes(capacity)} (${basis}); ${search.trial_count} trials in ${search.wall_s}s`
    : search ? `max micro-batch ${search.max_micro_batch}, safe ${search.safe_micro_batch} (${basis}); `
      + `${search.trial_count} trials in ${search.wall_s}s${search.limit_reached ? `; the search stopped at its limit ${search.limit}` : ""}`
    : `${trials.length} trial(s) so far`;
  // a job re-run after a restart: the curve is the final run's, the interrupted runs' trials only counted
  const earlier = (job.earlier_attempts ?? []).filter((a) => a.trials.length);
  const rerun = earlier.length
    ? `; run ${job.attempts} drawn (${earlier.map((a) => `run ${a.attempt}: ${a.trials.length} trial(s)`).join(", ")}, interrupted, not drawn)`
    : "";
  return h("section", { "aria-labelledby": "curve-heading" },
    h("h3", { id: "curve-heading" }, "Memory against micro-batch"),
    h("p", { class: "meta", id: "curve-caption" }, caption + rerun),
    h("div", { id: "memory-chart" }, memoryChart({
      trials, capacityBytes: capacity, headroom: job.spec?.headroom,
      maxMicroBatch: search?.max_micro_batch, safeMicroBatch: search?.safe_micro_batch,
    })),
    h("p", { class: "legend" },
      h("span", { class: "key fits" }, "●"), " fits ",
      h("span", { class: "key oom" }, "✕"), " out of memory ",
      h("span", { class: "key no-peak" }, "◇"), " out of memory, peak not recorded (drawn at capacity)"),
    // the same numbers as a table: readable without the chart, and with the per-phase peaks
    table(["micro-batch", "outcome", "peak", "forward+backward", "optimizer", "idle", "step", "note"],
      trials.map((t) => h("tr", { class: t.fits ? "" : "oom-row" },
        h("td", {}, t.micro_batch), h("td", {}, t.fits ? "fits" : "OOM"),
        h("td", {}, formatBytes(t.peak_allocated_bytes)),
        h("td", {}, formatBytes(t.phase_peak_bytes?.forward_backward)),
        h("td", {}, formatBytes(t.phase_peak_bytes?.optimizer)),
        h("td", {}, formatBytes(t.phase_peak_bytes?.idle)),
        h("td", {}, t.step_s ? `${(t.step_s * 1000).toFixed(0)} ms` : "-"),
        h("td", {}, t.fits ? "" : oomNote(t)))),
      { class: "trials-table", "aria-label": "trials" }),
  );
}

// Where an OOM trial stopped, in the units of the rest of the page (as the CLI says it), not the
// allocator's raw byte counts.
// Only the numbers the trial has: an estimate's refusal may know neither.
function oomNote(trial) {
  const known = (bytes) => bytes !== null && bytes !== undefined;
  return "out of memory"
    + (known(trial.oom_live_bytes) ? ` at ${formatBytes(trial.oom_live_bytes)} live` : "")
    + (known(trial.oom_request_bytes) ? ` while allocating ${formatBytes(trial.oom_request_bytes)}` : "");
}

/** Nothing fits: what micro-batch 1 needs against the capacity, and each setting with whether it would fit. */
function doesNotFitSection(notFitting, spec) {
  const target = spec.effective_batch ?? spec.effective_batch_tokens;
  return h("section", { class: "does-not-fit", id: "does-not-fit", "aria-labelledby": "dnf-heading" },
    h("h3", { id: "dnf-heading" }, "Does not fit"),
    h("p", { id: "dnf-needs" }, h("strong", {}, "Needs "),
      notFitting.needs_bytes ? `${formatBytes(notFitting.needs_bytes)} at micro-batch 1 (estimated)` : "more (not estimated)",
      `; capacity ${formatBytes(notFitting.capacity_bytes)}`,
      notFitting.device_bytes_needed ? `; a device with at least ${formatBytes(notFitting.device_bytes_needed)} fits it `
        + `with the headroom kept` : "",
      target ? `. No plan for the effective batch of ${target}: not even one example fits.` : "."),
    notFitting.cheapest_fitting ? cheapestLine(notFitting.cheapest_fitting) : null,
    optionsTable(notFitting.options, "dnf-options", "what micro-batch 1 needs with each setting"),
    h("p", { class: "meta" }, notFitting.message));
}

/** The first candidate of `fitprobe recommend`: settings combined, the method kept, with what it costs. */
function cheapestLine(cheapest) {
  const extra = cheapest.extra_compute ? `, ${(100 * cheapest.extra_compute).toFixed(1)}% more compute` : "";
  const numerics = cheapest.numerics?.length ? `; changes the numerics: ${cheapest.numerics.join("; ")}` : "";
  return h("p", { id: "dnf-cheapest" }, h("strong", {}, "Cheapest change that fits: "),
    `${cheapest.change} at micro-batch ${cheapest.safe_micro_batch || 1} (max ${cheapest.max_micro_batch}, estimated`
    + `${extra})${numerics}`);
}

/** Micro-batch 1 fits only in the headroom: the plan runs it anyway, and these settings would give the headroom back. */
function shortfallSection(shortfall) {
  return h("section", { id: "headroom-shortfall", "aria-labelledby": "shortfall-heading" },
    h("h3", { id: "shortfall-heading" }, "Headroom not kept"),
    h("p", {}, shortfall.message),
    optionsTable(shortfall.options, "shortfall-options", "what micro-batch 1 needs with each setting"));
}

function optionsTable(options, id, label) {
  if (!options?.length) return null;
  return table(["setting", "micro-batch 1 needs", "fits"],
    options.map((option) => h("tr", { class: option.fits ? "" : "oom-row" },
      h("td", {}, option.change), h("td", {}, formatBytes(option.needs_bytes)),
      h("td", { class: option.fits ? "succeeded" : "failed" }, option.fits ? "✓ fits" : "✗ does not fit"))),
    { id, "aria-label": label });
}

function planSection(plan) {
  const alternatives = [plan, ...(plan.alternatives ?? [])];
  return h("section", { "aria-labelledby": "plan-heading" },
    h("h3", { id: "plan-heading" }, "Plan"),
    h("p", { class: "plan-text", id: "plan-text" }, planText(plan)),
    h("p", { class: "meta" }, `micro-batch ${plan.micro_batch}`,
      plan.last_micro_batch ? ` (last ${plan.last_micro_batch})` : "",
      ` · accumulation ${plan.accumulation_steps} · ${plan.num_devices} device(s) · ${deviationText(plan)}`),
    h("p", {}, h("strong", {}, "Why: "), plan.reason),
    h("p", { class: "meta" }, "Throughput model: ", plan.throughput_model),
    plan.uneven_note ? h("p", { class: "meta", id: "plan-uneven-note" }, plan.uneven_note) : null,
    table(["", "split", "kind", "micro-batch", "accumulation", "devices", "effective", "deviation", "relative throughput"],
      alternatives.map((alt, i) => h("tr", { class: i === 0 ? "chosen" : "" },
        h("td", {}, i === 0 ? "chosen" : ""), h("td", {}, planText(alt)),
        // an uneven split runs only in a loop that cuts batches itself: labelled, its reason on hover
        h("td", alt.uneven_note ? { class: "uneven", title: alt.uneven_note } : {}, alt.uneven_note ? "uneven" : "even"),
        h("td", {}, alt.micro_batch + (alt.last_micro_batch ? ` (last ${alt.last_micro_batch})` : "")),
        h("td", {}, alt.accumulation_steps), h("td", {}, alt.num_devices), h("td", {}, alt.effective_batch),
        h("td", {}, `${alt.deviation_percent > 0 ? "+" : ""}${alt.deviation_percent.toFixed(2)}%`),
        h("td", {}, i === 0 ? "1.00×" : `${alt.relative_throughput.toFixed(2)}×`))),
      { class: "alternatives", "aria-label": "the chosen plan and its alternatives" }),
    plan.alternatives?.some((alt) => alt.uneven_note) ? h("p", { class: "meta", id: "uneven-note" },
      plan.alternatives.find((alt) => alt.uneven_note).uneven_note) : null,
    plan.lr_guidance ? h("p", {}, h("strong", {}, "Learning rate: "),
      `linear-scaled ${plan.lr_guidance.linear_scaled_lr.toPrecision(3)}, sqrt-scaled `
      + `${plan.lr_guidance.sqrt_scaled_lr.toPrecision(3)}; ${plan.lr_guidance.note}`) : null,
  );
}

/** Exported for the browser test of a verification that ran out of memory. */
export function verificationSection(verification, plan) {
  const noise = verification.gradient_noise_scale;
  return h("section", { "aria-labelledby": "verify-heading" },
    h("h3", { id: "verify-heading" }, "Verification: ",
      h("span", { class: verification.passed ? "succeeded" : "failed" }, verification.passed ? "passed" : "failed")),
    h("ul", { class: "checks" }, verification.checks.map((check) =>
      h("li", { class: check.passed ? "pass" : "fail" },
        h("span", { class: "mark", "aria-hidden": "true" }, check.passed ? "✓" : "✗"),
        h("strong", {}, check.name.replaceAll("_", " ")), check.passed ? "" : " (failed)", ": ", check.detail))),
    h("div", { class: "side-by-side" },
      verification.losses?.length ? h("figure", {}, lossChart(verification.losses),
        h("figcaption", {}, `loss per optimizer step over ${verification.steps} steps`)) : null,
      h("dl", { class: "numbers" },
        h("dt", {}, "gradient noise scale"), h("dd", { id: "noise-scale" },
          noise ? `${Math.round(noise)} examples` : "not estimated"),
        h("dt", {}, "effective batch"), h("dd", {}, plan?.effective_batch ?? verification.examples_per_step),
        noise ? null : h("dd", { class: "meta" }, verification.gradient_noise_note),
        h("dt", {}, "peak per step"), h("dd", {},
          `${formatBytes(verification.peak_reserved_bytes)} of ${formatBytes(verification.capacity_bytes)}`),
        h("dt", {}, "step time"), h("dd", {}, verification.step_s
          ? `${(verification.step_s * 1000).toFixed(0)} ms, ${Math.round(verification.tokens_per_s)} tokens/s`
          : "not measured (no step completed)"))),
  );
}

function exportsSection(job) {
  const output = h("pre", { id: "export-output", tabindex: "0", "aria-live": "polite" });
  // what Copy takes is the framework's object alone; where it came from is shown under it
  const provenance = h("pre", { id: "export-provenance", class: "meta" });
  const select = h("select", { id: "export-format" }, FORMATS.map((f) => h("option", { value: f }, f)));
  const copied = h("span", { role: "status", class: "meta" });
  const load = async () => {
    output.textContent = "…";
    try {
      const exported = await request(`/v1/probes/${job.id}/config?format=${select.value}`);
      output.textContent = JSON.stringify(exported.config, null, 2);
      provenance.textContent = JSON.stringify(exported.provenance, null, 2);
    } catch (err) {
      output.textContent = err.message;
      provenance.textContent = "";
    }
  };
  select.addEventListener("change", load);
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(output.textContent);
    } catch {
      // the Clipboard API needs a secure context; a cluster host over plain http is not one
      getSelection().selectAllChildren(output);
      document.execCommand("copy");
    }
    copied.textContent = "copied";
    setTimeout(() => { copied.textContent = ""; }, 2000);
  };
  // a blob URL, not a link to the API: a plain link could not carry the bearer token
  const report = new Blob([JSON.stringify(job.report, null, 2)], { type: "application/json" });
  load();
  return h("section", { class: "exports", "aria-labelledby": "exports-heading" },
    h("h3", { id: "exports-heading" }, "Use the plan"),
    h("p", {}, h("label", { for: "export-format" }, "Config for "), select, " ",
      h("button", { type: "button", id: "copy-export", onclick: copy }, "Copy"), " ", copied),
    output,
    h("p", { class: "meta" }, "Where it came from (not part of the config):"),
    provenance,
    h("p", {}, h("a", { href: URL.createObjectURL(report), download: `fitprobe-${job.id}.json`, id: "report-link" },
      "Download the report (JSON)")),
  );
}
