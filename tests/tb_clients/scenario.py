"""ThingsBoard's own Python clients against a running NanoIoT, unchanged.

Run with the interpreter of the separate virtualenv that holds ThingsBoard's clients (``.venv-tb``; never NanoIoT's own
``.venv``: ``tb-mqtt-client`` ships a ``paho`` package that clashes with paho-mqtt), for instance:

    .venv-tb/bin/python tests/tb_clients/scenario.py --http-url http://127.0.0.1:8080 \
        --mqtt-host 127.0.0.1 --mqtt-port 1883 --username tenant@nanoiot.io --password tenant

The scenario, with ThingsBoard's clients only:

1. ``tb-rest-client`` (``RestClient``) logs in, reads the current user (``GET /api/auth/user``), creates a device
   (``save_device``), reads it back and reads its access token (``get_device_credentials_by_device_id``);
2. ``tb-mqtt-client`` (``TBDeviceMqttClient``, MQTT 5) connects with that token and registers a server-side RPC
   handler; on connect it asks the server for ``getSessionLimits`` by itself, and that answer is captured;
3. two-way and one-way RPC calls sent through the REST client (v2 ``/api/rpc/...`` and v1 ``/api/plugins/rpc/...``)
   are answered by the SDK's handler;
4. the SDK makes a client-side RPC call, ``getCurrentTime``.

It prints exactly one JSON line on stdout (``"ok": true`` with the results and timings, or ``"ok": false`` with the
failed stage and the reason) and exits 0 on success, 1 on a failed check, 2 when the environment is wrong, 3 when the
overall deadline passed. Logs go to stderr. Every wait is bounded; the whole run is bounded by ``--deadline``.

This file is not a test module (pytest does not collect ``scenario.py``) and must not be imported by pytest.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from importlib import metadata
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_ENVIRONMENT, EXIT_DEADLINE = 0, 1, 2, 3

#: The SDK logs under this name (``tb_device_mqtt.log``).
SDK_LOGGER = "tb_connection"
#: What the SDK logs whenever a server's MQTT 5 CONNACK carries Maximum Packet Size or Receive Maximum (as MQTT 5 asks
#: a server with limits to do): ``_on_connect`` feeds them to ``on_service_configuration``, which warns because they
#: carry no ``rateLimits``. The real ``getSessionLimits`` answer arrives right after and is applied. An SDK quirk,
#: reported in the JSON, not a failure; only this message, and only from the CONNACK path, is tolerated.
CONNACK_QUIRK = "Cannot retrieve service configuration, session will use default configuration."

_print_lock = threading.Lock()
_printed = False


class ScenarioFailure(Exception):
    def __init__(self, stage: str, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message
        self.code = code


def emit(result: dict[str, Any], code: int) -> None:
    """Print the one JSON line (once, whoever comes first: the scenario or the deadline) and exit."""
    global _printed
    with _print_lock:
        if _printed:
            return
        _printed = True
        sys.stdout.write(json.dumps(result, default=str, sort_keys=True) + "\n")
        sys.stdout.flush()
        if not result.get("ok"):
            sys.stderr.write(f"scenario FAILED at stage {result.get('stage')!r}: {result.get('error')}\n")
            sys.stderr.flush()
    # SDK and paho threads are daemons, but RestClient's refresh thread is not; os._exit ends the process whatever
    # state the clients are in, so a stuck client cannot turn a reported result into a hang.
    os._exit(code)


class LogCapture(logging.Handler):
    """Keeps every WARNING and above the clients log, to tell their complaints apart from ordinary chatter."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[dict[str, Any]] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break the capture
            message = str(record.msg)
        with self._lock2:
            self.records.append({"logger": record.name, "level": record.levelname, "message": message,
                                 "t": round(time.monotonic(), 3)})

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock2:
            return list(self.records)


def check_environment() -> dict[str, str]:
    """The SDK pip-installs tb-paho-mqtt-client and mmh3 at import time when they are missing: refuse to go on
    instead (an install at run time would hide a broken .venv-tb, and may need a network we do not have)."""
    versions = {}
    for dist in ("tb-rest-client", "tb-mqtt-client", "tb-paho-mqtt-client", "mmh3"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise ScenarioFailure("environment", f"{dist} is not installed in {sys.prefix}; run "
                                  f"`{sys.executable} -m pip install tb-mqtt-client tb-rest-client mmh3`",
                                  EXIT_ENVIRONMENT) from None
    try:
        import mmh3  # noqa: F401
    except ImportError as exc:
        raise ScenarioFailure("environment", f"mmh3 does not import: {exc}", EXIT_ENVIRONMENT) from None
    major = int(versions["tb-rest-client"].split(".")[0])
    if major < 4:
        raise ScenarioFailure("environment", f"tb-rest-client {versions['tb-rest-client']} is older than 4.x",
                              EXIT_ENVIRONMENT)
    return versions


def wait_for(event: threading.Event, seconds: float, stage: str, what: str) -> None:
    if not event.wait(seconds):
        raise ScenarioFailure(stage, f"no {what} within {seconds:g} s")


def ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


def run(args: argparse.Namespace, results: dict[str, Any], capture: LogCapture) -> None:
    progress = {"stage": "environment"}
    try:
        scenario(args, results, capture, progress)
    except ScenarioFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - a client raising something unforeseen still names its stage
        raise ScenarioFailure(progress["stage"], f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None


def scenario(args: argparse.Namespace, results: dict[str, Any], capture: LogCapture, progress: dict[str, str]) -> None:
    stage = progress["stage"]
    results["versions"] = check_environment()
    results["python"] = sys.version.split()[0]

    # Imported only now, after the environment check (the SDK's import-time installs).
    from tb_rest_client.rest import ApiException
    from tb_rest_client.rest_client import RestClient
    from tb_rest_client.models.device import Device
    from tb_device_mqtt import TBDeviceMqttClient

    timings: dict[str, Any] = {}
    results["timings_ms"] = timings

    def stage_error(name: str, exc: BaseException) -> ScenarioFailure:
        if isinstance(exc, ScenarioFailure):
            return exc
        if isinstance(exc, ApiException):
            body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
            return ScenarioFailure(name, f"HTTP {exc.status} {exc.reason}: {body}")
        return ScenarioFailure(name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    # ---------------------------------------------------------------- REST client: login, device, token
    # (connect, read) timeouts: a two-way RPC waits at most its own 10 s timeout on the server, so 30 s is ample.
    # Older 4.x releases take only base_url: pass the bounds where the installed client has them.
    accepted = inspect.signature(RestClient.__init__).parameters
    options = {name: value for name, value in (("timeout", (5, 30)), ("refresh_max_attempts", 1)) if name in accepted}
    results["rest_client_options"] = options
    rest = RestClient(base_url=args.http_url, **options)
    rest.daemon = True  # its token-refresh thread must never keep the process alive
    with rest:
        stage = progress["stage"] = "rest_login"
        start = time.monotonic()
        try:
            rest.login(username=args.username, password=args.password)
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        timings["rest_login"] = ms_since(start)
        if not rest.get_token():
            raise ScenarioFailure(stage, "POST /api/auth/login gave no token (RestClient.token_info is empty)")
        if not rest.token_info.get("exp"):
            raise ScenarioFailure(stage, "the JWT has no readable 'exp' claim: RestClient would refresh it every second")

        stage = progress["stage"] = "rest_current_user"
        try:
            user = rest.get_user()
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        results["user"] = {"email": user.email, "authority": user.authority,
                           "tenant_id": getattr(user.tenant_id, "id", None)}
        if user.authority != "TENANT_ADMIN":
            raise ScenarioFailure(stage, f"logged in as {user.authority}, expected TENANT_ADMIN")

        stage = progress["stage"] = "rest_create_device"
        name = f"tb-sdk-{uuid.uuid4().hex[:12]}"
        start = time.monotonic()
        try:
            device = rest.save_device(Device(name=name, type="tb-sdk-thermostat", label="made by tb-rest-client"))
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        timings["rest_create_device"] = ms_since(start)
        if device is None or device.id is None or not getattr(device.id, "id", None):
            raise ScenarioFailure(stage, f"save_device returned no device id: {device!r}")
        device_id = device.id.id
        results["device"] = {"id": device_id, "entity_type": getattr(device.id, "entity_type", None),
                             "name": device.name, "type": device.type}
        if device.name != name:
            raise ScenarioFailure(stage, f"save_device returned name {device.name!r}, sent {name!r}")

        stage = progress["stage"] = "rest_read_device"
        try:
            again = rest.get_device_by_id(device.id)
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        if again.id.id != device_id or again.name != name:
            raise ScenarioFailure(stage, f"get_device_by_id gave {again.id!r} {again.name!r}")

        stage = progress["stage"] = "rest_device_credentials"
        try:
            credentials = rest.get_device_credentials_by_device_id(device.id)
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        if credentials.credentials_type != "ACCESS_TOKEN" or not credentials.credentials_id:
            raise ScenarioFailure(stage, f"credentials are {credentials.credentials_type!r} "
                                         f"{credentials.credentials_id!r}, expected an ACCESS_TOKEN")
        token = credentials.credentials_id
        results["token"] = token

        # ------------------------------------------------------------ device SDK: connect (MQTT 5)
        stage = progress["stage"] = "sdk_connect"
        handled: list[dict[str, Any]] = []
        handled_lock = threading.Lock()
        handled_event = threading.Event()
        connack: dict[str, Any] = {}
        connected = threading.Event()
        session_limits: dict[str, Any] = {}
        session_limits_event = threading.Event()

        client = TBDeviceMqttClient(args.mqtt_host, port=args.mqtt_port, username=token)
        results["sdk_mqtt_protocol"] = client._client._protocol  # 5 = MQTT 5 (the SDK has no other choice)

        def on_server_side_rpc(request_id: str, request: Any) -> None:
            """What a device written with ThingsBoard's SDK does: answer with send_rpc_reply."""
            answer = {"handledBy": "tb-mqtt-client", "method": request.get("method") if isinstance(request, dict)
                      else None, "echo": request.get("params") if isinstance(request, dict) else request}
            with handled_lock:
                handled.append({"request_id": request_id, "request": request, "answer": answer})
            client.send_rpc_reply(request_id, answer)
            handled_event.set()

        client.set_server_side_rpc_request_handler(on_server_side_rpc)

        # Observe the SDK's own getSessionLimits exchange without changing it: the service loop calls
        # service_configuration_callback with the answer; the CONNACK properties go through on_service_configuration.
        original_on_service_configuration = client.on_service_configuration
        connect_started = [0.0]

        def on_session_limits(request_id: Any, response: Any, *extra: Any, **kwargs: Any) -> Any:
            session_limits.update(answer=response, request_id=request_id, ms_after_connect=ms_since(connect_started[0]))
            try:
                return original_on_service_configuration(request_id, response, *extra, **kwargs)
            finally:
                session_limits_event.set()

        def on_connack_configuration(request_id: Any, response: Any, *extra: Any, **kwargs: Any) -> Any:
            connack["configuration_from_properties"] = response
            return original_on_service_configuration(request_id, response, *extra, **kwargs)

        client.service_configuration_callback = on_session_limits
        client.on_service_configuration = on_connack_configuration

        # Record the CONNACK as paho hands it to the SDK, then let the SDK handle it as usual. (The SDK's own
        # connect(callback=...) is not used for this: it assigns the callback only after starting paho's loop, so
        # against a fast local server the CONNACK can be handled before the callback exists.)
        sdk_on_connect = client._client.on_connect

        def on_connect(mqtt_client: Any, userdata: Any, flags: Any, result_code: Any, properties: Any,
                       *extra: Any) -> None:
            connack["reason_code"] = int(getattr(result_code, "value", result_code))
            connack["reason"] = result_code.getName() if hasattr(result_code, "getName") else str(result_code)
            connack["properties"] = properties.json() if properties is not None and hasattr(properties, "json") \
                else None
            try:
                sdk_on_connect(mqtt_client, userdata, flags, result_code, properties, *extra)
            finally:
                connected.set()

        client._client.on_connect = on_connect

        # Record which topics the SDK subscribes to and what NanoIoT grants (the SDK itself never looks at SUBACKs).
        subscriptions: dict[int, dict[str, Any]] = {}
        results["sdk_subscriptions"] = subscriptions
        paho_subscribe = client._client.subscribe

        def subscribe(topic: Any, qos: int = 0, *more: Any, **kwargs: Any) -> Any:
            outcome = paho_subscribe(topic, qos, *more, **kwargs)
            subscriptions[outcome[1]] = {"topic": topic, "qos": qos}
            return outcome

        def on_subscribe(mqtt_client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
            subscriptions.setdefault(mid, {})["granted"] = [int(getattr(code, "value", code)) for code in reason_codes]

        client._client.subscribe = subscribe
        client._client.on_subscribe = on_subscribe

        connect_started[0] = time.monotonic()
        try:
            client.connect(timeout=10, keepalive=30)
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        try:
            wait_for(connected, 10, stage, "CONNACK")
            results["connack"] = connack
            if connack.get("reason_code") != 0 or not client.is_connected():
                raise ScenarioFailure(stage, f"CONNACK refused the token: {connack}")
            timings["sdk_connect"] = ms_since(connect_started[0])

            # ---------------------------------------------------------- the SDK's own getSessionLimits
            stage = progress["stage"] = "sdk_get_session_limits"
            # The SDK sends it from its service loop right after connecting (with {"timeout": 5000}); it never times
            # it out itself, so a server that does not answer leaves the SDK on its defaults silently: bound it here.
            wait_for(session_limits_event, 10, stage, "answer to the SDK's getSessionLimits request")
            timings["sdk_get_session_limits"] = session_limits["ms_after_connect"]
            results["session_limits"] = session_limits["answer"]
            answer = session_limits["answer"]
            if not isinstance(answer, dict) or "error" in answer:
                raise ScenarioFailure(stage, f"getSessionLimits answered {answer!r}")
            if "rateLimits" not in answer or "maxPayloadSize" not in answer:
                raise ScenarioFailure(stage, f"getSessionLimits answer lacks rateLimits/maxPayloadSize: {answer!r}")
            if not client.rate_limits_received:
                raise ScenarioFailure(stage, "the SDK did not apply the getSessionLimits answer "
                                             "(rate_limits_received is still False)")
            results["sdk_subscriptions"] = sorted(subscriptions.values(), key=lambda entry: str(entry.get("topic")))
            refused = [entry for entry in results["sdk_subscriptions"]
                       if str(entry.get("topic", "")).startswith("v1/devices/me/rpc/")
                       and any(code >= 0x80 for code in entry.get("granted", [0x80]))]
            if refused:
                raise ScenarioFailure(stage, f"NanoIoT refused or never acknowledged the SDK's RPC subscriptions: "
                                             f"{refused}")
            results["sdk_applied_limits"] = {"max_payload_size": client.max_payload_size,
                                             "max_inflight_messages": client._client._max_inflight_messages,
                                             "max_queued_messages": client._client._max_queued_messages}

            # ---------------------------------------------------------- server-side RPC through the REST client
            rest_rpc: dict[str, Any] = {}
            results["rest_rpc"] = rest_rpc
            calls = [
                # (result key, RestClient method, body); the 4.x names: handle_*_v1 is RPC v2 (/api/rpc/...),
                # handle_* without suffix is RPC v1 (/api/plugins/rpc/...).
                ("twoway_v2", "handle_two_way_device_rpc_request_v1",
                 {"method": "getTemperature", "params": {"unit": "C", "probe": 2}, "timeout": 10000}),
                ("twoway_v1", "handle_two_way_device_rpc_request",
                 {"method": "getValue", "params": [1, 2, 3], "timeout": 10000}),
                ("oneway_v2", "handle_one_way_device_rpc_request_v1",
                 {"method": "setGpio", "params": {"pin": 7, "value": 1}, "timeout": 10000}),
                ("oneway_v1", "handle_one_way_device_rpc_request",
                 {"method": "setGpio", "params": {"pin": 8, "value": 0}, "timeout": 10000}),
            ]
            for key, method_name, body in calls:
                stage = progress["stage"] = f"rest_rpc_{key}"
                with handled_lock:
                    seen = len(handled)
                handled_event.clear()
                start = time.monotonic()
                try:
                    answer = getattr(rest, method_name)(device.id, body)
                except Exception as exc:  # noqa: BLE001
                    raise stage_error(stage, exc) from None
                elapsed = ms_since(start)
                with handled_lock:
                    new = handled[seen:]
                if not new:
                    raise ScenarioFailure(stage, f"{method_name} returned {answer!r} but the SDK's handler "
                                                 "never saw the command")
                entry = new[0]
                rest_rpc[key] = {"client_method": method_name, "sent": body, "answer": answer,
                                 "handler_request": entry["request"], "handler_request_id": entry["request_id"],
                                 "handler_answer": entry["answer"], "ms": elapsed}
                timings[f"rest_rpc_{key}"] = elapsed
                expected_request = {"method": body["method"], "params": body["params"]}
                if entry["request"] != expected_request:
                    raise ScenarioFailure(stage, f"the SDK handler got {entry['request']!r}, "
                                                 f"expected {expected_request!r}")
                if key.startswith("twoway") and answer != entry["answer"]:
                    raise ScenarioFailure(stage, f"{method_name} returned {answer!r}, the SDK handler answered "
                                                 f"{entry['answer']!r}")
                if key.startswith("oneway") and answer not in (None, "", b""):
                    raise ScenarioFailure(stage, f"a one-way call should return an empty body, got {answer!r}")

            # ---------------------------------------------------------- client-side RPC from the SDK
            client_rpc: dict[str, Any] = {}
            results["client_rpc"] = client_rpc
            for method, params in (("getCurrentTime", {}), ("getSessionLimits", {})):
                stage = progress["stage"] = f"sdk_client_rpc_{method}"
                got: dict[str, Any] = {}
                answered = threading.Event()

                def on_answer(request_id: Any, response: Any, exception: Any, got=got, answered=answered) -> None:
                    got.update(request_id=request_id, response=response, exception=exception)
                    answered.set()

                start = time.monotonic()
                sent_at_ms = int(time.time() * 1000)
                client.send_rpc_call(method, params, on_answer)
                wait_for(answered, 10, stage, f"answer to the SDK's send_rpc_call({method!r})")
                elapsed = ms_since(start)
                client_rpc[method] = {"answer": got["response"], "request_id": got["request_id"], "ms": elapsed,
                                      "sent_at_ms": sent_at_ms, "exception": got["exception"]}
                timings[f"sdk_client_rpc_{method}"] = elapsed
                if got["exception"] is not None:
                    raise ScenarioFailure(stage, f"the SDK reported {got['exception']!r}")
            now = client_rpc["getCurrentTime"]["answer"]
            if not isinstance(now, int) or isinstance(now, bool) or abs(now - time.time() * 1000) > 60_000:
                raise ScenarioFailure("sdk_client_rpc_getCurrentTime", f"getCurrentTime answered {now!r}, expected "
                                                                       "epoch milliseconds near now")
        finally:
            # the SDK's documented shutdown; bounded by the deadline watchdog like everything else
            try:
                client.stop()
                client.disconnect()
            except Exception as exc:  # noqa: BLE001
                results.setdefault("shutdown_errors", []).append(f"{type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- what the clients complained about
    stage = progress["stage"] = "client_logs"
    warnings = capture.snapshot()
    results["client_warnings"] = warnings
    unexpected = [w for w in warnings if not (w["logger"] == SDK_LOGGER and w["message"] == CONNACK_QUIRK
                                              and "configuration_from_properties" in connack)]
    # "disconnected by client" is logged at INFO; anything else at WARNING+ (a server DISCONNECT, a timeout waiting for
    # the service configuration, a subscription or publish problem) means NanoIoT did something the SDK did not expect.
    if unexpected:
        raise ScenarioFailure(stage, f"ThingsBoard's clients logged warnings/errors: {unexpected}")
    results["ok"] = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-url", required=True, help="NanoIoT's REST base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--mqtt-host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--username", default="tenant@nanoiot.io")
    parser.add_argument("--password", default="tenant")
    parser.add_argument("--deadline", type=float, default=55.0, help="seconds for the whole scenario (default 55)")
    parser.add_argument("--debug", action="store_true", help="log the clients at DEBUG on stderr")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
    capture = LogCapture()
    logging.getLogger().addHandler(capture)

    results: dict[str, Any] = {"ok": False, "started_at_ms": int(time.time() * 1000)}
    started = time.monotonic()

    def deadline() -> None:
        emit({**results, "ok": False, "stage": "deadline", "client_warnings": capture.snapshot(),
              "error": f"the scenario did not finish within {args.deadline:g} s"}, EXIT_DEADLINE)

    watchdog = threading.Timer(args.deadline, deadline)
    watchdog.daemon = True
    watchdog.start()
    try:
        run(args, results, capture)
    except ScenarioFailure as failure:
        results.update(ok=False, stage=failure.stage, error=failure.message, client_warnings=capture.snapshot())
        results["timings_ms"] = {**results.get("timings_ms", {}), "total": ms_since(started)}
        emit(results, failure.code)
    except BaseException as exc:  # noqa: BLE001 - one JSON line whatever happens
        results.update(ok=False, stage="unexpected", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                       client_warnings=capture.snapshot())
        emit(results, EXIT_FAILED)
    results["timings_ms"]["total"] = ms_since(started)
    emit(results, EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
