"""A ``ReplyTo`` is plain data that the cluster keys its routed calls by: equal and hashed by its fields."""

from nanoiot.actors.replies import Replies, ReplyTo


def test_reply_addresses_compare_and_hash_by_node_and_correlation() -> None:
    a, same, other = ReplyTo("A", 7), ReplyTo("A", 7), ReplyTo("B", 7)
    assert a == same and hash(a) == hash(same) and a != other
    assert {a: "routed"}[same] == "routed" and other not in {a: "routed"}
    assert a != ("A", 7)  # a dataclass, not a tuple


def test_an_answer_by_address_fires_the_callers_deferred_once() -> None:
    replies = Replies()
    reply_to, d = replies.expect()
    got: list[object] = []
    d.addCallback(got.append)
    replies.answer(ReplyTo(reply_to.node, reply_to.correlation), 42)  # a copy of the address, as from the wire
    replies.answer(reply_to, 43)
    assert got == [42] and len(replies) == 0
