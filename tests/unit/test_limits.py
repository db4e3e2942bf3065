"""The shared limits (nanoiot/limits.py) on a fake clock."""

import pytest

from nanoiot.limits import Counter, KeyedLimiter, Rate, TokenBucket, parse_rates


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_parse_rates_reads_thingsboard_syntax():
    assert parse_rates("100:1,3000:60") == (Rate(100, 1.0), Rate(3000, 60.0))
    assert parse_rates("") == ()
    for bad in ("100", "0:1", "5:0", "a:1", "5:inf"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_bucket_allows_capacity_then_tells_the_wait():
    bucket = TokenBucket((Rate(3, 1.0),), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(1 / 3)
    assert bucket.take(1 / 3) == 0.0  # one token refilled


def test_every_rate_must_allow():
    bucket = TokenBucket((Rate(10, 1.0), Rate(12, 60.0)), now=0.0)
    allowed = sum(1 for second in range(5) for _ in range(10) if bucket.take(float(second)) == 0.0)
    assert allowed == 12 + 0  # the per-minute rate refills only 0.2/s: at most 12 + a fraction in 5 s


def test_a_refused_event_takes_no_token():
    bucket = TokenBucket((Rate(1, 10.0),), now=0.0)
    assert bucket.take(0.0) == 0.0
    for _ in range(100):
        assert bucket.take(0.0) > 0
    assert bucket.take(10.0) == 0.0


def test_keyed_limiter_isolates_keys_and_bounds_them():
    clock = FakeClock()
    limiter: KeyedLimiter[str] = KeyedLimiter((Rate(2, 1.0),), clock, max_keys=3)
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0  # b is not slowed by a
    for key in "cdef":
        limiter.take(key)
    assert len(limiter) == 3


def test_no_rates_means_no_limit():
    limiter: KeyedLimiter[str] = KeyedLimiter((), FakeClock())
    assert not limiter.enabled
    assert all(limiter.take("x") == 0.0 for _ in range(10_000))
    assert len(limiter) == 0


def test_counter_holds_the_maximum_and_forgets_zeroes():
    counter: Counter[str] = Counter(2)
    assert counter.acquire("ip") and counter.acquire("ip")
    assert not counter.acquire("ip")
    counter.release("ip")
    assert counter.acquire("ip")
    counter.release("ip")
    counter.release("ip")
    assert counter.count("ip") == 0 and len(counter) == 0
    assert Counter(0).acquire("any")
