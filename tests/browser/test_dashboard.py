"""The web dashboard in a real headless Chromium against the real server (a ``twistd`` subprocess with demo data)
and MQTT devices played by paho-mqtt: log in; a two-way RPC from the terminal answered by a device; a switch widget
configured in the page and flipped, the device receiving ``setValue``; a persistent RPC for an offline device going
QUEUED → SUCCESSFUL when the device connects, and a queued one deleted from its row; a bulk command to 20 devices
(by type) whose counts reach 20, and one to 10 devices picked by hand.

One server and one browser for the module (the tests run in order and share the login). Every wait is a
WebDriverWait on a condition. Screenshots of the device page and the fleet view go to the artifacts directory
($NANOIOT_ARTIFACTS, else build/artifacts)."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select

from tests.browser.support import (WAIT, Device, Server, artifacts_dir, console_errors, open_page, text_of, wait,
                                   wait_for, wait_text)

def answer(state: dict[str, Any]) -> Any:
    """A device: ``setValue`` stores, ``getValue`` tells, ``getTemperature`` 21.5, ``getAlarm`` true, else echo."""
    def reply(method: str, params: Any) -> Any:
        if method == "setValue":
            state["value"] = params.get("value") if isinstance(params, dict) else params
            return {"value": state["value"]}
        if method == "getValue":
            return {"value": state.get("value", False)}
        if method == "getTemperature":
            return 21.5
        if method == "getAlarm":
            return True
        return {"echo": method, "params": params}
    return reply


@pytest.fixture(scope="module")
def server_options() -> tuple[str, ...]:
    return ("--rpc-min-timeout", "0")  # so that a command to an offline device fails in 1 s


@pytest.fixture(scope="module")
def lab(server: Server) -> Any:
    """A device with a few widgets stored server-side, and its MQTT device (not connected yet)."""
    widgets = [
        {"type": "slider", "label": "Dimmer", "method": "setValue", "min": 0, "max": 100},
        {"type": "knob", "label": "Thermostat", "method": "setTemperature", "getMethod": "getTemperature",
         "min": 10, "max": 30},
        {"type": "led", "label": "Alarm", "getMethod": "getAlarm", "pollMs": 3000},
        {"type": "button", "label": "Reboot", "method": "reboot", "params": {"delay": 0}},
    ]
    token = f"LAB-{uuid4().hex}"
    device_id = server.create_device("Lab Bench", token, "bench", {"nanoiotWidgets": widgets})
    device = Device(server.mqtt_port, token, answer({}))
    yield device_id, device
    device.stop()


def test_login_shows_a_wrong_password_then_lists_the_tenants_devices(browser: Any, server: Server) -> None:
    open_page(browser, server, "")
    username = wait(browser, lambda b: b.find_element(By.NAME, "username"), "the login form")
    username.send_keys("tenant@nanoiot.io")
    browser.find_element(By.NAME, "password").send_keys("wrong", Keys.ENTER)
    wait_text(browser, "#login-error", "Login failed", "the refused login's message")
    password = browser.find_element(By.NAME, "password")
    password.clear()
    password.send_keys("tenant", Keys.ENTER)
    wait_text(browser, "table.devices", "Demo Device", "the demo device in the list")
    assert "tenant@nanoiot.io" in browser.find_element(By.ID, "who").text
    wait_text(browser, "#live", "live", "the WebSocket connected")
    # The access token, for a tenant admin.
    row = browser.find_element(By.XPATH, "//tr[th/a[text()='Demo Device']]")
    row.find_element(By.CSS_SELECTOR, "td.token button").click()
    wait(browser, lambda b: "DEMO_DEVICE_TOKEN" in row.find_element(By.CSS_SELECTOR, "td.token").text,
         "the demo device's token")
    assert console_errors(browser) == []


def test_the_terminal_sends_a_two_way_rpc_and_shows_the_answer(browser: Any, server: Server, lab: Any) -> None:
    device_id, device = lab
    open_page(browser, server, f"#/device/{device_id}")
    wait_text(browser, "h1", "Lab Bench", "the device page")
    wait_text(browser, "h1 .presence", "offline", "read with the device info: no session yet")
    device.start()
    wait_for(device.subscribed.is_set, WAIT, "the device subscribed")
    wait_text(browser, "h1 .presence", "online", "the device's presence, live over the WebSocket")
    command = browser.find_element(By.NAME, "command")
    command.send_keys('getStatus {"verbose": true}', Keys.ENTER)
    wait_text(browser, ".terminal-log li.out", '{"echo":"getStatus","params":{"verbose":true}}',
              "the device's answer in the terminal")
    assert device.calls("getStatus") == [{"verbose": True}]
    # Params that are not JSON are refused in the page, with the reason.
    command.send_keys("setValue {oops", Keys.ENTER)
    wait_text(browser, ".terminal-log li.err", "params are not valid JSON", "the parse error")
    # The stored widgets came up and read their state.
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-widget=led] .led-text").text == "on",
         "the LED polled getAlarm")
    knob = browser.find_element(By.CSS_SELECTOR, "[data-widget=knob] .knob")
    wait(browser, lambda b: knob.get_attribute("aria-valuenow") == "21.5", "the knob read getTemperature")
    assert console_errors(browser) == []
    # A page opened while the device is connected reads it as online, before any live event.
    open_page(browser, server, "#/devices")
    browser.refresh()
    wait_text(browser, "table.devices", "Lab Bench", "the device list")
    row = browser.find_element(By.XPATH, "//tr[th/a[text()='Lab Bench']]")
    wait(browser, lambda b: row.find_element(By.CSS_SELECTOR, ".presence").text == "online",
         "the list's presence read from the device infos")
    open_page(browser, server, f"#/device/{device_id}")
    browser.refresh()
    wait_text(browser, "h1 .presence", "online", "the device page's presence read from the device info")


def test_a_switch_widget_added_in_the_page_sets_the_device(browser: Any, server: Server, lab: Any) -> None:
    device_id, device = lab
    browser.find_element(By.CSS_SELECTOR, "details.editor summary").click()
    Select(browser.find_element(By.NAME, "widgetType")).select_by_value("switch")
    browser.find_element(By.NAME, "widgetLabel").send_keys("Lamp")
    browser.find_element(By.CSS_SELECTOR, ".widget-editor button[type=submit]").click()
    switch = wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, ".widget[data-label=Lamp] button.switch"),
                  "the new switch")
    wait_text(browser, ".widget[data-label=Lamp] .status-line", "State read: off", "the switch read getValue")
    switch.click()
    wait_for(lambda: device.calls("setValue") == [{"value": True}], WAIT, "the device got setValue true")
    wait(browser, lambda b: switch.get_attribute("aria-checked") == "true", "the switch shows on")
    # Kept server-side, in the device's additionalInfo.
    stored = server.call("GET", f"/api/device/{device_id}")["additionalInfo"]["nanoiotWidgets"]
    assert {"type": "switch", "label": "Lamp", "getMethod": "getValue"} in stored
    assert [w["label"] for w in stored] == ["Dimmer", "Thermostat", "Alarm", "Reboot", "Lamp"]
    # The button widget shows the device's answer.
    browser.find_element(By.CSS_SELECTOR, ".widget[data-label=Reboot] button.action").click()
    wait_text(browser, ".widget[data-label=Reboot] .status-line", '"echo":"reboot"', "the button's answer")
    # A persistent command to an online device, for the table in the screenshot.
    browser.find_element(By.NAME, "persistent").click()
    browser.find_element(By.NAME, "command").send_keys('setValue {"value": 42}', Keys.ENTER)
    wait_text(browser, "table.rpcs [data-col=status]", "SUCCESSFUL", "the persistent command done")
    browser.set_window_size(1280, 1400)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(artifacts_dir() / "device-page.png"))
    browser.set_window_size(1280, 1000)
    assert console_errors(browser) == []


def test_a_persistent_rpc_for_an_offline_device_goes_from_queued_to_successful(browser: Any, server: Server) -> None:
    token = f"NIGHT-{uuid4().hex}"
    device_id = server.create_device("Night Sensor", token)
    open_page(browser, server, f"#/device/{device_id}")
    wait_text(browser, "h1", "Night Sensor", "the device page")
    command = browser.find_element(By.NAME, "command")
    # A lightweight command to an offline device fails, and the page says why (after its timeout: 1 s here).
    timeout = browser.find_element(By.NAME, "timeout")
    timeout.clear()
    timeout.send_keys("1000")
    command.send_keys("getValue", Keys.ENTER)
    wait_text(browser, ".terminal-log li.err", "504: DEVICE_OFFLINE", "the offline failure")
    timeout.clear()
    timeout.send_keys("60000")
    browser.find_element(By.NAME, "persistent").click()
    command.send_keys('setValue {"value": 7}', Keys.ENTER)
    wait_text(browser, ".terminal-log li.out", "queued, rpcId", "the persistent command's id")
    rpc_id = browser.find_element(By.CSS_SELECTOR, ".terminal-log li.out").text.split("rpcId ")[1].split(" ")[0]
    status = f"tr[data-rpc='{rpc_id}'] [data-col=status]"
    wait_text(browser, status, "QUEUED", "the queued row")
    row_text = text_of(browser, f"tr[data-rpc='{rpc_id}']")
    assert 'setValue {"value":7}' in row_text and "USER" in row_text
    device = Device(server.mqtt_port, token, answer({})).start()
    try:
        wait_text(browser, status, "SUCCESSFUL", "the row updated live once the device connected and answered")
        wait_text(browser, f"tr[data-rpc='{rpc_id}'] [data-col=response]", '{"value":7}', "the device's answer")
        assert device.calls("setValue") == [{"value": 7}]
        # The filter asks the server for one status.
        Select(browser.find_element(By.NAME, "rpcStatus")).select_by_value("QUEUED")
        wait_text(browser, ".card .status-line", "0 persistent RPCs QUEUED", "the filtered table")
    finally:
        device.stop()
    assert console_errors(browser) == []


def test_a_queued_persistent_rpc_is_deleted_from_its_row(browser: Any, server: Server) -> None:
    device_id = server.create_device("Spare Sensor", f"SPARE-{uuid4().hex}")
    rpc_id = server.call("POST", f"/api/rpc/oneway/{device_id}",
                         {"method": "reboot", "params": {}, "persistent": True, "timeout": 600000})["rpcId"]
    open_page(browser, server, f"#/device/{device_id}")
    wait_text(browser, f"tr[data-rpc='{rpc_id}'] [data-col=status]", "QUEUED", "the queued row")
    assert "(one-way)" in text_of(browser, f"tr[data-rpc='{rpc_id}']")
    browser.find_element(By.CSS_SELECTOR, f"tr[data-rpc='{rpc_id}'] button").click()
    wait(browser, lambda b: not b.find_elements(By.CSS_SELECTOR, f"tr[data-rpc='{rpc_id}']"), "the row gone")
    wait_text(browser, ".card .status-line", "Deleted RPC", "the deletion said")
    assert server.call("GET", f"/api/rpc/persistent/device/{device_id}?pageSize=10&page=0")["totalElements"] == 0
    assert console_errors(browser) == []


def test_a_bulk_command_to_twenty_devices_counts_up_to_twenty(browser: Any, server: Server) -> None:
    fleet_type = f"fleet-{uuid4().hex[:8]}"
    devices = []
    try:
        for n in range(20):
            token = f"FLEET-{n}-{uuid4().hex}"
            server.create_device(f"Fleet {n:02d}", token, fleet_type)
            devices.append(Device(server.mqtt_port, token, answer({})).start())
        wait_for(lambda: all(d.subscribed.is_set() for d in devices), WAIT, "20 devices subscribed")
        open_page(browser, server, "#/fleet")
        type_input = wait(browser, lambda b: b.find_element(By.NAME, "deviceType"), "the fleet form")
        type_input.send_keys(fleet_type)
        wait_text(browser, ".target-panel .hint", f"20 devices of type {fleet_type}", "the type's device count")
        browser.find_element(By.NAME, "method").send_keys("setValue")
        browser.find_element(By.NAME, "params").send_keys('{"value": 1}', Keys.ENTER)
        wait_text(browser, "form .status-line", "20 commands", "the accepted batch")
        wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "dd[data-status=SUCCESSFUL]").text == "20",
             "20 SUCCESSFUL")
        wait_text(browser, ".batch .status-line", "Done: 20 successful of 20", "the finished batch")
        assert all(d.calls("setValue") == [{"value": 1}] for d in devices)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(artifacts_dir() / "fleet-view.png"))
        # Picked by hand: the ten devices a search finds, all selected with one button.
        browser.find_element(By.ID, "target-selection").click()
        browser.find_element(By.NAME, "pickSearch").send_keys("Fleet 0")
        wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".pick-list input")) == 10, "ten devices listed")
        browser.find_element(By.XPATH, "//button[text()='Select all on this page']").click()
        wait_text(browser, ".target-panel .hint", "10 devices selected", "the selection")
        method = browser.find_element(By.NAME, "method")
        method.clear()
        method.send_keys("getValue", Keys.ENTER)
        wait_text(browser, ".batch .status-line", "Done: 10 successful of 10", "the second batch")
        assert sum(len(d.calls("getValue")) for d in devices) == 10
    finally:
        for d in devices:
            d.stop()
    assert console_errors(browser) == []
