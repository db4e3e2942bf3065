"""ThingsBoard's device infos: a device's ``active`` follows its sessions (what the dashboard shows when a page opens,
before any live event), with its customer's title."""

from __future__ import annotations

import pytest_twisted

from tests.fixtures.processes import wait_until
from tests.fixtures.server import PahoDevice, server  # noqa: F401 - the fixture


@pytest_twisted.ensureDeferred
async def test_active_follows_the_devices_session_in_every_device_info_view(server) -> None:
    device_id, token = await server.demo_device()

    async def active() -> dict[str, bool]:
        _, page = await server.call("GET", "/api/tenant/deviceInfos?pageSize=10&page=0")
        return {info["name"]: info["active"] for info in page["data"]}

    assert (await active())["Demo Device"] is False
    device = PahoDevice(server.mqtt_port, token)
    try:
        await device.connect()
        await wait_until(lambda: _is_active(server, device_id), 10, "the device info says active")
        status, info = await server.call("GET", f"/api/device/info/{device_id}")
        assert status == 200 and info["active"] is True and info["customerTitle"] is None
        assert (await active()) == {"Demo Device": True, "Customer Device": False}
    finally:
        device.stop()
    await wait_until(lambda: _is_inactive(server, device_id), 10, "the device info says inactive after disconnect")
    customer_device_id, _ = await server.demo_device("Customer Device")
    _, info = await server.call("GET", f"/api/device/info/{customer_device_id}", who="customer")
    assert info["active"] is False and info["customerTitle"] == "Customer A"


async def _is_active(server, device_id: str) -> bool:  # type: ignore[no-untyped-def]
    return (await server.call("GET", f"/api/device/info/{device_id}"))[1]["active"] is True


async def _is_inactive(server, device_id: str) -> bool:  # type: ignore[no-untyped-def]
    return (await server.call("GET", f"/api/device/info/{device_id}"))[1]["active"] is False
