"""The dashboard in real headless Chromium (Debian's, driven by Playwright) against a real server.

Each test does what a person would: fills the form, watches the job page, clicks cancel. Screenshots
go to pytest's tmp_path (kept by pytest for the last runs, never committed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.api.chromium import CHROMIUM
from tests.api.conftest import SLOW_JOB, start_server, wait_for

# 12 MiB makes builtin:gpt-nano run out of memory below 37, so the probe has OOM trials, and 37 (prime)
# has no fast even split: the plan is the even 37 × 1, the faster uneven split (19 + 18) a labelled alternative
UNEVEN_JOB = {"model": "builtin:gpt-nano", "seq_len": "32", "precision": "fp32", "effective_batch": "37",
              "capacity_bytes": "12MiB"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM, "needs Debian's chromium (apt-get install chromium), as .ci/run installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    # errors the page catches and logs (a render that throws) fail the test too; the browser's own
    # lines for 4xx answers the tests ask for are not the page's errors
    opened.on("console", lambda message: errors.append(message.text)
              if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    yield opened
    context.close()
    assert not errors, f"the page threw: {errors}"


def fill_form(page: Page, fields: dict[str, str], reuse: bool = True) -> None:
    for name, value in fields.items():
        field = page.locator(f"[id='f-{name}']")
        if field.evaluate("element => element.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    if not reuse:
        page.click("text=More settings")
        page.uncheck("#f-reuse")


# what the job page showed at each render: "status:points", to see it grow without a reload
RECORD_RENDERS = """
new MutationObserver(() => {
  const status = document.querySelector("#job-status")?.textContent;
  const seen = `${status}:${document.querySelectorAll("#memory-chart .trial").length}`;
  if (status && window.renders.at(-1) !== seen) window.renders.push(seen);
}).observe(document, { childList: true, subtree: true });
"""


def test_submit_from_the_form_and_watch_the_curve_and_the_plan_with_its_uneven_alternative(server, page, tmp_path):
    page.add_init_script("window.renders = [];" + f"addEventListener('DOMContentLoaded', () => {{{RECORD_RENDERS}}});")
    page.goto(f"{server.url}/#/new")
    fill_form(page, UNEVEN_JOB, reuse=False)
    page.click("#submit-button")
    page.wait_for_url(re.compile(r"#/probes/\w+$"))
    job_id = page.url.rsplit("/", 1)[1]
    page.screenshot(path=tmp_path / "job-running.png", full_page=True)
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    page.screenshot(path=tmp_path / "job-succeeded.png", full_page=True)

    with server.client() as client:
        job = client.get(f"/v1/probes/{job_id}").json()
    # one point per trial, OOM trials drawn as their own marker at their own micro-batch
    oom = [t["micro_batch"] for t in job["trials"] if not t["fits"]]
    assert oom, "the job was meant to run out of memory at least once"
    assert page.locator("#memory-chart .trial").count() == len(job["trials"])
    renders = page.evaluate("window.renders")
    assert renders[-1] == f"succeeded:{len(job['trials'])}"
    assert any(r.startswith(("queued:", "running:")) for r in renders), f"the page never showed it live: {renders}"
    drawn_oom = page.locator("#memory-chart .trial.oom").evaluate_all("els => els.map(e => +e.dataset.microBatch)")
    assert sorted(drawn_oom) == sorted(oom)
    search = job["report"]["search"]
    expect(page.locator("#memory-chart .max-line-label")).to_have_text(f"max {search['max_micro_batch']}")
    expect(page.locator("#memory-chart .capacity-label")).to_have_text("capacity 12.0MiB")
    # every fitting trial's peak as a stacked bar whose parts are the report's categories, adding up to the peak
    fitting = {t["micro_batch"]: t for t in job["trials"] if t["fits"]}
    rows = page.locator("#breakdown .breakdown-row")
    expect(rows).to_have_count(len(fitting))
    for row in rows.all():
        trial = fitting[int(row.get_attribute("data-micro-batch"))]
        parts = row.locator(".segment").evaluate_all("els => els.map(e => [e.dataset.category, +e.dataset.bytes])")
        assert dict(parts) == {name: n for name, n in trial["breakdown"].items() if n}
        assert sum(n for _, n in parts) == trial["peak_allocated_bytes"]

    # 37 is prime: the only even exact split is 37 micro-batches of 1, the plan every framework runs
    plan = job["plan"]
    assert plan["last_micro_batch"] is None and plan["effective_batch"] == 37
    expect(page.locator("#plan-text")).to_have_text("37 = 1 micro × 37 accum × 1 device")
    # the uneven split, labelled, written as full micro-batches plus the last, and the arithmetic holds
    uneven_row = page.locator("table.alternatives tr", has=page.locator("td.uneven"))
    expect(uneven_row).to_have_count(1)
    uneven = next(alt for alt in plan["alternatives"] if alt["last_micro_batch"])
    text = uneven_row.locator("td:nth-child(2)").inner_text()
    match = re.fullmatch(r"(\d+) = (\d+) micro × (\d+) accum × 1 device \((?:(\d+) × )?(\d+) \+ (\d+)\)", text)
    assert match, text
    total, micro, steps, full, micro_again, last = match.groups()
    full = full or "1"
    assert int(total) == int(full) * int(micro) + int(last) == 37
    assert (int(micro), int(last), int(full) + 1, int(steps)) == (uneven["micro_batch"], uneven["last_micro_batch"],
                                                                  uneven["accumulation_steps"], uneven["accumulation_steps"])
    assert micro_again == micro
    expect(page.locator("#uneven-note")).to_contain_text("HF Trainer")
    expect(page.get_by_text(plan["reason"])).to_be_visible()
    # every split on the page in the plan's own notation, the one the CLI and the exports print
    splits = page.locator("table.alternatives tr td:nth-child(2)").all_inner_texts()
    assert splits == [plan["equation"]] + [alt["equation"] for alt in plan["alternatives"]]

    # verification and exports
    expect(page.locator("ul.checks li")).to_have_count(len(job["verification"]["checks"]))
    expect(page.locator("#export-output")).to_contain_text('"gradient_accumulation_steps"')
    page.select_option("#export-format", "deepspeed")
    expect(page.locator("#export-output")).to_contain_text('"train_batch_size"')
    assert page.locator("#report-link").get_attribute("download") == f"fitprobe-{job_id}.json"


def mib(value: int) -> str:
    """Bytes as the page writes them, by hand: MiB with one decimal."""
    return f"{value / 2**20:.1f}MiB"


def test_a_does_not_fit_probe_shows_the_verdict_what_it_needs_and_the_settings_that_fit(server, page, tmp_path):
    # 1 MB is less than micro-batch 1 of gpt-nano needs: the probe succeeds in finding that nothing fits
    with server.client() as client:
        submitted = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32,
                                                    "capacity_bytes": 1000000, "effective_batch": 256})
        job = wait_for(client, submitted.json()["id"], ("succeeded",))
    not_fitting = job["report"]["does_not_fit"]
    page.goto(f"{server.url}/#/probes/{job['id']}")
    status = page.locator("#job-status")
    expect(status).to_have_text(re.compile(r"^does not fit"))
    assert status.evaluate("el => getComputedStyle(el).color") == "rgb(176, 0, 32)", "red, as a failure"
    needs = page.locator("#dnf-needs")
    expect(needs).to_contain_text(f"Needs {mib(not_fitting['needs_bytes'])} at micro-batch 1 (estimated); "
                                  "capacity 976.6KiB")  # 1,000,000 / 1024
    expect(needs).to_contain_text(f"at least {mib(not_fitting['device_bytes_needed'])}")
    expect(needs).to_contain_text("No plan for the effective batch of 256")
    rows = page.locator("#dnf-options tbody tr")
    expect(rows).to_have_count(len(not_fitting["options"]))
    for row, option in zip(rows.all(), not_fitting["options"], strict=True):
        assert row.locator("td").nth(0).inner_text() == option["change"]
        assert row.locator("td").nth(2).inner_text() == ("✓ fits" if option["fits"] else "✗ does not fit")
    expect(page.locator("#curve-caption")).to_contain_text("even micro-batch 1 does not fit in 976.6KiB")
    cheapest = not_fitting["cheapest_fitting"]  # fitprobe recommend's first candidate, when a combination fits
    if cheapest is None:
        expect(page.locator("#dnf-cheapest")).to_have_count(0)
    else:
        expect(page.locator("#dnf-cheapest")).to_contain_text(f"Cheapest change that fits: {cheapest['change']} at "
                                                              f"micro-batch {cheapest['safe_micro_batch'] or 1}")
    body = page.locator("main").inner_text()
    assert "without an effective_batch" not in body and "max micro-batch 0" not in body, body
    expect(page.locator(".exports")).to_have_count(0)
    page.screenshot(path=tmp_path / "does-not-fit.png", full_page=True)
    page.goto(f"{server.url}/#/")
    expect(page.locator(f"tr[data-id='{job['id']}'] td.status")).to_have_text("does not fit")


def test_an_oom_trial_without_a_peak_is_drawn_at_the_capacity(server, page):
    page.goto(f"{server.url}/#/")
    drawn = page.evaluate("""async () => {
        const { memoryChart } = await import("/chart.js");
        const svg = memoryChart({ capacityBytes: 1 << 24, headroom: 0.1, maxMicroBatch: 8, safeMicroBatch: 7,
            trials: [{ micro_batch: 8, fits: true, peak_allocated_bytes: 1 << 23 },
                     { micro_batch: 16, fits: false, peak_allocated_bytes: null, oom_live_bytes: 1 << 23,
                       oom_request_bytes: 1 << 24 }] });
        const capacityY = svg.querySelector("line.capacity").getAttribute("y1");
        const marker = svg.querySelector(".trial.oom.no-peak");
        return { points: svg.querySelectorAll(".trial").length, capacityY: +capacityY,
                 markerY: +marker.getAttribute("d").match(/L[\\d.]+ ([\\d.]+)/)[1],
                 title: marker.querySelector("title").textContent };
    }""")
    assert drawn["points"] == 2
    assert abs(drawn["markerY"] - drawn["capacityY"]) < 0.01, drawn
    assert "out of memory, peak not recorded" in drawn["title"]


MIB = 2**20
# two trials' peaks by category: the second holds twice the first's peak, the growth all activations and loss head
BREAKDOWN_TRIALS = [
    {"micro_batch": 1, "fits": True, "peak_allocated_bytes": 8 * MIB,
     "breakdown": {"weights": MIB, "gradients": MIB, "optimizer_state": 2 * MIB, "activations": 2 * MIB,
                   "loss_head": 2 * MIB, "temporaries": 0}},
    {"micro_batch": 3, "fits": True, "peak_allocated_bytes": 16 * MIB,
     "breakdown": {"weights": MIB, "gradients": MIB, "optimizer_state": 2 * MIB, "activations": 6 * MIB,
                   "loss_head": 6 * MIB, "temporaries": 0}},
    {"micro_batch": 4, "fits": False, "peak_allocated_bytes": None, "breakdown": None},
]


def test_the_peaks_breakdown_is_a_stacked_bar_per_fitting_trial_on_one_scale(server, page, tmp_path):
    page.goto(f"{server.url}/#/")
    page.evaluate("""async (trials) => {
        const { breakdownSection } = await import("/breakdown.js");
        document.body.append(breakdownSection(trials, null));
    }""", BREAKDOWN_TRIALS)
    page.screenshot(path=tmp_path / "breakdown.png", full_page=True)
    bars = page.locator("#breakdown .bar")
    expect(bars).to_have_count(2)  # the trial that did not fit has no peak to break down
    small, large = (bar.bounding_box() for bar in bars.all())
    # the browser's layout, measured: half the peak is half the width, and each part its share of its bar
    assert abs(small["width"] - large["width"] / 2) <= 1, (small, large)
    for bar, trial in zip(bars.all(), BREAKDOWN_TRIALS, strict=False):
        width = bar.bounding_box()["width"]
        for segment in bar.locator(".segment").all():
            share = trial["breakdown"][segment.get_attribute("data-category")] / trial["peak_allocated_bytes"]
            assert abs(segment.bounding_box()["width"] - share * width) <= 1
    expect(bars.first).to_have_attribute("aria-label", "micro-batch 1: peak 8.0MiB = weights 1.0MiB + gradients "
                                         "1.0MiB + optimizer state 2.0MiB + activations 2.0MiB + loss head 2.0MiB")
    expect(page.locator("#breakdown .legend")).to_contain_text("optimizer state")


def test_a_report_without_breakdowns_says_why(server, page):
    page.goto(f"{server.url}/#/")
    page.evaluate("""async () => {
        const { breakdownSection } = await import("/breakdown.js");
        const trials = [{ micro_batch: 2, fits: true, peak_allocated_bytes: 1024, breakdown: null }];
        document.body.append(breakdownSection(trials, "no breakdown on CUDA"));
    }""")
    expect(page.locator("#breakdown-note")).to_have_text("no breakdown on CUDA")
    expect(page.locator("#breakdown .bar")).to_have_count(0)


def test_a_422_shows_next_to_its_field(server, page, tmp_path):
    page.goto(f"{server.url}/#/new")
    fill_form(page, {"seq_len": "0"})
    page.select_option("#f-finetuning", "lora")
    page.fill("[id='f-lora.rank']", "0")
    page.click("#submit-button")
    with server.client() as client:
        api = client.post("/v1/probes", json={"model": "builtin:gpt-tiny", "seq_len": 0}).json()
    api_message = next(e["message"] for e in api["errors"] if e["field"] == "seq_len").removeprefix("Value error, ")
    expect(page.locator("#seq_len-error")).to_have_text(api_message)
    expect(page.locator("#f-seq_len")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("[id='lora.rank-error']")).to_contain_text("greater than or equal to 1")
    expect(page.locator("#effective_batch-error")).to_be_hidden()
    assert page.url.endswith("#/new"), "nothing was submitted"
    page.screenshot(path=tmp_path / "form-422.png", full_page=True)


def test_cancel_from_the_job_page_and_the_list_shows_it(server, page, tmp_path):
    with server.client() as client:
        job_id = client.post("/v1/probes", json=SLOW_JOB).json()["id"]
        wait_for(client, job_id, ("running",))
        page.goto(f"{server.url}/#/probes/{job_id}")
        expect(page.locator("#job-status")).to_have_text("running")
        page.click("#cancel-job")
        expect(page.locator("#job-status")).to_have_text("cancelled", timeout=30_000)
        expect(page.locator("#cancel-job")).to_have_count(0)
        assert client.get(f"/v1/probes/{job_id}").json()["status"] == "cancelled"

    page.click("text=← all probes")
    row = page.locator(f"#jobs tr[data-id='{job_id}']")
    expect(row).to_contain_text("cancelled")
    assert page.locator("#jobs tr").first.get_attribute("data-id") == job_id, "newest first"
    page.select_option("#filter-status", "succeeded")
    expect(row).to_have_count(0)
    page.screenshot(path=tmp_path / "list.png", full_page=True)


@pytest.mark.slow  # a trial runs while the page is read (each sleeps ~6 s: SLOW_JOB)
def test_the_running_page_says_which_micro_batch_it_is_trying_and_for_how_long(server, page):
    with server.client() as client:
        job_id = client.post("/v1/probes", json=SLOW_JOB).json()["id"]
        wait_for(client, job_id, ("running",))
        page.goto(f"{server.url}/#/probes/{job_id}")
        doing = page.locator("#job-doing")
        expect(doing).to_have_text(re.compile(r"^trying micro-batch \d+$"), timeout=60_000)
        trying = int(doing.text_content().rsplit(" ", 1)[1])
        job = client.get(f"/v1/probes/{job_id}").json()
        # the API's account: the trial started last, or (when it ended since) one with a result
        assert trying == job["trying_micro_batch"] or trying in [t["micro_batch"] for t in job["trials"]]
        elapsed = page.locator("#job-elapsed")
        expect(elapsed).to_have_text(re.compile(r"^(\d+s|\d+m \d\ds) elapsed$"))
        first = elapsed.text_content()
        expect(elapsed).not_to_have_text(first, timeout=5_000)  # the clock ticks between polls
        client.delete(f"/v1/probes/{job_id}")
        expect(page.locator("#job-status")).to_have_text("cancelled", timeout=30_000)
        expect(page.locator("#job-progress")).to_have_count(0)


def test_cancel_from_the_list(server, page):
    with server.client() as client:
        job_id = client.post("/v1/probes", json=SLOW_JOB).json()["id"]
        page.goto(f"{server.url}/#/")
        page.click(f"#jobs tr[data-id='{job_id}'] button")
        expect(page.locator(f"#jobs tr[data-id='{job_id}']")).to_contain_text("cancelled", timeout=30_000)
        assert wait_for(client, job_id, ("cancelled",), timeout_s=10)["status"] == "cancelled"


def test_the_page_asks_for_a_token_once_and_keeps_it_for_the_tab(tmp_path, page):
    secured = start_server(tmp_path / "data", api_tokens="s3cret")
    try:
        page.goto(f"{secured.url}/#/")
        dialog = page.locator("#token-dialog")
        expect(dialog).to_be_visible()
        page.fill("#token-input", "wrong")
        page.keyboard.press("Enter")
        expect(dialog.locator(".token-rejected")).to_be_visible()
        page.fill("#token-input", "s3cret")
        page.keyboard.press("Enter")
        expect(page.locator("#devices li")).to_have_count(1)
        expect(dialog).to_be_hidden()
        page.reload()
        expect(page.locator("#devices li")).to_have_count(1)
        expect(dialog).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('fitprobe-token')") == "s3cret"
    finally:
        secured.stop()


def test_an_estimates_page_says_it_was_estimated_not_run_on_a_device(server, page):
    with server.client() as client:
        job_id = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32",
                                                 "mode": "estimate",
                                                 "capacity_bytes": 16 << 20, "effective_batch": 8}).json()["id"]
        wait_for(client, job_id, ("succeeded",))
    page.goto(f"{server.url}/#/probes/{job_id}")
    expect(page.locator("#curve-caption")).to_contain_text("(estimated, not run on a device)")
    expect(page.locator("#curve-caption")).not_to_contain_text("measured")
    expect(page.locator("#estimate-note")).to_contain_text("Not verified: estimated, not run on a device. fake ")


def test_the_form_states_the_services_own_limits(server, page):
    with server.client() as client:
        limits = client.get("/v1/limits").json()
    page.goto(f"{server.url}/#/new")
    expect(page.locator("#seq_len-help")).to_have_text(f"at most {limits['max_seq_len']:,} on this service")
    expect(page.locator("#f-seq_len")).to_have_attribute("max", str(limits["max_seq_len"]))
    expect(page.locator("#effective_batch-help")).to_have_text(
        f"at most {limits['max_effective_batch']:,} on this service")


def test_the_memory_axis_reads_in_one_unit_and_micro_batches_are_whole(server, page, tmp_path):
    """From screenshots: '1000.0MiB' beside '1.0GiB', a tick run into the axis title, half micro-batches."""
    page.goto(f"{server.url}/#/")
    drawn = page.evaluate("""async () => {
        const { memoryChart } = await import("/chart.js");
        const svg = memoryChart({ capacityBytes: 1.5 * 2 ** 30, headroom: 0.1, maxMicroBatch: 2, safeMicroBatch: 1,
            trials: [{ micro_batch: 1, fits: true, peak_allocated_bytes: 2 ** 29 },
                     { micro_batch: 2, fits: true, peak_allocated_bytes: 2 ** 30 }] });
        document.body.append(svg);
        const texts = [...svg.querySelectorAll("g.axis text")].map((t) => t.textContent);
        const title = svg.querySelector(".axis-title");
        const titleBox = title.getBoundingClientRect();
        const overlaps = [...svg.querySelectorAll("g.axis text")].filter((t) => t !== title).some((t) => {
            const box = t.getBoundingClientRect();
            return box.left < titleBox.right && box.right > titleBox.left && box.top < titleBox.bottom
                && box.bottom > titleBox.top; });
        return { texts, title: title.textContent, overlaps };
    }""")
    assert drawn["title"] == "peak memory (MiB)"
    numbers = [t for t in drawn["texts"] if t not in ("peak memory (MiB)", "micro-batch (examples)")]
    assert numbers and all(re.fullmatch(r"\d+", t) for t in numbers), numbers  # no unit, no fraction
    assert not drawn["overlaps"]
    page.screenshot(path=str(tmp_path / "axis.png"))


def test_oom_trials_and_an_oom_verification_read_in_units_not_raw_counts(server, page):
    with server.client() as client:
        job_id = client.post("/v1/probes", json={**{k: (int(v) if v.isdigit() else v) for k, v in UNEVEN_JOB.items()},
                                                 "reuse": False}).json()["id"]
        job = wait_for(client, job_id, ("succeeded",))
    assert any(not t["fits"] for t in job["trials"])
    page.goto(f"{server.url}/#/probes/{job_id}")
    notes = page.locator(".trials-table tr.oom-row td:last-child")
    expect(notes.first).to_contain_text("out of memory at ")
    for text in notes.all_text_contents():
        assert not re.search(r"\d{6,}", text), text  # "12.0MiB", never "12582912"
    # a verification that ran out of memory has no step time to show: not "0 ms, 0 tokens/s"
    shown = page.evaluate("""async () => {
        const { verificationSection } = await import("/job.js");
        return verificationSection({ passed: false, steps: 2, losses: [], step_s: 0, tokens_per_s: 0,
            peak_reserved_bytes: null, capacity_bytes: 2 ** 24, examples_per_step: 8,
            gradient_noise_scale: null, gradient_noise_note: "not estimated: out of memory",
            checks: [{ name: "no_oom", passed: false, detail: "out of memory at step 1" }] }, null).textContent;
    }""")
    assert "not measured (no step completed)" in shown and "0 ms" not in shown and "0 tokens/s" not in shown


def test_whatif_page_draws_one_heat_map_cell_per_setting_and_seq_len(server, page, tmp_path):
    from fitprobe.probe.whatif_table import Cell, Longest, Row, WhatIf, settings_grid

    seq_lens = [1024, 2048, 4096]
    rows = []
    # 12 rows: the default finetuning, checkpointing and precisions, one optimizer
    for i, setting in enumerate(settings_grid(optimizers=["adamw_bnb_8bit"])):
        if setting.finetuning == "qlora":
            note = "not applicable: quantization works on Hugging Face models"
            rows.append(Row(setting, setting.label, [Cell(s, note=note) for s in seq_lens], Longest(None, note=note)))
            continue
        # the safe micro-batch one below the max: the headroom costs an example
        cells = [Cell(s, max(0, i - k * 3), max(0, i - k * 3 - 1), (i + 1) << 30 if i - k * 3 > 0 else None)
                 for k, s in enumerate(seq_lens)]
        longest = Longest(1024 * (i // 3 + 1), 1024 * (i // 3 + 1) + 256, 1 << 30, 3)
        rows.append(Row(setting, setting.label, cells, longest))
    table = WhatIf("preset:gpt2", 24 << 30, "bf16-mixed", seq_lens, 1024, rows, 12.5).to_dict()

    page.goto(f"{server.url}/#/whatif")
    page.fill("#whatif-json", json.dumps(table))
    grid = page.locator("table.heat-map")
    expect(grid).to_be_visible()
    page.screenshot(path=tmp_path / "whatif.png", full_page=True)
    assert grid.locator("tbody tr").count() == 12
    assert grid.locator("td.heat-cell").count() == 12 * len(seq_lens)
    first = grid.locator("tbody tr").first
    expect(first.locator("th")).to_have_text("full · no ckpt · bf16-mixed · adamw_bnb_8bit")
    expect(grid.locator("tbody tr").nth(1).locator("th")).to_have_text("full · no ckpt · bf16 · adamw_bnb_8bit")
    expect(page.locator("#whatif-map figcaption")).to_contain_text("bf16-mixed, bf16")
    expect(first.locator("td.heat-cell").first).to_have_text("does not fit")
    expect(grid.locator("td.heat-cell.na")).to_have_count(4 * len(seq_lens))
    # the largest micro-batch gets the darkest shade, the cell that does not fit the "no" shade; the safe
    # micro-batch is shown apart from the max
    expect(grid.locator("td.heat-5")).to_have_text(["7 · safe 6 (8.0GiB)"])
    page.fill("#whatif-json", "{not json")
    expect(page.locator("#whatif-map .error")).to_contain_text("not a what-if table")


@pytest.mark.slow  # one estimated table of 1 setting × 1 seq_len and its longest-sequence search
def test_whatif_page_submits_a_table_follows_the_job_and_draws_it_from_the_api(server, page):
    page.goto(f"{server.url}/#/whatif")
    for field, value in {"model": "builtin:gpt-nano", "capacity": "12MiB", "seq-lens": "32", "finetuning": "full",
                         "checkpointing": "off", "optimizers": "adamw_torch_fused", "precisions": "bf16-mixed"}.items():
        page.fill(f"#whatif-{field}", value)
    page.click("text=Estimate the table")
    expect(page.locator("#whatif-status")).to_contain_text("succeeded · 2/2 cells", timeout=300_000)
    grid = page.locator("#whatif-map table.heat-map")
    expect(grid.locator("tbody tr")).to_have_count(1)
    job_id = page.input_value("#whatif-job-id")
    table = server.client().get(f"/v1/whatif/{job_id}").json()["table"]
    cell = table["rows"][0]["cells"][0]
    expect(grid.locator("td.heat-cell")).to_have_text([f"{cell['max_micro_batch']} · safe {cell['safe_micro_batch']} ("
                                                       f"{cell['peak_bytes'] / 2**20:.1f}MiB)"])
    # a job loaded by id draws the same table; one that does not exist says so
    page.goto(f"{server.url}/#/whatif")
    page.reload()
    page.fill("#whatif-job-id", job_id)
    page.click("#whatif-load button")
    expect(page.locator("#whatif-map td.heat-cell")).to_have_count(1)
    page.fill("#whatif-job-id", "no-such-job")
    page.click("#whatif-load button")
    expect(page.locator("#whatif-status .error")).to_contain_text("no what-if job with id 'no-such-job'")


def test_the_forms_choices_are_the_specs_own(server, page):
    """A value the spec takes appears in the form without a copy in the page: flattened collation, fsdp sharding."""
    with server.client() as client:
        properties = client.get("/openapi.json").json()["components"]["schemas"]["ProbeRequest"]["properties"]
    page.goto(f"{server.url}/#/new")
    for name in ("collation", "sharding", "precision", "mode"):
        expected = properties[name]["enum"]
        expect(page.locator(f"#f-{name} option")).to_have_count(len(expected))
        assert page.locator(f"#f-{name} option").all_text_contents() == expected
    assert "flattened" in page.locator("#f-collation option").all_text_contents()
    expect(page.locator("#collation-help")).to_contain_text("DataCollatorWithFlattening")
    expect(page.locator("#f-collation")).to_have_value("padded")  # the spec's default stays selected


@pytest.mark.slow  # ~15 s on the shared host: an estimated probe with its evaluation and generation searches
def test_the_evaluation_and_generation_batches_show_beside_the_state_that_bounds_them(server, page, tmp_path):
    """A real report's sections, rendered: each batch, what stays resident and the capacity it leaves (the
    why), the eval accumulation, and the KV cache beside its arithmetic."""
    from fitprobe.probe.job import run_probe
    from fitprobe.probe.spec import ProbeSpec, format_bytes
    from tests.test_evaluate import QWEN2

    spec = ProbeSpec(model=dict(QWEN2, max_position_embeddings=32), seq_len=16, precision="fp32", mode="estimate",
                     capacity_bytes=6 << 20, eval=True, eval_compute_metrics=True, eval_rows=64, generate=True,
                     max_new_tokens=8)
    report = run_probe(spec).model_dump(mode="json")
    page.goto(f"{server.url}/#/")
    page.evaluate("""async (report) => {
        const { noGradSections } = await import("/batches.js");
        document.body.append(...noGradSections(report));
    }""", report)
    page.screenshot(path=tmp_path / "batches.png", full_page=True)
    evaluation, generation = report["evaluation"], report["generation"]
    expect(page.locator("#eval-batch")).to_contain_text(
        f"per_device_eval_batch_size={evaluation['per_device_eval_batch_size']}: max {evaluation['batch']['max']}, "
        f"safe {evaluation['batch']['safe']}")
    for section, where in ((evaluation, "#eval-resident"), (generation, "#generate-resident")):
        expect(page.locator(where)).to_have_text(
            f"beside {section['resident']} ({format_bytes(section['resident_bytes'])} resident, "
            f"{format_bytes(section['capacity_left_bytes'])} of {format_bytes(6 << 20)} left)")
        assert "optimizer state" in section["resident"]
    expect(page.locator("#eval-kept")).to_contain_text(f"{evaluation['eval_steps_fit']} step(s)")
    expect(page.locator("#generate-cache")).to_contain_text(
        f"KV cache per sequence: {format_bytes(generation['cache_bytes_per_sequence'])} at "
        f"{generation['cache_tokens']} tokens (arithmetic: {format_bytes(generation['cache_bytes_per_sequence_arithmetic'])})")
    expect(page.locator("#generation table tbody tr")).to_have_count(len(generation["batch"]["trials"]))


@pytest.mark.slow  # a recommendation of two candidates on gpt-nano: ~20 s on the shared host
def test_recommend_from_the_form_shows_the_candidates_ranked_with_the_one_to_run(server, page, tmp_path):
    page.goto(f"{server.url}/#/new")
    fill_form(page, {"model": "builtin:gpt-nano", "seq_len": "64", "capacity_bytes": "12MiB", "precision": "bf16",
                     "optimizer": "adafactor"})
    page.click("#recommend-button")
    page.wait_for_url(re.compile(r"#/recommendations/\w+$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#recommend-status")).to_have_text(re.compile(r"^succeeded"), timeout=180_000)
    page.screenshot(path=tmp_path / "recommendation.png", full_page=True)
    with server.client() as client:
        answer = client.get(f"/v1/recommendations/{job_id}").json()["recommendation"]
    rows = page.locator("#recommend-table tbody tr")
    expect(rows).to_have_count(len(answer["candidates"]))
    for row, candidate in zip(rows.all(), answer["candidates"], strict=True):
        assert row.locator("td").nth(1).inner_text() == candidate["label"]
        assert row.locator("td").nth(2).inner_text() == str(candidate["max_micro_batch"])
    first = answer["candidates"][answer["first_fitting"]]
    expect(page.locator("#recommend-first")).to_have_text(
        f"Run: {first['label']}, micro-batch {first['safe_micro_batch']} (max {first['max_micro_batch']})")
    expect(rows.nth(answer["first_fitting"])).to_have_class("chosen")
