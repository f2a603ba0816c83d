"""Headless Chromium on a report's HTML (integration tests of the report in a browser)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


CSP = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
       "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">")


def chromium(args: list[str], tmp: Path) -> str:
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
