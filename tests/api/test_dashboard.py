"""The dashboard in a real headless Chromium: it polls the API and shows each job's outcome."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

from tests.api.conftest import FAST_JOB, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(url: str) -> str:
    assert CHROMIUM, "needs Debian's chromium (apt-get install chromium), as .ci/run installs it"
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_dashboard_shows_a_finished_probe_with_its_plan(server):
    with server.client() as client:
        job = wait_for(client, client.post("/v1/probes", json={**FAST_JOB, "reuse": False}).json()["id"],
                       ("succeeded",))
    dom = rendered_dom(server.url + "/")
    row = dom.split(f'data-id="{job["id"]}"', 1)[1].split("</tr>", 1)[0]
    search = job["report"]["search"]
    assert "succeeded" in row
    assert f"{search['max_micro_batch']} / {search['safe_micro_batch']}" in row
    assert f"= {job['plan']['effective_batch']}" in row
