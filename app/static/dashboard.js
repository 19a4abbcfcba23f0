// Polls GET /v1/probes and renders one row per job; the form submits POST /v1/probes.
const POLL_MS = 2000;
const tokenInput = document.querySelector("input[name=token]");
tokenInput.value = localStorage.getItem("fitprobe-token") || "";

function headers() {
  const token = tokenInput.value;
  const h = { "Content-Type": "application/json" };
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render(jobs) {
  const body = document.getElementById("jobs");
  body.replaceChildren(...jobs.map((job) => {
    const search = job.report ? job.report.search : null;
    const plan = job.plan;
    const spec = job.spec || {}; // null when the stored row is unreadable; job.error says why
    const tr = document.createElement("tr");
    tr.dataset.id = job.id;
    tr.append(
      cell(job.id), cell(job.status + (job.cached ? " (cached)" : ""), job.status), cell(job.phase || ""),
      cell(job.spec === null ? "(unreadable)" : typeof spec.model === "string" ? spec.model : "hf:inline"),
      cell(spec.seq_len ?? "-"),
      cell(job.trials.length),
      cell(search ? `${search.max_micro_batch} / ${search.safe_micro_batch}` : "-"),
      cell(plan ? `${plan.micro_batch} × ${plan.accumulation_steps} × ${plan.num_devices} = ${plan.effective_batch}` : "-"),
      cell(job.verification ? (job.verification.passed ? "yes" : "no") : "-"),
    );
    if (job.error) tr.title = job.error;
    return tr;
  }));
}

async function poll() {
  try {
    const response = await fetch("/v1/probes?limit=50", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || response.statusText);
    render(body.items);
    document.getElementById("error").textContent = "";
  } catch (err) {
    document.getElementById("error").textContent = `cannot list probes: ${err.message}`;
  }
}

document.getElementById("submit").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  localStorage.setItem("fitprobe-token", tokenInput.value);
  const spec = { model: form.get("model"), seq_len: Number(form.get("seq_len")) };
  if (form.get("effective_batch")) spec.effective_batch = Number(form.get("effective_batch"));
  const response = await fetch("/v1/probes", { method: "POST", headers: headers(), body: JSON.stringify(spec) });
  if (!response.ok) document.getElementById("error").textContent = (await response.json()).detail;
  poll();
});

poll();
setInterval(poll, POLL_MS);
