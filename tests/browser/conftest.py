"""Fixtures of the browser suite: one server and one headless Chromium per module (they take a few seconds to start).

A missing chromium or chromedriver FAILS these tests (CI installs them in .ci/run): a skipped browser suite would
hide a dashboard that no longer works."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.browser.support import CHROMEDRIVER, CHROMIUM, Server, browser_binaries_missing

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def server_options() -> tuple[str, ...]:
    """Extra ``twistd nanoiot`` options of a module's server (a module overrides this fixture)."""
    return ()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_options: tuple[str, ...]) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("dashboard-server"), *server_options)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = browser_binaries_missing()
    if missing:
        pytest.fail(missing)
    profile = tempfile.mkdtemp(prefix="nanoiot-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
