// The submit form: builds a spec from the labelled fields and shows the service's own 422 messages
// next to the field they name. The page does not re-validate: the API's messages already say what to
// change, and a second copy of the rules here would drift from probe/spec.py.
import { request } from "./api.js";
import { h } from "./dom.js";
import { formatBytes } from "./format.js";

const NUMBERS = ["seq_len", "effective_batch", "effective_batch_tokens", "num_devices", "headroom", "max_micro_batch",
  "micro_steps_per_trial", "optimizer_steps_per_trial", "seed", "lora.rank", "lora.alpha", "eval_rows", "eval_batch_size",
  "max_new_tokens", "generate_batch_size"];
const CHOICES = ["precision", "optimizer", "finetuning", "quantization", "collation", "trainer", "mode", "sharding",
  "cache_implementation"];
const CHECKS = ["gradient_checkpointing", "liger", "estimate_first", "extrapolate", "reuse", "eval", "eval_alone",
  "eval_compute_metrics", "generate", "generate_alone"];
// choices whose values the spec's schema lists (optimizer comes with its descriptions from /v1/models)
const SCHEMA_CHOICES = ["precision", "finetuning", "quantization", "collation", "trainer", "mode", "sharding",
  "cache_implementation"];
const field = (name) => document.getElementById(`f-${name}`);

export function setUpForm(onSubmitted, onRecommended) {
  const form = document.getElementById("submit-form");
  loadChoices();
  loadSchemaChoices();
  loadLimits();
  field("finetuning").addEventListener("change", () => {
    document.getElementById("lora-fields").disabled = field("finetuning").value !== "lora";
  });
  field("gpu").addEventListener("change", () => {
    const option = field("gpu").selectedOptions[0];
    if (option.dataset.capacityBytes) field("capacity_bytes").value = option.dataset.capacityBytes;
    if (option.value) field("mode").value = "estimate"; // a card you picked is a card you don't have here
  });
  document.getElementById("f-hf_file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) field("hf_config").value = await file.text();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submitTo("/v1/probes", "submit-button", (spec) => spec, onSubmitted);
  });
  // the same request, every saving setting estimated on the card (probe/recommend.py); a recommendation always
  // estimates and has no cached search to reuse
  document.getElementById("recommend-button").addEventListener("click", () => submitTo(
    "/v1/recommendations", "recommend-button", ({ reuse, ...spec }) => spec, onRecommended));
}

async function submitTo(path, buttonId, shape, onDone) {
  clearErrors();
  let spec;
  try {
    spec = shape(readSpec());
  } catch (err) {
    showError("hf_config", err.message);
    return;
  }
  const button = document.getElementById(buttonId);
  button.disabled = true;
  try {
    onDone(await request(path, { method: "POST", body: spec }));
  } catch (err) {
    showApiErrors(err);
  } finally {
    button.disabled = false;
  }
}

async function loadChoices() {
  try {
    const { builtins, presets, gpus, optimizers } = await request("/v1/models");
    // the names users write in their framework, from the service (one list: probe/optimizers.py)
    field("optimizer").replaceChildren(...optimizers.map((o) => h("option",
      { value: o.name, title: o.description, selected: o.name === "adamw_torch_fused" }, o.name)));
    document.getElementById("model-options").replaceChildren(
      ...builtins.map((ref) => h("option", { value: ref }, "builtin (small GPT, plain torch)")),
      ...presets.map((p) => h("option", { value: p.model }, `${p.model_type} architecture, random weights`)));
    field("gpu").append(...gpus.map((g) => h("option", { value: g.name, dataset: { capacityBytes: g.capacity_bytes } },
      `${g.name} (${formatBytes(g.capacity_bytes)} for tensors)`)));
  } catch {
    // presets are a convenience: the field still takes any reference by hand
  }
}

// A choice's values and meaning come from the service's own schema of a probe request (probe/spec.py's
// ProbeSpec, as FastAPI publishes it), so a value added there appears here; the page keeps no copy.
async function loadSchemaChoices() {
  try {
    const schema = await request("/openapi.json");
    const properties = schema.components.schemas.ProbeRequest.properties;
    for (const name of SCHEMA_CHOICES) {
      const property = properties[name];
      const values = property?.enum ?? property?.anyOf?.find((p) => p.enum)?.enum;
      if (!values) continue;
      const select = field(name);
      const chosen = select.value || property.default;
      select.replaceChildren(...values.map((value) => h("option", { value, selected: value === chosen }, value)));
      const help = document.getElementById(`${name}-help`);
      if (help && property.description) help.textContent = property.description;
    }
  } catch {
    // the page's own options still submit; the service's 422 names a value it does not take
  }
}

// The bounds come from the service (GET /v1/limits, its FITPROBE_MAX_* settings), never from a copy here
async function loadLimits() {
  try {
    const limits = await request("/v1/limits");
    for (const [name, max] of [["seq_len", limits.max_seq_len], ["effective_batch", limits.max_effective_batch]]) {
      field(name).max = max;
      document.getElementById(`${name}-help`).textContent = `at most ${max.toLocaleString("en")} on this service`;
    }
  } catch {
    // without the bounds the form still submits: the service's 422 names the limit
  }
}

function readSpec() {
  const spec = {};
  const inline = field("hf_config").value.trim();
  if (inline) {
    try {
      spec.model = JSON.parse(inline);
    } catch (err) {
      throw new Error(`the inline config is not JSON: ${err.message}`);
    }
  } else {
    spec.model = field("model").value.trim();
  }
  for (const name of NUMBERS) {
    const raw = field(name).value.trim();
    if (raw !== "") put(spec, name, Number(raw));
  }
  for (const name of CHOICES) spec[name] = field(name).value;
  for (const name of CHECKS) spec[name] = field(name).checked;
  const targets = field("lora.targets").value.trim();
  if (targets) put(spec, "lora.targets", targets.split(",").map((t) => t.trim()).filter(Boolean));
  if (spec.finetuning !== "lora") { // disabled fields are not part of the request
    delete spec.lora;
    delete spec.quantization;
  }
  const capacity = field("capacity_bytes").value.trim();
  // the API reads "600MiB" itself; a plain count goes as a number
  if (capacity) spec.capacity_bytes = /^\d+$/.test(capacity) ? Number(capacity) : capacity;
  return spec;
}

function put(spec, dotted, value) {
  const [head, tail] = dotted.split(".");
  if (tail) spec[head] = { ...(spec[head] ?? {}), [tail]: value };
  else spec[head] = value;
}

function clearErrors() {
  document.getElementById("form-error").textContent = "";
  for (const p of document.querySelectorAll("#submit-form .field-error")) {
    p.hidden = true;
    p.textContent = "";
  }
  for (const input of document.querySelectorAll("#submit-form [aria-invalid]")) input.removeAttribute("aria-invalid");
}

function showError(name, message) {
  const slot = document.getElementById(`${name}-error`);
  if (!slot) return false;
  slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
  slot.hidden = false;
  field(name)?.setAttribute("aria-invalid", "true");
  return true;
}

// Which of our fields a message is about: its location when it has one, else the first field the
// message names ("effective_batch (2) must be at least num_devices (4)" comes from a model-level check
// and has no location).
function fieldFor(location, message) {
  const known = [...document.querySelectorAll("#submit-form .field")].map((div) => div.dataset.field);
  if (known.includes(location)) return location;
  if (location?.startsWith("model")) return "model"; // a wrong inline config is still the model
  return known.find((name) => new RegExp(`\\b${name.replace(".", "\\.")}\\b`).test(message)) ?? null;
}

/**
 * A 422 body is one of: this service's {detail: "field: msg; …", errors: [{field, message}]},
 * FastAPI's default {detail: [{loc, msg}]}, or {detail: "seq_len must be ≤ …"} from a route's own check.
 */
function showApiErrors(err) {
  const body = err.body ?? {};
  let items;
  if (Array.isArray(body.errors)) {
    items = body.errors.map((e) => ({ location: e.field, message: e.message }));
  } else if (Array.isArray(body.detail)) {
    items = body.detail.map((e) => ({
      location: (e.loc ?? []).filter((part) => part !== "body").join("."), message: e.msg }));
  } else {
    const detail = typeof body.detail === "string" ? body.detail : err.message;
    items = detail.split("; ").map((part) => {
      const match = /^([\w.]+): (.*)$/.exec(part);
      return match ? { location: match[1], message: match[2] } : { location: null, message: part };
    });
  }
  const unplaced = [];
  for (const { location, message } of items) {
    const text = String(message).replace(/^Value error, /, "");
    const name = fieldFor(location, text);
    if (!name || !showError(name, text)) unplaced.push(location && location !== "request" ? `${location}: ${text}` : text);
  }
  const formError = document.getElementById("form-error");
  formError.textContent = unplaced.length ? `${err.status ?? ""} ${unplaced.join("; ")}`.trim() : "";
  // move focus to the first problem so a keyboard user lands on it
  const first = document.querySelector("#submit-form [aria-invalid=true]");
  first?.focus();
  if (!first && unplaced.length) formError.scrollIntoView({ block: "nearest" });
}
