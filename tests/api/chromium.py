"""The DOM a real headless Chromium renders for a URL, for tests that only need to read the page.

Tests that click and type use Playwright (tests/api/test_dashboard.py); these use Chromium's own
``--dump-dom`` with background networking off, so a page that needs the internet shows up blank.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(url: str) -> str:
    """The page's DOM after its scripts ran (five seconds of virtual time)."""
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
