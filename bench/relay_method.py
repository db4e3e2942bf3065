"""A server method for ``bench/throughput.py``'s ``d2d`` channel: a device's call commands other devices.

``--rpc-methods benchRelay=bench.relay_method:relay`` (with the repository on PYTHONPATH). Each call sends
``NANOIOT_BENCH_RELAY_FANOUT`` (default 10) one-way commands with ``context.send_rpc`` to the next devices of the
id list in the file ``NANOIOT_BENCH_RELAY_IDS`` (one device id per line), rotating, and answers at once with how
many it sent (not waiting for the devices).
"""

from __future__ import annotations

import os
from typing import Any

_state: dict[str, Any] = {}


def _ids() -> list[str]:
    ids = _state.get("ids")
    if ids is None:
        with open(os.environ["NANOIOT_BENCH_RELAY_IDS"]) as handle:
            ids = _state["ids"] = [line.strip() for line in handle if line.strip()]
        _state["next"] = 0
        _state["fanout"] = int(os.environ.get("NANOIOT_BENCH_RELAY_FANOUT", "10"))
        _state["failed"] = 0
    return ids


def _failed(failure: Any) -> None:
    _state["failed"] += 1


def relay(context: Any, params: Any) -> dict[str, int]:
    ids = _ids()
    n, i = len(ids), _state["next"]
    fanout = _state["fanout"]
    for _ in range(fanout):
        context.send_rpc(ids[i], "setLed", {"on": True}, oneway=True).addErrback(_failed)
        i = i + 1 if i + 1 < n else 0
    _state["next"] = i
    return {"sent": fanout}
