// Numbers and plans written the way the CLI writes them (probe/spec.py format_bytes, probe/plan.py).

/** Binary units, as nvidia-smi and the allocator report them. */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  let value = Number(bytes);
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (Math.abs(value) < 1024) return unit === "B" ? `${value.toFixed(0)}${unit}` : `${value.toFixed(1)}${unit}`;
    value /= 1024;
  }
  return `${value.toFixed(2)}TiB`;
}

/**
 * A split as the server writes it (probe/plan.py plan_equation), the one notation of the CLI, the
 * list, the exports and the pre-flight verdict: "97 = 25 micro × 4 accum × 1 device (3 × 25 + 22)";
 * a token budget in tokens. A plan stored by a server older than `equation` gets its numbers in the
 * same notation, as the verdict's plan_words does.
 */
export function planText(plan) {
  const devices = plan.num_devices === 1 ? "1 device" : `${plan.num_devices} devices`;
  return plan.tokens?.equation ?? plan.tokens_equation ?? plan.equation
    ?? `${plan.effective_batch} = ${plan.micro_batch} micro × ${plan.accumulation_steps} accum × ${devices}`;
}

export function deviationText(plan) {
  if (plan.exact) return "exact";
  const sign = plan.deviation_percent > 0 ? "+" : "";
  return `${sign}${plan.deviation_percent.toFixed(2)}% from the target`;
}

export function modelLabel(model) {
  if (typeof model === "string") return model;
  return `inline ${model?.model_type ?? "config"}`;
}

// the store writes UTC; SQLite drops the offset, so a bare timestamp is UTC too
function parseTime(iso) {
  return new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
}

export function timeText(iso) {
  return iso ? parseTime(iso).toLocaleString() : "-";
}

/** How long a job has run (or waited, queued), in the CLI's words: "12s elapsed", "3m 05s elapsed". */
export function elapsedText(job, now = Date.now()) {
  const since = job.started_at ?? job.created_at;
  if (!since) return "";
  const until = job.finished_at ? parseTime(job.finished_at).getTime() : now;
  const seconds = Math.max(0, Math.round((until - parseTime(since).getTime()) / 1000));
  const words = seconds < 60 ? `${seconds}s` : `${Math.floor(seconds / 60)}m ${String(seconds % 60).padStart(2, "0")}s`;
  return job.started_at ? `${words} elapsed` : `queued ${words}`;
}
