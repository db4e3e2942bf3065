"""Demo accounts and devices for a first run, and the start-up banner that tells a newcomer what to paste."""

from __future__ import annotations

from dataclasses import dataclass

from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.records import NULL_UUID, Authority, Device
from nanoiot.persistence.repository import Repository
from nanoiot.passwords import hash_password

DEMO_USERS = (
    ("sysadmin@nanoiot.io", "sysadmin", Authority.SYS_ADMIN),
    ("tenant@nanoiot.io", "tenant", Authority.TENANT_ADMIN),
    ("customer@nanoiot.io", "customer", Authority.CUSTOMER_USER),
)
DEMO_DEVICE = ("Demo Device", "DEMO_DEVICE_TOKEN")
CUSTOMER_DEVICE = ("Customer Device", "CUSTOMER_DEVICE_TOKEN")


@dataclass(frozen=True)
class DemoData:
    devices: tuple[tuple[Device, str], ...]


async def seed_demo(repository: Repository, catalog: DeviceCatalog) -> DemoData | None:
    """Create the demo data on an empty database; on a later start, find it again (None if it was removed)."""
    if await repository.count_users() == 0:
        tenant = await repository.create_tenant("Demo Tenant")
        customer = await repository.create_customer(tenant.id, "Customer A")
        owners = {
            Authority.SYS_ADMIN: (NULL_UUID, NULL_UUID),
            Authority.TENANT_ADMIN: (tenant.id, NULL_UUID),
            Authority.CUSTOMER_USER: (tenant.id, customer.id),
        }
        for email, password, authority in DEMO_USERS:
            tenant_id, customer_id = owners[authority]
            await repository.create_user(email, await hash_password(password), authority, tenant_id, customer_id)
        await catalog.create_device(tenant.id, DEMO_DEVICE[0], "default", access_token=DEMO_DEVICE[1])
        await catalog.create_device(tenant.id, CUSTOMER_DEVICE[0], "default", customer_id=customer.id,
                                    access_token=CUSTOMER_DEVICE[1])
    admin = await repository.get_user_by_email("tenant@nanoiot.io")
    if admin is None:
        return None
    found = []
    for name, _ in (DEMO_DEVICE, CUSTOMER_DEVICE):
        device = await repository.get_tenant_device_by_name(admin.tenant_id, name)
        if device is not None:
            credentials = await repository.get_credentials(device.id)
            found.append((device, credentials.credentials_id if credentials else "?"))
    return DemoData(tuple(found))


def banner(host: str, http_port: int, mqtt_port: int, coap_port: int, database: str, demo: DemoData | None,
           version: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    lines = [
        f"NanoIoT {version} is ready",
        f"  REST API and HTTP devices  http://{host}:{http_port}",
        f"  MQTT devices               tcp://{host}:{mqtt_port}",
        f"  CoAP devices               udp://{host}:{coap_port}",
        f"  database                   {database}",
    ]
    if demo is None:
        return "\n".join(lines)
    lines.append("Demo logins (email / password):")
    for email, password, authority in DEMO_USERS:
        lines.append(f"  {email} / {password}  ({authority.value})")
    lines.append("Demo devices:")
    for device, token in demo.devices:
        lines.append(f"  {device.name!r}  id {device.id}  access token {token}")
    if demo.devices:
        device, token = demo.devices[0]
        url = f"http://{shown}:{http_port}"
        lines += [
            "Try it: in one terminal, be the device (answer with mosquitto_pub as shown below):",
            f"  mosquitto_sub -h {shown} -p {mqtt_port} -u {token} -t 'v1/devices/me/rpc/request/+' -v",
            "in another, log in and send a command:",
            f"  JWT=$(curl -s -X POST {url}/api/auth/login -H 'Content-Type: application/json' "
            "-d '{\"username\":\"tenant@nanoiot.io\",\"password\":\"tenant\"}' "
            "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])')",
            f"  curl -i -X POST {url}/api/rpc/oneway/{device.id} -H \"X-Authorization: Bearer $JWT\" "
            "-H 'Content-Type: application/json' -d '{\"method\":\"setGpio\",\"params\":{\"pin\":7,\"value\":1}}'",
            "a two-way call waits for the device's answer (request id N from the topic mosquitto_sub printed):",
            f"  curl -X POST {url}/api/rpc/twoway/{device.id} -H \"X-Authorization: Bearer $JWT\" "
            "-H 'Content-Type: application/json' -d '{\"method\":\"getTemperature\",\"params\":{}}' &",
            f"  mosquitto_pub -h {shown} -p {mqtt_port} -u {token} -t v1/devices/me/rpc/response/N -m '{{\"t\":21.5}}'",
        ]
    return "\n".join(lines)
