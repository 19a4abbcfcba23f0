// Hand-drawn SVG charts: a probe's memory curve and a verification's loss per step.
// SVG rather than a library: two charts, a few dozen shapes, nothing to vendor or update, and every
// point is a DOM element a test (or a screen reader, through its <title>) can find.
import { formatBytes } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
const MARGIN = { top: 16, right: 120, bottom: 40, left: 72 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Linear scale from [d0, d1] to [r0, r1].
function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (value) => r0 + ((value - d0) / span) * (r1 - r0);
}

// About `count` round tick values between 0 and max (1, 2 or 5 times a power of ten apart); with
// `whole`, never a fraction (half an example is not a micro-batch).
function ticks(max, count = 5, whole = false) {
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw || 1));
  let step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || power;
  if (whole) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = 0; v <= max + 1e-9; v += step) out.push(v);
  return out;
}

// A byte axis in one unit, named in its title, with plain numbers on the ticks: "1000.0MiB" beside
// "1.0GiB" read as two scales, and long labels ran into the axis title.
function byteAxis(max) {
  const [unit, name] = max >= 4 * 2 ** 30 ? [2 ** 30, "GiB"] : max >= 4 * 2 ** 20 ? [2 ** 20, "MiB"] : [2 ** 10, "KiB"];
  const values = ticks(max / unit);
  const step = values[1] ?? 1;
  const digits = step >= 1 ? 0 : Math.ceil(-Math.log10(step));
  return { ticks: values.map((v) => v * unit), name, format: (bytes) => (bytes / unit).toFixed(digits) };
}

function frame(width, height, label) {
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, class: "chart" });
  svg.append(el("title", {}, label));
  return svg;
}

function axes(svg, x, y, xTicks, yTicks, xLabel, yLabel, formatY, width, height) {
  const bottom = height - MARGIN.bottom;
  const grid = el("g", { class: "axis" });
  for (const t of yTicks) {
    grid.append(el("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(t), y2: y(t), class: "grid" }));
    grid.append(el("text", { x: MARGIN.left - 6, y: y(t) + 4, "text-anchor": "end" }, formatY(t)));
  }
  for (const t of xTicks) {
    grid.append(el("text", { x: x(t), y: bottom + 16, "text-anchor": "middle" }, String(t)));
  }
  grid.append(el("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: bottom, y2: bottom, class: "baseline" }));
  grid.append(el("text", { x: (MARGIN.left + width - MARGIN.right) / 2, y: height - 6, "text-anchor": "middle" },
    xLabel));
  grid.append(el("text", { x: 14, y: (MARGIN.top + bottom) / 2, "text-anchor": "middle", class: "axis-title",
    transform: `rotate(-90 14 ${(MARGIN.top + bottom) / 2})` }, yLabel));
  svg.append(grid);
}

// A horizontal reference line across the plot with its label in the right margin.
function hline(svg, x0, x1, yPos, className, label) {
  svg.append(el("line", { x1: x0, x2: x1, y1: yPos, y2: yPos, class: className }));
  svg.append(el("text", { x: x1 + 6, y: yPos + 4, class: `${className}-label` }, label));
}

function vline(svg, xPos, y0, y1, className, label) {
  svg.append(el("line", { x1: xPos, x2: xPos, y1: y0, y2: y1, class: className }));
  svg.append(el("text", { x: xPos + 4, y: y0 + 12, class: `${className}-label` }, label));
}

/**
 * Peak memory against micro-batch. Every trial is one `.trial` element: a filled circle when it fit,
 * a cross when it ran out of memory. An OOM trial without a peak (newer reports give the live and
 * requested bytes instead) is drawn at the capacity as a hollow diamond: we know it did not fit, not
 * how far above the line it went.
 */
export function memoryChart({ trials, capacityBytes, headroom, maxMicroBatch, safeMicroBatch, width = 720, height = 320 }) {
  const svg = frame(width, height, `peak memory against micro-batch, ${trials.length} trial(s)`);
  const peaks = trials.map((t) => t.peak_allocated_bytes ?? t.peak_reserved_bytes ?? null);
  const xMax = Math.max(1, ...trials.map((t) => t.micro_batch), maxMicroBatch || 0) * 1.08;
  const yMax = Math.max(capacityBytes || 0, ...peaks.filter((p) => p !== null)) * 1.1 || 1;
  const x = scale(0, xMax, MARGIN.left, width - MARGIN.right);
  const y = scale(0, yMax, height - MARGIN.bottom, MARGIN.top);
  const bytes = byteAxis(yMax);
  axes(svg, x, y, ticks(xMax, 5, true), bytes.ticks, "micro-batch (examples)", `peak memory (${bytes.name})`,
    bytes.format, width, height);

  const left = MARGIN.left, right = width - MARGIN.right, top = MARGIN.top, bottom = height - MARGIN.bottom;
  if (capacityBytes) {
    hline(svg, left, right, y(capacityBytes), "capacity", `capacity ${formatBytes(capacityBytes)}`);
    const limit = capacityBytes * (1 - headroom);
    hline(svg, left, right, y(limit), "headroom", `−${Math.round(headroom * 100)}% headroom`);
  }
  if (maxMicroBatch) vline(svg, x(maxMicroBatch), top, bottom, "max-line", `max ${maxMicroBatch}`);
  if (safeMicroBatch && safeMicroBatch !== maxMicroBatch) {
    vline(svg, x(safeMicroBatch), top + 14, bottom, "safe-line", `safe ${safeMicroBatch}`);
  }

  const points = el("g", { class: "trials" });
  trials.forEach((trial, i) => {
    const cx = x(trial.micro_batch);
    const peak = peaks[i];
    let shape;
    if (trial.fits) {
      shape = el("circle", { cx, cy: y(peak ?? 0), r: 5, class: "trial fits" });
    } else if (peak === null) {
      const cy = y(capacityBytes || yMax);
      shape = el("path", { d: `M${cx} ${cy - 7}L${cx + 7} ${cy}L${cx} ${cy + 7}L${cx - 7} ${cy}Z`,
        class: "trial oom no-peak" });
    } else {
      const cy = y(peak);
      shape = el("path", { d: `M${cx - 6} ${cy - 6}L${cx + 6} ${cy + 6}M${cx - 6} ${cy + 6}L${cx + 6} ${cy - 6}`,
        class: "trial oom" });
    }
    shape.dataset.microBatch = trial.micro_batch;
    shape.append(el("title", {}, trialSummary(trial, peak)));
    points.append(shape);
  });
  svg.append(points);
  return svg;
}

function trialSummary(trial, peak) {
  const phases = Object.entries(trial.phase_peak_bytes || {})
    .map(([phase, bytes]) => `${phase} ${formatBytes(bytes)}`).join(", ");
  const outcome = trial.fits ? "fits" : "out of memory";
  const seen = peak === null ? "peak not recorded" : `peak ${formatBytes(peak)}`;
  return `micro-batch ${trial.micro_batch}: ${outcome}, ${seen}${phases ? ` (${phases})` : ""}`;
}

/** Loss per optimizer step of the verification run: a line with one dot per step. */
export function lossChart(losses, { width = 360, height = 180 } = {}) {
  const svg = frame(width, height, `loss per verification step: ${losses.map((l) => l.toFixed(4)).join(", ")}`);
  const margin = { ...MARGIN, right: 16 };
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const pad = (hi - lo) * 0.15 || Math.abs(hi) * 0.05 || 1;
  const x = scale(1, Math.max(2, losses.length), margin.left, width - margin.right);
  const y = scale(lo - pad, hi + pad, height - margin.bottom, margin.top);
  const axis = el("g", { class: "axis" });
  for (const v of [lo, hi]) {
    axis.append(el("line", { x1: margin.left, x2: width - margin.right, y1: y(v), y2: y(v), class: "grid" }));
    axis.append(el("text", { x: margin.left - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(3)));
  }
  losses.forEach((_, i) => axis.append(el("text", { x: x(i + 1), y: height - margin.bottom + 16,
    "text-anchor": "middle" }, String(i + 1))));
  axis.append(el("text", { x: (margin.left + width - margin.right) / 2, y: height - 6, "text-anchor": "middle" },
    "optimizer step"));
  svg.append(axis);
  svg.append(el("polyline", { points: losses.map((l, i) => `${x(i + 1)},${y(l)}`).join(" "), class: "loss" }));
  losses.forEach((l, i) => svg.append(el("circle", { cx: x(i + 1), cy: y(l), r: 3.5, class: "loss-point" })));
  return svg;
}
