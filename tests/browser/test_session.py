"""The dashboard's session in a real headless Chromium, against a server whose access tokens live 6 seconds: the
page refreshes its token before it expires (POST /api/auth/token) and keeps working after the first token expired,
REST and live events alike (the WebSocket reopened with the new token); a phone-sized window has no sideways scroll;
logging out forgets the session."""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from uuid import uuid4

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.browser.support import Device, Server, console_errors, open_page, wait, wait_for, wait_text

TOKEN_LIFE = 6


@pytest.fixture(scope="module")
def server_options() -> tuple[str, ...]:
    return ("--jwt-expiration", str(TOKEN_LIFE))


def session_token(browser: Any) -> str | None:
    return browser.execute_script("const s = sessionStorage.getItem('nanoiot.session'); "
                                  "return s && JSON.parse(s).token;")


def expiry(token: str) -> int:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]


def test_the_token_is_refreshed_before_it_expires_and_the_page_keeps_working(browser: Any, server: Server) -> None:
    token = f"SESSION-{uuid4().hex}"
    server.create_device("Session Device", token)
    open_page(browser, server, "")
    wait(browser, lambda b: b.find_element(By.NAME, "username"), "the login form").send_keys("tenant@nanoiot.io")
    browser.find_element(By.NAME, "password").send_keys("tenant", Keys.ENTER)
    wait_text(browser, "table.devices", "Session Device", "the device list")
    first = session_token(browser)
    assert first is not None
    wait(browser, lambda b: session_token(b) not in (None, first), "a refreshed token", TOKEN_LIFE + 5)
    # Past the first token's expiry, everything still works: with the refreshed token only.
    wait_for(lambda: time.time() > expiry(first) + 1, TOKEN_LIFE + 5, "the first token expired")
    wait_text(browser, "#live", "live", "the WebSocket open")
    device = Device(server.mqtt_port, token).start()
    try:
        wait_text(browser, "tr:has(a) .presence", "online", "a live event after the first token expired")
    finally:
        device.stop()
    browser.find_element(By.NAME, "textSearch").send_keys("Session", Keys.ENTER)
    wait_text(browser, ".status-line", "1 device", "a REST call after the first token expired")
    assert console_errors(browser) == []


def test_a_phone_sized_window_does_not_scroll_sideways(browser: Any, server: Server) -> None:
    device_id = server.create_device("Phone Device", f"PHONE-{uuid4().hex}")
    browser.set_window_size(390, 844)
    try:
        for page in ("#/devices", "#/fleet", f"#/device/{device_id}"):
            open_page(browser, server, page)
            wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "main h1"), f"{page} shown")
            width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth];")
            assert width[0] <= width[1], (page, width)
    finally:
        browser.set_window_size(1280, 1000)


def test_logging_out_forgets_the_session(browser: Any, server: Server) -> None:
    open_page(browser, server, "#/devices")
    logout = browser.find_element(By.ID, "logout")
    wait(browser, lambda b: logout.is_displayed(), "the logout button")
    logout.click()
    wait(browser, lambda b: b.find_elements(By.NAME, "username"), "the login form")
    assert session_token(browser) is None
    browser.refresh()
    wait(browser, lambda b: b.find_elements(By.NAME, "username"), "still logged out after a reload")
