"""TLS: HTTPS (REST) and MQTT over TLS through Twisted's ssl: endpoints, with a certificate the test makes; a
command sent over HTTPS reaches a device connected over MQTTS and its answer comes back. Plain ports keep working,
and a client that does not trust the certificate is refused by the handshake."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from nanoiot.config import Config
from nanoiot.errors import ConfigError
from nanoiot.transports.tls import tls_description
from tests.fixtures.certificates import make_certificate
from tests.fixtures.database import free_port
from tests.fixtures.server import PahoDevice, make_config, start_server, with_timeout


def _https_client(cert: Path) -> treq.client.HTTPClient:
    trust = Certificate.loadPEM(cert.read_bytes())
    return treq.client.HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust)))


def test_the_endpoint_description_quotes_paths() -> None:
    assert tls_description(8883, "0.0.0.0", "/etc/nano:iot/cert.pem", backlog=10) == (
        r"ssl:port=8883:interface=0.0.0.0:backlog=10:certKey=/etc/nano\:iot/cert.pem:"
        r"privateKey=/etc/nano\:iot/cert.pem")


def test_a_tls_port_needs_a_readable_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need --tls-cert"):
        Config.from_sources({"mqtts-port": "8883"}, environ={})
    with pytest.raises(ConfigError, match="--tls-cert=.*cannot read it"):
        Config.from_sources({"https-port": "8443", "tls-cert": str(tmp_path / "missing.pem")}, environ={})


@pytest_twisted.ensureDeferred
async def test_a_command_over_https_reaches_a_device_over_mqtts_and_comes_back(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    https_port, mqtts_port = free_port(), free_port()
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'nanoiot.db'}", jwt_key_file=str(tmp_path / "k"),
                                             https_port=https_port, mqtts_port=mqtts_port, tls_cert=str(cert),
                                             tls_key=str(key)))
    device_id, token = await running.demo_device()
    device = PahoDevice(mqtts_port, token)
    device.client.tls_set(ca_certs=str(cert), cert_reqs=ssl.CERT_REQUIRED)
    https = _https_client(cert)
    try:
        await device.connect()
        await device.subscribe("v1/devices/me/rpc/request/+")
        base = f"https://127.0.0.1:{https_port}"
        login = await https.post(f"{base}/api/auth/login", json={"username": "tenant@nanoiot.io",
                                                                 "password": "tenant"})
        jwt = (await login.json())["token"]
        call = https.post(f"{base}/api/rpc/twoway/{device_id}", json={"method": "getTemp", "params": {}},
                          headers={"X-Authorization": f"Bearer {jwt}"})
        topic, payload, _ = await device.next_message()
        request_id = topic.rsplit("/", 1)[1]
        device.client.publish(f"v1/devices/me/rpc/response/{request_id}", '{"t":21.5}', qos=1)
        response = await with_timeout(call)
        assert response.code == 200 and await response.json() == {"t": 21.5}
        # The plain port serves the same API at the same time.
        assert (await running.call("GET", "/api/auth/user"))[0] == 200
    finally:
        device.stop()
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_trust_the_certificate_is_refused(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = make_certificate(tmp_path / "other")
    mqtts_port = free_port()
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'nanoiot.db'}", jwt_key_file=str(tmp_path / "k"),
                                             mqtts_port=mqtts_port, tls_cert=str(cert), tls_key=str(key)))

    def handshake(cafile: Path) -> str:
        context = ssl.create_default_context(cafile=str(cafile))
        with socket.create_connection(("127.0.0.1", mqtts_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.version() or ""

    try:
        assert (await threads.deferToThread(handshake, cert)).startswith("TLS")
        with pytest.raises(ssl.SSLCertVerificationError):
            await threads.deferToThread(handshake, other)
    finally:
        await running.service.stopService()
