"""A real headless Chromium (Debian's `chromium`, installed by .ci/run) driven by playwright."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("UGCSR_CHROMIUM", "/usr/bin/chromium")
# Quiet, offline, throw-away profile: nothing may reach the network during a test.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-default-apps", "--no-default-browser-check"]
ARTIFACTS = Path(os.environ.get("UGCSR_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts"))


class Browser:
    def __init__(self):
        if not Path(CHROMIUM).exists():
            raise RuntimeError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium, as .ci/run "
                               "does) or point UGCSR_CHROMIUM at a Chromium binary")
        from playwright.sync_api import sync_playwright

        self.profile = tempfile.mkdtemp(prefix="ugcsr-chromium-")
        self._pw = sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            self.profile, executable_path=CHROMIUM, headless=True, args=ARGS, viewport={"width": 1280, "height": 900})

    def open(self, path: Path):
        """Load a local page; returns (page, messages) with console messages and uncaught errors."""
        page = self.context.new_page()
        messages = []
        page.on("console", lambda m: messages.append((m.type, m.text)))
        page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
        page.on("requestfailed", lambda r: messages.append(("requestfailed", r.url)))
        page.goto(path.resolve().as_uri(), wait_until="load")
        return page, messages

    def close(self):
        self.context.close()
        self._pw.stop()
        shutil.rmtree(self.profile, ignore_errors=True)


def visible_images(page) -> list[dict]:
    return page.evaluate("""Array.from(document.images).filter(i => !i.closest('[hidden]')).map(i => ({
        src: i.getAttribute('src'), naturalWidth: i.naturalWidth, complete: i.complete, cls: i.className}))""")


def keep_screenshot(page, name: str) -> Path:
    """Full-page screenshot kept as a test artefact (.artifacts/ or $UGCSR_TEST_ARTIFACTS)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path
