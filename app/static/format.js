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

const WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];
const countWord = (n) => WORDS[n] ?? String(n);

/**
 * How one device cuts its `examples` into micro-batches of `micro`:
 * "64 = 3 × 20 + 4 (three micro-batches of 20, then one of 4)", or "60 = 3 × 20" when it divides.
 */
export function splitText(examples, micro) {
  const full = Math.floor(examples / micro), rest = examples % micro;
  if (rest === 0) return `${examples} = ${full} × ${micro}`;
  if (full === 0) return `${examples} = ${rest} (one micro-batch of ${rest})`;
  const plural = full === 1 ? "micro-batch" : "micro-batches";
  return `${examples} = ${full} × ${micro} + ${rest} (${countWord(full)} ${plural} of ${micro}, then one of ${rest})`;
}

/**
 * The plan as one line: `micro × accumulation × devices = effective` when every micro-batch is full.
 * An uneven plan has no such product (19 × 2 × 1 is 38, not 37), so it is written as the cut each
 * device makes; when the effective batch does not divide by the devices, some take one example fewer
 * (probe/plan.py Split.per_device), and both cuts are written.
 */
export function planText(plan) {
  const { micro_batch: micro, accumulation_steps: steps, num_devices: devices, effective_batch: effective } = plan;
  if (plan.last_micro_batch === null || plan.last_micro_batch === undefined) {
    return `${micro} × ${steps} × ${devices} = ${effective}`;
  }
  if (devices === 1) return splitText(effective, micro);
  const base = Math.floor(effective / devices), extra = effective % devices;
  const parts = extra
    ? [`${extra} device(s): ${splitText(base + 1, micro)}`, `${devices - extra} device(s): ${splitText(base, micro)}`]
    : [`each of ${devices} devices: ${splitText(base, micro)}`];
  return `${effective} examples per step; ${parts.join("; ")}`;
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

export function timeText(iso) {
  if (!iso) return "-";
  // the store writes UTC; SQLite drops the offset, so a bare timestamp is UTC too
  const date = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
  return date.toLocaleString();
}
