"""CoAP's per-device rate limit in memory (fake datagram transport, task.Clock): over it 4.29 Too Many Requests with
Max-Age saying when to try again, and nothing reaches the actor."""

from __future__ import annotations

from nanoiot.limits import KeyedLimiter, parse_rates
from nanoiot.transports.coap import codec
from nanoiot.transports.coap.testing import CoapHarness


def test_a_device_over_its_coap_rate_gets_4_29_with_max_age_and_its_tokens_come_back():
    harness = CoapHarness()
    harness.server.rate_limiter = KeyedLimiter(parse_rates("2:10"), harness.clock.seconds)
    try:
        for request_id in ("1", "2", "3"):
            harness.request(codec.POST, harness.rpc_path(request_id), payload=b"{}")
        codes = [(r.code, {o.number: o.value for o in r.options}.get(codec.MAX_AGE)) for r in harness.take()]
        assert codes == [(codec.CREATED, None), (codec.CREATED, None), (codec.code(4, 29), 5)]
        assert [call[1] for _, call in harness.reports if call[0] == "answered"] == [1, 2]
        harness.clock.advance(5)
        harness.request(codec.POST, harness.rpc_path("3"), payload=b"{}")
        assert [r.code for r in harness.take()] == [codec.CREATED]
    finally:
        harness.stop()
