"""Headless Chromium for the web viewer's end-to-end test and its README screenshot.

Uses the system browser (Debian's `chromium`) through Playwright; nothing is downloaded.
Playwright is a test dependency, imported only when a browser is launched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

DEBIAN_PACKAGES = "chromium chromium-driver"
# Root in a container on a closed network: no sandbox, no GPU, nothing that phones home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    """The system Chromium's path, or None. $TOMOCAST_CHROMIUM overrides the search."""
    candidates = [
        os.environ.get("TOMOCAST_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def launch(
    playwright: Any, executable: str, user_data_dir: Path, viewport: tuple[int, int] = (1280, 900)
) -> Any:
    """A Playwright BrowserContext of the system Chromium with a fresh profile in
    `user_data_dir` (Playwright reserves --user-data-dir for itself: this is the same)."""
    user_data_dir.mkdir(parents=True, exist_ok=True)
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir),
        executable_path=executable,
        headless=True,
        args=list(CHROMIUM_FLAGS),
        viewport={"width": viewport[0], "height": viewport[1]},
    )
