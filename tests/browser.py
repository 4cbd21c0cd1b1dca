"""Headless Chromium for the page tests: Debian's ``chromium`` driven through Playwright (no browser
download), each launch with a fresh profile and everything that would reach the network turned off."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # as root, as in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> Path | None:
    """The Chromium to drive: ``$CHROMIUM``, or ``chromium`` on the path (Debian's package)."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return Path(found) if found else None


@contextlib.contextmanager
def chromium(executable: Path, *, width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright browser context on ``executable`` with a fresh user data folder, downloads allowed."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(executable), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": height}, accept_downloads=True,
        )  # fmt: skip
        try:
            yield context
        finally:
            context.close()


def screenshot(url: str, out: str | os.PathLike) -> None:
    """Save a PNG of the page at ``url`` (an explore page, with its view in the fragment) once drawn."""
    with chromium(find_chromium()) as context:
        page = context.new_page()
        page.goto(url)
        page.wait_for_function("window.explore && window.explore.drawn !== null")
        page.screenshot(path=str(out), full_page=True)


if __name__ == "__main__":
    # python tests/browser.py file:///.../explore.html#view=decoder&query=12 docs/explore.png
    screenshot(sys.argv[1], sys.argv[2])
