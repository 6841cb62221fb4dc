"""A real headless Chromium logs in to Flower on the lab and sees every worker (issue 5).

Driven through chromedriver's W3C WebDriver HTTP API with `requests` (Debian packages
`chromium` and `chromium-driver`, installed by tests/install-deps.sh): no extra Python
dependency. The login is HTTP basic auth with the credentials in the URL, as a user would type
them; Chromium keeps them for the page's own requests. A screenshot is saved as
test-artifacts/flower-dashboard.png (gitignored).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.e2e_lab import LAB_DIR, LabInventory

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
PROXY_PORT = 5555
USER = "flower"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]


def lab() -> LabInventory:
    inventory = LabInventory(LAB_DIR)
    if not inventory.path.is_file():
        pytest.fail(f"no lab at {LAB_DIR} (LAB_DIR): run tests/lab/lab up and deploy site.yml")
    return inventory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands this test needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = ""

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        resp = requests.request(method, f"{self.url}{path}", json=payload, timeout=60)
        body = resp.json()
        if resp.status_code != 200:
            raise RuntimeError(f"webdriver {method} {path}: {resp.status_code} {body}")
        return body["value"]

    def start(self, binary: str, user_data_dir: str) -> None:
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"],
            },
        }
        value = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = value["sessionId"]

    def cmd(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        return self.call(method, f"/session/{self.session}{path}", payload)

    def quit(self) -> None:
        if self.session:
            self.call("DELETE", f"/session/{self.session}")


def chromium_binary() -> str:
    # /usr/bin/chromium is Debian's wrapper script; chromedriver wants the real binary.
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("Chromium not found: install Debian's chromium (make deps)")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver_bin = shutil.which("chromedriver")
    if not driver_bin:
        pytest.fail("chromedriver not found: install Debian's chromium-driver (make deps)")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="flower-chromium-")  # a new empty profile every run
    proc = subprocess.Popen(
        [driver_bin, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    driver = WebDriver(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if driver.call("GET", "/status")["ready"]:
                    break
            except (requests.ConnectionError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("chromedriver did not become ready in 30 s")
            time.sleep(0.2)
        driver.start(chromium_binary(), profile)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            shutil.rmtree(profile, ignore_errors=True)


def page_text(driver: WebDriver) -> str:
    # textContent, not innerText: the dashboard styles the first letter of each worker name
    # apart, and innerText then splits "default@node1" across lines.
    return driver.cmd(
        "POST", "/execute/sync", {"script": "return document.body.textContent;", "args": []}
    )


def test_chromium_logs_in_and_sees_every_worker(browser: WebDriver) -> None:
    inventory = lab()
    address = inventory.addresses[inventory.groups["flower"][0]]
    password = inventory.secret("flower_basic_auth_password")
    workers = inventory.expected_nodes()
    assert workers

    browser.cmd("POST", "/url", {"url": f"http://{USER}:{password}@{address}:{PROXY_PORT}/"})
    title = browser.cmd("GET", "/title")
    # The dashboard fills its workers table from its own periodic API calls (with the
    # credentials Chromium keeps for the origin): wait for them, without reloading the page.
    deadline = time.monotonic() + 60
    while True:
        text = page_text(browser)
        missing = sorted(w for w in workers if w not in text)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = base64.b64decode(browser.cmd("GET", "/screenshot"))
    png = ARTIFACTS / "flower-dashboard.png"
    png.write_bytes(shot)
    print(f"screenshot: {png} ({len(shot)} bytes), title {title!r}")

    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    assert "Access denied" not in text, "the browser was not let in"
    assert "Flower" in title
    assert not missing, f"workers not on the dashboard: {missing}\n{text[:2000]}"


def test_chromium_without_credentials_is_refused(browser: WebDriver) -> None:
    """A fresh profile (new empty user-data-dir per test) that never logged in."""
    inventory = lab()
    address = inventory.addresses[inventory.groups["flower"][0]]
    browser.cmd("POST", "/url", {"url": f"http://{address}:{PROXY_PORT}/"})
    text = page_text(browser)
    assert "Online workers" not in text
    assert not any(w in text for w in inventory.expected_nodes())
    assert "401" in text or "Authorization Required" in text or not text.strip(), text[:500]
