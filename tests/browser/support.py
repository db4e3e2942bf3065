"""What the browser tests drive besides the browser: the real server as a ``twistd`` subprocess, its REST API
(urllib) and devices played by paho-mqtt. All blocking, and no reactor in this process: Selenium's calls block, so the
server runs in its own process and every wait is a WebDriverWait on a condition."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.support.wait import WebDriverWait

from tests.fixtures.database import free_port

HOST = "127.0.0.1"
WAIT = 20  # seconds any one condition may take
TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("NANOIOT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("NANOIOT_CHROMEDRIVER", "/usr/bin/chromedriver")


def artifacts_dir() -> Path:
    """Where screenshots go: ``$NANOIOT_ARTIFACTS``, else build/artifacts in the repository."""
    path = Path(os.environ.get("NANOIOT_ARTIFACTS") or REPO / "build" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait(browser: Any, condition: Any, what: str, seconds: float = WAIT) -> Any:
    return WebDriverWait(browser, seconds, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, f"timed out: {what}")


def text_of(browser: Any, css: str) -> str:
    """The text of every element ``css`` matches, read in one script (no element can go stale between reads)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), (e) => e.innerText).join(' ');", css)


def wait_text(browser: Any, css: str, expected: str, what: str) -> None:
    try:
        wait(browser, lambda b: expected in text_of(b, css), f"{what}: {expected!r} in {css}")
    except TimeoutException as timeout:
        raise AssertionError(f"{timeout.msg}; the page shows {text_of(browser, css)!r}") from None


def console_errors(browser: Any) -> list[str]:
    """The page's JavaScript errors; a failed request's status (an expected 504) is the API's business, not one."""
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]


def open_page(browser: Any, server: Server, hash_: str) -> None:
    browser.get(f"{server.url}/{hash_}")


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    """Polls ``condition`` (no driver needed) until it returns something truthy; fails naming ``what``."""
    return WebDriverWait(None, seconds, poll_frequency=0.05).until(lambda _: condition(), f"timed out: {what}")


class Server:
    """``twistd -n nanoiot --demo`` on free loopback ports with a fresh SQLite database."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.workdir = workdir
        self.options = options
        self.http_port = free_port()
        self.mqtt_port = free_port()
        self.url = f"http://{HOST}:{self.http_port}"
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen | None = None
        self._tokens: dict[str, str] = {}

    def start(self) -> None:
        command = [TWISTD, "-n", "--pidfile=", "nanoiot", "--demo", "--host", HOST,
                   "--http-port", str(self.http_port), "--mqtt-port", str(self.mqtt_port), "--coap-port", "0",
                   "--database", f"sqlite:///{self.workdir / 'nanoiot.db'}",
                   "--jwt-key-file", str(self.workdir / "nanoiot.key"), "--log-level", "warn", *self.options]
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, f"the server to answer on {self.url} (log: {self.log_path})")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    # --- REST ----------------------------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, who: str | None = "tenant") -> Any:
        headers = {"Content-Type": "application/json"}
        if who is not None:
            headers["X-Authorization"] = f"Bearer {self.jwt(who)}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()!r}") from None
        return json.loads(text) if text else None

    def jwt(self, who: str) -> str:
        """A fresh login per call: the token may live only seconds (tests/browser/test_session.py)."""
        if True:
            answer = self.call("POST", "/api/auth/login", {"username": f"{who}@nanoiot.io", "password": who}, None)
            self._tokens[who] = answer["token"]
        return self._tokens[who]

    def create_device(self, name: str, token: str, device_type: str = "default",
                      additional_info: Any = None) -> str:
        body: dict[str, Any] = {"name": name, "type": device_type}
        if additional_info is not None:
            body["additionalInfo"] = additional_info
        return self.call("POST", f"/api/device?accessToken={token}", body)["id"]["id"]


class Device:
    """An MQTT device (paho's own thread): subscribes to commands, records them, answers with ``answer``."""

    def __init__(self, port: int, token: str, answer: Callable[[str, Any], Any] | None = None) -> None:
        self.port = port
        self.answer = answer or (lambda method, params: {"method": method, "params": params})
        self.received: list[tuple[str, Any]] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="")
        self.client.username_pw_set(token)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            client.subscribe("v1/devices/me/rpc/request/+", qos=1)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        request = json.loads(message.payload)
        method, params = request.get("method"), request.get("params")
        with self._lock:
            self.received.append((method, params))
        request_id = message.topic.rsplit("/", 1)[1]
        client.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps(self.answer(method, params)), qos=1)

    def start(self) -> "Device":
        self.client.connect_async(HOST, self.port, keepalive=60)
        self.client.loop_start()
        return self

    def calls(self, method: str) -> list[Any]:
        with self._lock:
            return [params for name, params in self.received if name == method]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def browser_binaries_missing() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not (Path(path).exists() or shutil.which(path))]
    if missing:
        return (f"missing {', '.join(missing)}: install Debian's chromium and chromium-driver "
                "(apt-get install -y chromium chromium-driver; .ci/run does it in CI)")
    return None
