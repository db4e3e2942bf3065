"""``nanoiot.ids.uuid4`` builds its UUIDs without ``UUID.__init__``: they must be indistinguishable from uuid.UUID's."""

import copy
import pickle
from uuid import UUID, SafeUUID

from nanoiot.ids import uuid4, uuid7


def test_uuid4_is_a_plain_version_4_uuid() -> None:
    for _ in range(600):  # crosses a refill of the 4 KiB pool
        value = uuid4()
        assert type(value) is UUID
        assert value.version == 4
        assert value.variant == "specified in RFC 4122"
        assert value.is_safe is SafeUUID.unknown


def test_uuid4_equals_hashes_and_prints_like_uuid_built_from_its_int() -> None:
    value = uuid4()
    same = UUID(int=value.int)
    assert value == same and not (value != same)
    assert hash(value) == hash(same)
    assert str(value) == str(same) and repr(value) == repr(same)
    assert value.bytes == same.bytes and value.hex == same.hex and value.urn == same.urn
    assert UUID(str(value)) == value
    assert {value: 1}[same] == 1
    assert sorted([value, UUID(int=0)]) == [UUID(int=0), value]


def test_uuid4_pickles_copies_and_refuses_changes_like_uuid() -> None:
    value = uuid4()
    assert pickle.dumps(value) == pickle.dumps(UUID(int=value.int))
    assert pickle.loads(pickle.dumps(value)) == value
    assert copy.deepcopy(value) == value
    try:
        value.int = 0  # type: ignore[misc]
    except TypeError:
        pass
    else:
        raise AssertionError("a UUID must stay immutable")


def test_uuid4_values_differ() -> None:
    assert len({uuid4() for _ in range(1000)}) == 1000


def test_uuid7_is_a_plain_version_7_uuid_carrying_its_millisecond() -> None:
    at = 1_796_140_800_123_456_789  # 2026-12-02, in ns
    for _ in range(600):  # crosses a refill of the 4 KiB pool
        value = uuid7(at)
        assert type(value) is UUID and value.version == 7 and value.variant == "specified in RFC 4122"
        assert value.int >> 80 == at // 1_000_000
        assert UUID(str(value)) == value and pickle.loads(pickle.dumps(value)) == value


def test_uuid7_sorts_by_time_a_millisecond_apart_and_stays_random_within_one() -> None:
    base = 1_796_140_800_000_000_000
    ids = [uuid7(base + ms * 1_000_000) for ms in range(200) for _ in range(5)]
    assert [u.int >> 80 for u in sorted(ids)] == sorted(u.int >> 80 for u in ids)
    assert len({u.int & ((1 << 62) - 1) for u in ids}) == len(ids)  # the random tail differs
    assert sorted(map(str, ids)) == list(map(str, sorted(ids)))  # text order (SQLite's CHAR(32)) is time order
