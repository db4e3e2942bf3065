"""ThingsBoard's own Python clients against a running NanoIoT, unchanged.

Run with the interpreter of the separate virtualenv that holds ThingsBoard's clients (``.venv-tb``; never NanoIoT's own
``.venv``: ``tb-mqtt-client`` ships a ``paho`` package that clashes with paho-mqtt), for instance:

    .venv-tb/bin/python tests/tb_clients/scenario.py --http-url http://127.0.0.1:8080 \
        --mqtt-host 127.0.0.1 --mqtt-port 1883 --username tenant@nanoiot.io --password tenant \
        [--echo-method echoTwice --forward-method forwardCommand]

(the two user methods must be registered on that server with ``--rpc-methods``; the integration test uses the ones in
``tests/integration/test_thingsboard_clients.py``).

The scenario, with ThingsBoard's clients only:

1. ``tb-rest-client`` (``RestClient``) logs in, reads the current user (``GET /api/auth/user``), creates a device
   (``save_device``), reads its access token (``get_device_credentials_by_device_id``) and reads the device back;
2. ``tb-mqtt-client`` (``TBDeviceMqttClient``, MQTT 5) connects with that token and registers a server-side RPC
   handler; on connect it asks the server for ``getSessionLimits`` by itself, and that answer is captured;
3. two-way and one-way RPC calls sent through the REST client (v2 ``/api/rpc/...`` and v1 ``/api/plugins/rpc/...``)
   are answered by the SDK's handler;
4. the SDK makes client-side RPC calls (``send_rpc_call``): ``getCurrentTime``, ``getSessionLimits``, an unknown
   method, then the user-registered ``--echo-method`` (answers its params doubled) and ``--forward-method``: a second
   device (``tb-sdk-valve-…``, its own ``TBDeviceMqttClient`` and handler) is commanded by that server method through
   ``context.send_rpc`` and its answer comes back to the first device;
5. the SDK's gateway client (``TBGatewayMqttClient``) connects as a device made with ``additionalInfo``
   ``{"gateway": true}``, announces ``--sub-device`` (``gw_connect_device``), which the REST client then finds
   (``get_tenant_device``); two-way and one-way calls to the sub-device sent with the REST client reach the handler
   set with ``gw_set_server_side_rpc_request_handler``, which answers with ``gw_send_rpc_reply``.

Two narrower runs: ``--lookup-device NAME`` (only ``get_tenant_device``) and ``--rule-chain-file PATH`` (only the
REST client's rule chain API: import a chain export file, make it the root chain, read it back; see
``rule_chain_round``).

It prints exactly one JSON line on stdout (``"ok": true`` with the results and timings, or ``"ok": false`` with the
failed stage and the reason) and exits 0 on success, 1 on a failed check, 2 when the environment is wrong, 3 when the
overall deadline passed. Logs go to stderr. Every wait is bounded; the whole run is bounded by ``--deadline``.

This file is not a test module (pytest does not collect ``scenario.py``) and must not be imported by pytest.
"""

from __future__ import annotations

import argparse
import copy
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


class SdkProbe:
    """Watches one of ThingsBoard's MQTT clients (``TBDeviceMqttClient`` or ``TBGatewayMqttClient``) without changing
    what it does: the CONNACK paho hands it, the topics it subscribes to and what NanoIoT grants, and its own
    ``getSessionLimits`` exchange (the answer is recorded, then handed to the SDK's own callback as usual)."""

    def __init__(self, client: Any, label: str) -> None:
        self.client = client
        self.label = label
        self.connack: dict[str, Any] = {}
        self.connected = threading.Event()
        self.session_limits: dict[str, Any] = {}
        self.session_limits_event = threading.Event()
        self.subscriptions: dict[int, dict[str, Any]] = {}
        self.connect_started = 0.0

        # The service loop calls service_configuration_callback with the getSessionLimits answer (the device client's
        # on_service_configuration, or the gateway client's own, which pops gatewayRateLimits/rateLimits out of the
        # dict it gets: record a copy). The CONNACK properties go through on_service_configuration.
        sdk_service_configuration_callback = client.service_configuration_callback
        sdk_on_service_configuration = client.on_service_configuration

        def on_session_limits(request_id: Any, response: Any, *extra: Any, **kwargs: Any) -> Any:
            self.session_limits.update(answer=copy.deepcopy(response), request_id=request_id,
                                       ms_after_connect=ms_since(self.connect_started))
            try:
                return sdk_service_configuration_callback(request_id, response, *extra, **kwargs)
            finally:
                self.session_limits_event.set()

        def on_connack_configuration(request_id: Any, response: Any, *extra: Any, **kwargs: Any) -> Any:
            self.connack["configuration_from_properties"] = copy.deepcopy(response)
            return sdk_on_service_configuration(request_id, response, *extra, **kwargs)

        client.service_configuration_callback = on_session_limits
        client.on_service_configuration = on_connack_configuration

        # Record the CONNACK as paho hands it to the SDK, then let the SDK handle it as usual. (The SDK's own
        # connect(callback=...) is not used for this: it assigns the callback only after starting paho's loop, so
        # against a fast local server the CONNACK can be handled before the callback exists.)
        sdk_on_connect = client._client.on_connect

        def on_connect(mqtt_client: Any, userdata: Any, flags: Any, result_code: Any, properties: Any,
                       *extra: Any) -> None:
            self.connack["reason_code"] = int(getattr(result_code, "value", result_code))
            self.connack["reason"] = result_code.getName() if hasattr(result_code, "getName") else str(result_code)
            self.connack["properties"] = properties.json() if properties is not None and hasattr(properties, "json") \
                else None
            try:
                sdk_on_connect(mqtt_client, userdata, flags, result_code, properties, *extra)
            finally:
                self.connected.set()

        client._client.on_connect = on_connect

        # Record which topics the SDK subscribes to and what NanoIoT grants (the device SDK never looks at SUBACKs;
        # the gateway SDK's own on_subscribe bookkeeping still runs).
        paho_subscribe = client._client.subscribe
        sdk_on_subscribe = client._client.on_subscribe

        def subscribe(topic: Any, qos: int = 0, *more: Any, **kwargs: Any) -> Any:
            outcome = paho_subscribe(topic, qos, *more, **kwargs)
            self.subscriptions.setdefault(outcome[1], {}).update(topic=topic, qos=qos)
            return outcome

        def on_subscribe(mqtt_client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any,
                         *extra: Any) -> None:
            self.subscriptions.setdefault(mid, {})["granted"] = [int(getattr(code, "value", code))
                                                                 for code in reason_codes]
            if callable(sdk_on_subscribe):
                sdk_on_subscribe(mqtt_client, userdata, mid, reason_codes, properties, *extra)

        client._client.subscribe = subscribe
        client._client.on_subscribe = on_subscribe

    def sorted_subscriptions(self) -> list[dict[str, Any]]:
        return sorted(self.subscriptions.values(), key=lambda entry: str(entry.get("topic")))

    def applied_limits(self) -> dict[str, Any]:
        return {"max_payload_size": self.client.max_payload_size,
                "max_inflight_messages": self.client._client._max_inflight_messages,
                "max_queued_messages": self.client._client._max_queued_messages}

    def stop(self, results: dict[str, Any]) -> None:
        """The SDK's documented shutdown; bounded by the deadline watchdog like everything else."""
        try:
            self.client.stop()
            self.client.disconnect()
        except Exception as exc:  # noqa: BLE001
            results.setdefault("shutdown_errors", []).append(f"{self.label}: {type(exc).__name__}: {exc}")


def connect_and_configure(probe: SdkProbe, connect_stage: str, limits_stage: str, rpc_topics: tuple[str, ...],
                          progress: dict[str, str], timings: dict[str, Any], stage_error: Any) -> None:
    """Connect the probed SDK client, wait (bounded) for its CONNACK and for the answer to its own getSessionLimits
    request, and check that the server granted its RPC subscriptions (topics starting with one of ``rpc_topics``)."""
    client = probe.client
    stage = progress["stage"] = connect_stage
    probe.connect_started = time.monotonic()
    try:
        client.connect(timeout=10, keepalive=30)
    except Exception as exc:  # noqa: BLE001
        raise stage_error(stage, exc) from None
    wait_for(probe.connected, 10, stage, "CONNACK")
    if probe.connack.get("reason_code") != 0 or not client.is_connected():
        raise ScenarioFailure(stage, f"CONNACK refused the token: {probe.connack}")
    timings[connect_stage] = ms_since(probe.connect_started)

    stage = progress["stage"] = limits_stage
    # The SDK sends it from its service loop right after connecting (with {"timeout": 5000}); it never times it out
    # itself, so a server that does not answer leaves the SDK on its defaults silently: bound it here. The SDK
    # subscribed before asking, so once this is answered every SUBACK has arrived too.
    wait_for(probe.session_limits_event, 10, stage, f"answer to the {probe.label}'s getSessionLimits request")
    timings[limits_stage] = probe.session_limits["ms_after_connect"]
    answer = probe.session_limits["answer"]
    if not isinstance(answer, dict) or "error" in answer:
        raise ScenarioFailure(stage, f"getSessionLimits answered {answer!r}")
    if "rateLimits" not in answer or "maxPayloadSize" not in answer:
        raise ScenarioFailure(stage, f"getSessionLimits answer lacks rateLimits/maxPayloadSize: {answer!r}")
    if not client.rate_limits_received:
        raise ScenarioFailure(stage, f"the {probe.label} did not apply the getSessionLimits answer "
                                     "(rate_limits_received is still False)")
    subscriptions = probe.sorted_subscriptions()
    wanted = [entry for entry in subscriptions if str(entry.get("topic", "")).startswith(rpc_topics)]
    refused = [entry for entry in wanted if any(code >= 0x80 for code in entry.get("granted", [0x80]))]
    if refused:
        raise ScenarioFailure(stage, f"NanoIoT refused or never acknowledged the {probe.label}'s RPC subscriptions: "
                                     f"{refused}")
    missing = [topic for topic in rpc_topics if not any(str(e.get("topic", "")).startswith(topic) for e in wanted)]
    if missing:
        raise ScenarioFailure(stage, f"the {probe.label} never subscribed to {missing}: {subscriptions}")


def run(args: argparse.Namespace, results: dict[str, Any], capture: LogCapture) -> None:
    progress = {"stage": "environment"}
    try:
        scenario(args, results, capture, progress)
    except ScenarioFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - a client raising something unforeseen still names its stage
        raise ScenarioFailure(progress["stage"], f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None


#: What ``--echo-method`` is called with, and what a server method that returns its params doubled (numbers times
#: two, strings twice, lists and objects element by element) answers.
ECHO_PARAMS = {"n": 21, "x": 1.25, "word": "ab", "list": [1, [2, "c"]], "nested": {"k": -3}, "flag": True,
               "none": None}
ECHO_EXPECTED = {"n": 42, "x": 2.5, "word": "abab", "list": [2, [4, "cc"]], "nested": {"k": -6}, "flag": True,
                 "none": None}
DEVICE_RPC_TOPICS = ("v1/devices/me/rpc/request/", "v1/devices/me/rpc/response/")
GATEWAY_RPC_TOPICS = DEVICE_RPC_TOPICS + ("v1/gateway/rpc",)


def scenario(args: argparse.Namespace, results: dict[str, Any], capture: LogCapture, progress: dict[str, str]) -> None:
    stage = progress["stage"]
    results["versions"] = check_environment()
    results["python"] = sys.version.split()[0]

    # Imported only now, after the environment check (the SDK's import-time installs).
    from tb_rest_client.rest import ApiException
    from tb_rest_client.rest_client import RestClient
    from tb_rest_client.models.device import Device
    from tb_device_mqtt import TBDeviceMqttClient
    from tb_gateway_mqtt import TBGatewayMqttClient

    timings: dict[str, Any] = {}
    results["timings_ms"] = timings
    probes: list[SdkProbe] = []

    def stage_error(name: str, exc: BaseException) -> ScenarioFailure:
        if isinstance(exc, ScenarioFailure):
            return exc
        if isinstance(exc, ApiException):
            body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
            return ScenarioFailure(name, f"HTTP {exc.status} {exc.reason}: {body}")
        return ScenarioFailure(name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def create_device(stage: str, name: str, device_type: str, credentials_stage: str | None = None,
                      **fields: Any) -> tuple[Any, str]:
        """save_device, then its access token (get_device_credentials_by_device_id)."""
        progress["stage"] = stage
        start = time.monotonic()
        try:
            made = rest.save_device(Device(name=name, type=device_type, **fields))
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        timings[stage] = ms_since(start)
        if made is None or made.id is None or not getattr(made.id, "id", None):
            raise ScenarioFailure(stage, f"save_device returned no device id: {made!r}")
        if made.name != name:
            raise ScenarioFailure(stage, f"save_device returned name {made.name!r}, sent {name!r}")
        stage = progress["stage"] = credentials_stage or f"{stage}_credentials"
        try:
            made_credentials = rest.get_device_credentials_by_device_id(made.id)
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        if made_credentials.credentials_type != "ACCESS_TOKEN" or not made_credentials.credentials_id:
            raise ScenarioFailure(stage, f"credentials are {made_credentials.credentials_type!r} "
                                         f"{made_credentials.credentials_id!r}, expected an ACCESS_TOKEN")
        return made, made_credentials.credentials_id

    def rest_rpc_round(prefix: str, target: Any, calls: list[tuple[str, str, dict[str, Any]]],
                       handled: list[dict[str, Any]], handled_lock: threading.Lock, expected_request: Any,
                       into: dict[str, Any]) -> None:
        """Send each call with the REST client's RPC API; the SDK handler must have seen it (the REST call returns
        after the device's PUBACK or answer, which paho sends once the handler returned), a two-way call must return
        the handler's answer and a one-way call an empty body."""
        for key, method_name, body in calls:
            stage = progress["stage"] = f"{prefix}_{key}"
            with handled_lock:
                seen = len(handled)
            start = time.monotonic()
            try:
                answer = getattr(rest, method_name)(target.id, body)
            except Exception as exc:  # noqa: BLE001
                raise stage_error(stage, exc) from None
            elapsed = ms_since(start)
            with handled_lock:
                new = handled[seen:]
            if not new:
                raise ScenarioFailure(stage, f"{method_name} returned {answer!r} but the SDK's handler "
                                             "never saw the command")
            entry = new[0]
            into[key] = {"client_method": method_name, "sent": body, "answer": answer,
                         "handler_request": entry["request"], "handler_request_id": entry["request_id"],
                         "handler_answer": entry["answer"], "ms": elapsed}
            timings[stage] = elapsed
            wanted = expected_request(body)
            if entry["seen_as"] != wanted:
                raise ScenarioFailure(stage, f"the SDK handler got {entry['request']!r}, expected {wanted!r}")
            if key.startswith("twoway") and answer != entry["answer"]:
                raise ScenarioFailure(stage, f"{method_name} returned {answer!r}, the SDK handler answered "
                                             f"{entry['answer']!r}")
            if key.startswith("oneway") and answer not in (None, "", b""):
                raise ScenarioFailure(stage, f"a one-way call should return an empty body, got {answer!r}")

    def sdk_call(client: Any, stage: str, method: str, params: Any, seconds: float = 10) -> dict[str, Any]:
        """A client-side RPC with the SDK's send_rpc_call; its callback gets (request_id, response, exception)."""
        progress["stage"] = stage
        got: dict[str, Any] = {}
        answered = threading.Event()

        def on_answer(request_id: Any, response: Any, exception: Any) -> None:
            got.update(request_id=request_id, response=response, exception=exception)
            answered.set()

        start = time.monotonic()
        sent_at_ms = int(time.time() * 1000)
        client.send_rpc_call(method, params, on_answer)
        wait_for(answered, seconds, stage, f"answer to the SDK's send_rpc_call({method!r})")
        elapsed = ms_since(start)
        timings[stage] = elapsed
        if got["exception"] is not None:
            raise ScenarioFailure(stage, f"the SDK reported {got['exception']!r}")
        return {"sent": params, "answer": got["response"], "request_id": got["request_id"], "ms": elapsed,
                "sent_at_ms": sent_at_ms, "exception": got["exception"]}

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

        suffix = uuid.uuid4().hex[:12]
        name = f"tb-sdk-{suffix}"
        device, token = create_device("rest_create_device", name, "tb-sdk-thermostat", "rest_device_credentials",
                                      label="made by tb-rest-client")
        device_id = device.id.id
        results["device"] = {"id": device_id, "entity_type": getattr(device.id, "entity_type", None),
                             "name": device.name, "type": device.type}
        results["token"] = token

        stage = progress["stage"] = "rest_read_device"
        try:
            again = rest.get_device_by_id(device.id)
        except Exception as exc:  # noqa: BLE001
            raise stage_error(stage, exc) from None
        if again.id.id != device_id or again.name != name:
            raise ScenarioFailure(stage, f"get_device_by_id gave {again.id!r} {again.name!r}")

        # ------------------------------------------------------------ device SDK: connect (MQTT 5)
        stage = progress["stage"] = "sdk_connect"
        handled: list[dict[str, Any]] = []
        handled_lock = threading.Lock()

        client = TBDeviceMqttClient(args.mqtt_host, port=args.mqtt_port, username=token)
        results["sdk_mqtt_protocol"] = client._client._protocol  # 5 = MQTT 5 (the SDK has no other choice)

        def on_server_side_rpc(request_id: str, request: Any) -> None:
            """What a device written with ThingsBoard's SDK does: answer with send_rpc_reply."""
            answer = {"handledBy": "tb-mqtt-client", "method": request.get("method") if isinstance(request, dict)
                      else None, "echo": request.get("params") if isinstance(request, dict) else request}
            with handled_lock:
                handled.append({"request_id": request_id, "request": request, "seen_as": request, "answer": answer})
            client.send_rpc_reply(request_id, answer)

        client.set_server_side_rpc_request_handler(on_server_side_rpc)
        probe = SdkProbe(client, "device SDK")
        probes.append(probe)
        try:
            try:
                connect_and_configure(probe, "sdk_connect", "sdk_get_session_limits", DEVICE_RPC_TOPICS, progress,
                                      timings, stage_error)
            finally:
                results["connack"] = probe.connack
                results["sdk_subscriptions"] = probe.sorted_subscriptions()
                results["session_limits"] = probe.session_limits.get("answer")
            results["sdk_applied_limits"] = probe.applied_limits()

            # ---------------------------------------------------------- server-side RPC through the REST client
            rest_rpc: dict[str, Any] = {}
            results["rest_rpc"] = rest_rpc
            # (result key, RestClient method, body); the 4.x names: handle_*_v1 is RPC v2 (/api/rpc/...), handle_*
            # without suffix is RPC v1 (/api/plugins/rpc/...).
            rest_rpc_round("rest_rpc", device, [
                ("twoway_v2", "handle_two_way_device_rpc_request_v1",
                 {"method": "getTemperature", "params": {"unit": "C", "probe": 2}, "timeout": 10000}),
                ("twoway_v1", "handle_two_way_device_rpc_request",
                 {"method": "getValue", "params": [1, 2, 3], "timeout": 10000}),
                ("oneway_v2", "handle_one_way_device_rpc_request_v1",
                 {"method": "setGpio", "params": {"pin": 7, "value": 1}, "timeout": 10000}),
                ("oneway_v1", "handle_one_way_device_rpc_request",
                 {"method": "setGpio", "params": {"pin": 8, "value": 0}, "timeout": 10000}),
            ], handled, handled_lock, lambda body: {"method": body["method"], "params": body["params"]}, rest_rpc)

            # ---------------------------------------------------------- client-side RPC from the SDK: built-ins
            client_rpc: dict[str, Any] = {}
            results["client_rpc"] = client_rpc
            for method, params in (("getCurrentTime", {}), ("getSessionLimits", {})):
                client_rpc[method] = sdk_call(client, f"sdk_client_rpc_{method}", method, params)
            now = client_rpc["getCurrentTime"]["answer"]
            if not isinstance(now, int) or isinstance(now, bool) or abs(now - time.time() * 1000) > 60_000:
                raise ScenarioFailure("sdk_client_rpc_getCurrentTime", f"getCurrentTime answered {now!r}, expected "
                                                                       "epoch milliseconds near now")
            # An unknown method is answered at once with an error, through the same SDK callback.
            client_rpc["unknown"] = sdk_call(client, "sdk_client_rpc_unknown", "noSuchMethod", {"x": 1})
            if client_rpc["unknown"]["answer"] != {"error": "Unsupported method: noSuchMethod"}:
                raise ScenarioFailure("sdk_client_rpc_unknown", f"noSuchMethod answered "
                                                                f"{client_rpc['unknown']['answer']!r}")

            # ---------------------------------------------------------- client-side RPC: user-registered methods
            if args.echo_method or args.forward_method:
                user_methods: dict[str, Any] = {}
                results["user_methods"] = user_methods
                if args.echo_method:
                    stage = f"sdk_user_method_{args.echo_method}"
                    user_methods["echo"] = call = sdk_call(client, stage, args.echo_method, ECHO_PARAMS)
                    call["method"] = args.echo_method
                    if call["answer"] != ECHO_EXPECTED:
                        raise ScenarioFailure(stage, f"{args.echo_method} answered {call['answer']!r}, expected "
                                                     f"{ECHO_EXPECTED!r}")
                if args.forward_method:
                    user_methods["forward"] = forward_to_another_device(
                        args, client, progress, results, timings, probes, create_device, sdk_call, suffix,
                        TBDeviceMqttClient, stage_error)
        finally:
            probe.stop(results)

        # ------------------------------------------------------------ gateway RPC with the SDK's gateway client
        if args.sub_device:
            results["gateway"] = gateway_round(args, rest, ApiException, progress, timings, probes, create_device,
                                               rest_rpc_round, suffix, TBGatewayMqttClient, stage_error)

    # ---------------------------------------------------------------- what the clients complained about
    stage = progress["stage"] = "client_logs"
    warnings = capture.snapshot()
    results["client_warnings"] = warnings
    # One CONNACK quirk per client whose CONNACK carried limits (see CONNACK_QUIRK), nothing else. "disconnected by
    # client" is logged at INFO; anything else at WARNING+ (a server DISCONNECT, a timeout waiting for the service
    # configuration, a subscription or publish problem) means NanoIoT did something the SDK did not expect.
    tolerated = sum(1 for p in probes if "configuration_from_properties" in p.connack)
    unexpected = []
    for warning in warnings:
        if tolerated and warning["logger"] == SDK_LOGGER and warning["message"] == CONNACK_QUIRK:
            tolerated -= 1
            continue
        unexpected.append(warning)
    if unexpected:
        raise ScenarioFailure(stage, f"ThingsBoard's clients logged warnings/errors: {unexpected}")
    results["ok"] = True


def forward_to_another_device(args: argparse.Namespace, client: Any, progress: dict[str, str],
                              results: dict[str, Any], timings: dict[str, Any], probes: list[SdkProbe],
                              create_device: Any, sdk_call: Any, suffix: str, device_client_class: Any,
                              stage_error: Any) -> dict[str, Any]:
    """A second device of the same tenant (``tb-sdk-valve-…``, its own TBDeviceMqttClient and server-side RPC
    handler); the first device calls ``--forward-method`` with ``{"deviceId", "method", "params"}``, the server
    method commands the valve with ``context.send_rpc`` and answers with what the valve answered."""
    valve, valve_token = create_device("rest_create_valve", f"tb-sdk-valve-{suffix}", "tb-sdk-valve",
                                       label="second device, commanded by a server method")
    results["valve"] = {"id": valve.id.id, "name": valve.name, "type": valve.type, "token": valve_token}
    valve_handled: list[dict[str, Any]] = []
    valve_event = threading.Event()
    valve_client = device_client_class(args.mqtt_host, port=args.mqtt_port, username=valve_token)

    def on_valve_rpc(request_id: str, request: Any) -> None:
        answer = {"handledBy": "tb-mqtt-client (valve)", "method": request.get("method") if isinstance(request, dict)
                  else None, "echo": request.get("params") if isinstance(request, dict) else request, "opened": True}
        valve_handled.append({"request_id": request_id, "request": request, "answer": answer})
        valve_client.send_rpc_reply(request_id, answer)
        valve_event.set()

    valve_client.set_server_side_rpc_request_handler(on_valve_rpc)
    valve_probe = SdkProbe(valve_client, "valve's device SDK")
    probes.append(valve_probe)
    try:
        try:
            connect_and_configure(valve_probe, "valve_connect", "valve_get_session_limits", DEVICE_RPC_TOPICS,
                                  progress, timings, stage_error)
        finally:
            results["valve"]["connack"] = valve_probe.connack
            results["valve"]["subscriptions"] = valve_probe.sorted_subscriptions()
        stage = f"sdk_user_method_{args.forward_method}"
        params = {"deviceId": valve.id.id, "method": "setValve", "params": {"open": 40, "rampMs": 1500}}
        call = sdk_call(client, stage, args.forward_method, params, seconds=15)
        call["method"] = args.forward_method
        if not valve_handled:
            raise ScenarioFailure(stage, f"{args.forward_method} answered {call['answer']!r} but the valve's SDK "
                                         "handler never saw a command")
        entry = valve_handled[0]
        call.update(valve_request=entry["request"], valve_request_id=entry["request_id"],
                    valve_answer=entry["answer"], valve_commands=len(valve_handled))
        if entry["request"] != {"method": "setValve", "params": {"open": 40, "rampMs": 1500}}:
            raise ScenarioFailure(stage, f"the valve's handler got {entry['request']!r}")
        expected = {"forwardedTo": valve.id.id, "answer": entry["answer"]}
        if call["answer"] != expected:
            raise ScenarioFailure(stage, f"{args.forward_method} answered {call['answer']!r}, expected {expected!r}")
        return call
    finally:
        valve_probe.stop(results)


def find_tenant_device(rest: Any, api_exception: Any, name: str, lookup: dict[str, Any], stage: str,
                       stage_error: Any) -> Any:
    """A tenant's device by name with the REST client, or None while there is none.

    ``RestClient.get_tenant_device`` (tb-rest-client 4.x) asks ``GET /api/tenant/device?deviceName=``, ThingsBoard's
    current mapping; ThingsBoard also still serves the older ``GET /api/tenant/devices?deviceName=`` (hidden from its
    OpenAPI spec), which 3.x clients use. Both are tried, through the client's own ``ApiClient``, so that a server
    lacking one of them still gets the gateway part checked; ``lookup`` records what each answered.
    """
    try:
        found = rest.get_tenant_device(name)
    except api_exception as exc:
        if exc.status != 404:
            raise stage_error(stage, exc) from None
        body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
        lookup["get_tenant_device"] = {"ok": False, "path": "/api/tenant/device", "status": exc.status, "body": body}
    else:
        lookup["get_tenant_device"] = {"ok": True, "path": "/api/tenant/device"}
        lookup["found_with"] = "get_tenant_device"
        return found
    try:
        found = rest.api_client.call_api(
            "/api/tenant/devices", "GET", {}, [("deviceName", name)],
            {"Accept": "application/json"}, response_type="Device", auth_settings=["ApiKeyForm", "HttpLoginForm"],
            _return_http_data_only=True, _request_timeout=(5, 30))
    except api_exception as exc:
        if exc.status != 404:
            raise stage_error(stage, exc) from None
        lookup["tenant_devices_by_name"] = {"ok": False, "path": "/api/tenant/devices", "status": exc.status}
        return None
    lookup["tenant_devices_by_name"] = {"ok": True, "path": "/api/tenant/devices"}
    lookup["found_with"] = "GET /api/tenant/devices?deviceName="
    return found


def lookup_only(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``--lookup-device NAME``: log in with the REST client and call ``get_tenant_device(NAME)``, nothing else."""
    results["versions"] = check_environment()
    from tb_rest_client.rest import ApiException
    from tb_rest_client.rest_client import RestClient

    rest = RestClient(base_url=args.http_url)
    rest.daemon = True
    with rest:
        try:
            rest.login(username=args.username, password=args.password)
        except Exception as exc:  # noqa: BLE001
            raise ScenarioFailure("rest_login", f"{type(exc).__name__}: {exc}") from None
        try:
            device = rest.get_tenant_device(args.lookup_device)
        except ApiException as exc:
            body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
            results["get_tenant_device"] = {"ok": False, "status": exc.status, "body": body}
        else:
            results["get_tenant_device"] = {"ok": True, "id": device.id.id, "name": device.name,
                                            "type": device.type}
    results["ok"] = True
    results["timings_ms"] = {}


def rule_chain_round(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``--rule-chain-file PATH``: with the REST client only, import a ThingsBoard rule chain export file the way a
    script would (``save_rule_chain_v1`` for the chain, ``save_rule_chain_meta_data`` for its nodes and connections),
    make it the root chain (``set_root_rule_chain``), then read it back (``get_rule_chains``,
    ``get_rule_chain_meta_data``, ``get_rule_chain_by_id``); an invalid copy of the file is refused with every
    problem listed. The device side is checked by the test that runs this."""
    results["versions"] = check_environment()
    from tb_rest_client.rest import ApiException
    from tb_rest_client.rest_client import RestClient
    from tb_rest_client.models.node_connection_info import NodeConnectionInfo
    from tb_rest_client.models.rule_chain import RuleChain
    from tb_rest_client.models.rule_chain_meta_data import RuleChainMetaData
    from tb_rest_client.models.rule_node import RuleNode

    with open(args.rule_chain_file, encoding="utf-8") as f:
        export = json.load(f)
    timings: dict[str, float] = {}
    out: dict[str, Any] = {}
    results["rule_chain"] = out
    rest = RestClient(base_url=args.http_url)
    rest.daemon = True

    def metadata_of(chain_id: Any, raw: dict[str, Any]) -> Any:
        nodes = [RuleNode(type=n["type"], name=n["name"], configuration=n.get("configuration"),
                          additional_info=n.get("additionalInfo"), configuration_version=n.get("configurationVersion"),
                          singleton_mode=n.get("singletonMode", False)) for n in raw["nodes"]]
        connections = [NodeConnectionInfo(from_index=c["fromIndex"], to_index=c["toIndex"], type=c["type"])
                       for c in raw["connections"]]
        return RuleChainMetaData(rule_chain_id=chain_id, first_node_index=raw["firstNodeIndex"], nodes=nodes,
                                 connections=connections)

    with rest:
        stage = "rest_login"
        try:
            rest.login(username=args.username, password=args.password)
        except Exception as exc:  # noqa: BLE001
            raise ScenarioFailure(stage, f"{type(exc).__name__}: {exc}") from None
        try:
            stage = "rule_chains_before"
            before = rest.get_rule_chains(page_size=10, page=0)
            out["before"] = [{"name": c.name, "root": c.root, "id": c.id.id} for c in before.data]

            stage = "save_rule_chain"
            start = time.monotonic()
            fields = export["ruleChain"]
            saved = rest.save_rule_chain_v1(RuleChain(name=fields["name"], type=fields.get("type", "CORE"),
                                                      debug_mode=False, additional_info={"description": "tb client"}))
            timings[stage] = ms_since(start)
            out["saved"] = {"id": saved.id.id, "entity_type": saved.id.entity_type, "name": saved.name,
                            "root": saved.root, "version": saved.version}

            stage = "save_rule_chain_meta_data"
            start = time.monotonic()
            metadata = rest.save_rule_chain_meta_data(metadata_of(saved.id, export["metadata"]))
            timings[stage] = ms_since(start)
            out["metadata"] = {"chain": metadata.rule_chain_id.id, "first": metadata.first_node_index,
                               "nodes": [{"name": n.name, "type": n.type, "id": n.id.id if n.id else None}
                                         for n in metadata.nodes],
                               "connections": [(c.from_index, c.to_index, c.type) for c in metadata.connections]}

            stage = "invalid_meta_data"
            broken = copy.deepcopy(export["metadata"])
            broken["nodes"].append({"type": "org.example.NoSuchNode", "name": "mystery", "configuration": {}})
            broken["connections"].append({"fromIndex": 0, "toIndex": 42, "type": "Success"})
            try:
                rest.save_rule_chain_meta_data(metadata_of(saved.id, broken))
            except ApiException as exc:
                body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
                out["invalid"] = {"status": exc.status, "body": json.loads(body) if body else None}
            else:
                raise ScenarioFailure(stage, "an invalid chain was accepted")

            stage = "set_root_rule_chain"
            start = time.monotonic()
            rooted = rest.set_root_rule_chain(saved.id)
            timings[stage] = ms_since(start)
            out["rooted"] = {"id": rooted.id.id, "root": rooted.root}

            stage = "rule_chains_after"
            after = rest.get_rule_chains(page_size=10, page=0)
            out["after"] = [{"name": c.name, "root": c.root, "id": c.id.id} for c in after.data]
            again = rest.get_rule_chain_meta_data(saved.id)
            out["read_back"] = {"nodes": [n.name for n in again.nodes], "first": again.first_node_index,
                                "ids": [n.id.id for n in again.nodes]}
            chain = rest.get_rule_chain_by_id(saved.id)
            out["chain"] = {"name": chain.name, "root": chain.root, "first_rule_node_id":
                            chain.first_rule_node_id.id if chain.first_rule_node_id else None}
        except ApiException as exc:
            body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
            raise ScenarioFailure(stage, f"HTTP {exc.status}: {body}") from None
    results["ok"] = True
    results["timings_ms"] = timings


def gateway_round(args: argparse.Namespace, rest: Any, api_exception: Any, progress: dict[str, str],
                  timings: dict[str, Any], probes: list[SdkProbe], create_device: Any, rest_rpc_round: Any,
                  suffix: str, gateway_client_class: Any, stage_error: Any) -> dict[str, Any]:
    """ThingsBoard's gateway client (``TBGatewayMqttClient``) connects a sub-device; commands for it sent with the
    REST client arrive at ``gw_set_server_side_rpc_request_handler``'s handler and are answered with
    ``gw_send_rpc_reply``."""
    out: dict[str, Any] = {}
    # A gateway device as ThingsBoard's UI makes it: additionalInfo {"gateway": true}. (NanoIoT lets any MQTT device
    # act as a gateway; this is for realism.)
    gateway, gateway_token = create_device("rest_create_gateway", f"tb-sdk-gateway-{suffix}", "tb-sdk-gateway",
                                           label="made by tb-rest-client", additional_info={"gateway": True})
    out["device"] = {"id": gateway.id.id, "name": gateway.name, "type": gateway.type,
                     "additional_info": gateway.additional_info}
    out["token"] = gateway_token

    handled: list[dict[str, Any]] = []
    handled_lock = threading.Lock()
    gateway_client = gateway_client_class(args.mqtt_host, port=args.mqtt_port, username=gateway_token)
    out["mqtt_protocol"] = gateway_client._client._protocol

    def on_gateway_rpc(gateway_client: Any, content: Any) -> None:
        """What a gateway written with ThingsBoard's SDK does: answer for the sub-device with gw_send_rpc_reply
        (for every command: a gateway cannot tell a one-way command from a two-way one)."""
        data = content.get("data") if isinstance(content, dict) else None
        data = data if isinstance(data, dict) else {}
        sub_name = content.get("device") if isinstance(content, dict) else None
        answer = {"handledBy": "tb-gateway-mqtt-client", "device": sub_name, "method": data.get("method"),
                  "echo": data.get("params")}
        seen_as = {"device": sub_name, "method": data.get("method"), "params": data.get("params"),
                   "id_is_int": isinstance(data.get("id"), int) and not isinstance(data.get("id"), bool)}
        with handled_lock:
            handled.append({"request_id": data.get("id"), "request": content, "seen_as": seen_as, "answer": answer})
        gateway_client.gw_send_rpc_reply(sub_name, data.get("id"), answer)

    gateway_probe = SdkProbe(gateway_client, "gateway SDK")
    probes.append(gateway_probe)
    try:
        try:
            connect_and_configure(gateway_probe, "gateway_connect", "gateway_get_session_limits", GATEWAY_RPC_TOPICS,
                                  progress, timings, stage_error)
        finally:
            out["connack"] = gateway_probe.connack
            out["subscriptions"] = gateway_probe.sorted_subscriptions()
            out["session_limits"] = gateway_probe.session_limits.get("answer")
        out["applied_limits"] = gateway_probe.applied_limits()

        # ------------------------------------------------------------ the sub-device
        stage = progress["stage"] = "gateway_connect_device"
        start = time.monotonic()
        gateway_client.gw_set_server_side_rpc_request_handler(on_gateway_rpc)
        info = gateway_client.gw_connect_device(args.sub_device, args.sub_device_type)
        rc = info.get()  # waits (at most 1 s) for the PUBACK
        out["connect_device_rc"] = int(getattr(rc, "value", rc))
        if out["connect_device_rc"] != 0:
            raise ScenarioFailure(stage, f"gw_connect_device({args.sub_device!r}) was not acknowledged: rc {rc!r}")
        # NanoIoT finds or creates the sub-device after the PUBACK: poll the REST API, bounded. The REST client's
        # get_tenant_device first; where that answers 404 the older spelling of the same lookup, which ThingsBoard
        # still serves, through the same client (see find_tenant_device): the record says which one found it.
        lookup: dict[str, Any] = {}
        out["lookup"] = lookup
        sub = None
        give_up = time.monotonic() + 10
        while sub is None:
            sub = find_tenant_device(rest, api_exception, args.sub_device, lookup, stage, stage_error)
            if sub is None:
                if time.monotonic() > give_up:
                    raise ScenarioFailure(stage, f"{args.sub_device!r} still not found 10 s after gw_connect_device: "
                                                 f"{lookup}")
                time.sleep(0.05)
        timings[stage] = ms_since(start)
        out["sub_device"] = {"id": sub.id.id, "name": sub.name, "type": sub.type,
                             "additional_info": sub.additional_info}
        if sub.name != args.sub_device:
            raise ScenarioFailure(stage, f"get_tenant_device({args.sub_device!r}) gave {sub.name!r}")

        # ------------------------------------------------------------ commands for the sub-device, via REST
        rest_rpc: dict[str, Any] = {}
        out["rest_rpc"] = rest_rpc
        # A one-way command between the two-way ones: the gateway answers it too (late, for a finished command),
        # and the next two-way call must still get its own answer.
        rest_rpc_round("gateway_rest_rpc", sub, [
            ("twoway_v2", "handle_two_way_device_rpc_request_v1",
             {"method": "getTemperature", "params": {"zone": "kitchen"}, "timeout": 10000}),
            ("oneway_v2", "handle_one_way_device_rpc_request_v1",
             {"method": "setMode", "params": {"mode": "eco"}, "timeout": 10000}),
            ("twoway_v1", "handle_two_way_device_rpc_request",
             {"method": "getSetpoint", "params": [21.5], "timeout": 10000}),
            ("oneway_v1", "handle_one_way_device_rpc_request",
             {"method": "setMode", "params": {"mode": "away"}, "timeout": 10000}),
        ], handled, handled_lock, lambda body: {"device": args.sub_device, "method": body["method"],
                                                "params": body["params"], "id_is_int": True}, rest_rpc)
        out["handler_calls"] = len(handled)
        return out
    finally:
        gateway_probe.stop(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-url", required=True, help="NanoIoT's REST base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--mqtt-host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--username", default="tenant@nanoiot.io")
    parser.add_argument("--password", default="tenant")
    parser.add_argument("--echo-method", default="",
                        help="a server method (registered with --rpc-methods) that answers its params doubled; "
                             "the device SDK calls it (skipped when empty)")
    parser.add_argument("--forward-method", default="",
                        help="a server method (registered with --rpc-methods) that commands {deviceId} with "
                             "{method, params} and answers {forwardedTo, answer}; skipped when empty")
    parser.add_argument("--sub-device", default="Sub A",
                        help="the gateway's sub-device name (default 'Sub A'; empty skips the gateway part)")
    parser.add_argument("--sub-device-type", default="thermostat")
    parser.add_argument("--lookup-device", default="",
                        help="only log in and call the REST client's get_tenant_device(NAME); prints what it got")
    parser.add_argument("--rule-chain-file", default="",
                        help="only import this rule chain export file with the REST client and make it the root chain")
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
        if args.lookup_device:
            lookup_only(args, results)
        elif args.rule_chain_file:
            rule_chain_round(args, results)
        else:
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
