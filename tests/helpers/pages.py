"""The HTML pages (the eval, train and run reports): what makes one self-contained, and headless Chromium to draw
it (Debian `chromium`, `chromium-driver`; `make browser`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers.processes import free_port

EVIL = "<script>alert(1)</script>"  # text from the data or the config: every page must show it escaped
EXTERNAL = re.compile(r"""(?:src|href|xlink:href|url)\s*[=(]\s*["']?\s*(?:https?:)?//""", re.I)
PNG = b"\x89PNG\r\n\x1a\n"

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not installed (apt-get install -y chromium) - headless rendering not checked")
needs_webdriver = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="chromium / chromedriver not installed (apt-get install -y chromium chromium-driver; `make browser`) - "
           "headless rendering not checked")


def assert_self_contained(html: str) -> None:
    """One page that needs nothing else: a doctype and UTF-8, no script, no stylesheet link or import, nothing
    fetched from anywhere."""
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html
    assert not EXTERNAL.search(html), EXTERNAL.search(html)
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html


def screenshot(page: Path, png: Path, profile: Path) -> bytes:
    """Headless Chromium draws the page file into ``png`` (1200 x 2000); returns the image's bytes."""
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           f"--screenshot={png}", "--window-size=1200,2000", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), proc.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == PNG
    return data


class WebDriver:
    """The few W3C WebDriver calls the browser tests need, over HTTP to a local chromedriver."""

    def __init__(self, profile: Path):
        import httpx

        self.port = free_port()
        self.proc = subprocess.Popen([shutil.which("chromedriver"), f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        deadline = time.time() + 30
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.time() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": shutil.which("chromium"), "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,1600"]}}
        r = self.http.post("/session", json={"capabilities": {"alwaysMatch": caps}}).json()
        if "sessionId" not in r.get("value", {}):
            self.close()
            raise RuntimeError(f"no WebDriver session: {r}")
        self.sid = r["value"]["sessionId"]

    def call(self, method: str, path: str, body: dict | None = None):
        r = self.http.request(method, f"/session/{self.sid}{path}", json=body)
        value = r.json()["value"]
        assert r.status_code == 200, value
        return value

    def js(self, script: str):
        return self.call("POST", "/execute/sync", {"script": script, "args": []})

    def close(self) -> None:
        try:
            if getattr(self, "sid", None):
                self.http.delete(f"/session/{self.sid}")
        finally:
            self.http.close()
            self.proc.terminate()
            self.proc.wait(10)
