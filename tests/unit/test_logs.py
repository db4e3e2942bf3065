"""Log lines name their node: text lines after the timestamp, JSON records in a top-level "node"."""

from __future__ import annotations

import io
import json
import time

from twisted.logger import LogLevel, eventFromJSON, formatEvent

from nanoiot.logs import make_observer


def event(fmt: str, level: LogLevel = LogLevel.info, namespace: str = "nanoiot.test", **fields) -> dict:
    return dict(log_format=fmt, log_level=level, log_namespace=namespace, log_time=time.time(), **fields)


def emit(observer_args: dict, *events: dict) -> str:
    stream = io.StringIO()
    observer = make_observer(stream=stream, **observer_args)
    for item in events:
        observer(item)
    return stream.getvalue()


def json_records(text: str) -> list[dict]:
    return [json.loads(record) for record in text.split("\x1e") if record.strip()]


def test_a_text_line_carries_the_node_after_the_timestamp():
    line = emit({"node": "node-1"}, event("device {name} connected", name="d1"))
    timestamp, rest = line.split(" ", 1)
    assert timestamp[:4].isdigit()
    assert rest == "[node-1] [nanoiot.test#info] device d1 connected\n"


def test_a_text_line_without_a_node_is_as_before():
    line = emit({}, event("device {name} connected", name="d1"))
    assert line.split(" ", 1)[1] == "[nanoiot.test#info] device d1 connected\n"
    assert "node" not in line


def test_every_line_of_a_multi_line_event_stays_one_record_with_its_node():
    text = emit({"node": "n2"}, event("first\nsecond"))
    assert text.count("[n2]") == 1
    assert text.endswith("first\n\tsecond\n")


def test_a_json_record_has_the_node():
    [record] = json_records(emit({"fmt": "json", "node": "node-3"}, event("hello {who}", who="x")))
    assert record["node"] == "node-3"
    assert record["who"] == "x"
    assert formatEvent(record) == "hello x"


def test_a_json_record_without_a_node_has_no_node_field():
    [record] = json_records(emit({"fmt": "json"}, event("hello")))
    assert "node" not in record


def test_an_events_own_node_field_still_renders_while_node_names_the_writer():
    source = event("answer for {node} dropped", node="other-node")
    text = emit({"fmt": "json", "node": "me"}, source)
    assert json.loads(text.strip("\x1e\n"))["node"] == "me"
    assert formatEvent(eventFromJSON(text.strip("\x1e\n"))) == "answer for other-node dropped"
    assert source["node"] == "other-node"  # the event other observers see is untouched


def test_the_level_filter_still_applies_with_a_node():
    text = emit({"level": "warn", "node": "n1"}, event("chatty", LogLevel.info), event("careful", LogLevel.warn))
    assert "chatty" not in text
    assert "[n1] [nanoiot.test#warn] careful" in text


def test_the_syslog_destination_gets_our_filtered_lines_under_the_prefix(monkeypatch) -> None:
    from twisted.python import syslog as twisted_syslog

    from nanoiot.logs import LogTarget

    opened, sent = [], []
    monkeypatch.setattr(twisted_syslog.SyslogObserver, "openlog", lambda self, *args: opened.append(args))
    monkeypatch.setattr(twisted_syslog.SyslogObserver, "syslog", lambda self, *args: sent.append(args))
    target = LogTarget(syslog=True, prefix="nanoiot-edge")
    observer = make_observer("info", base=target.syslog_observer())
    observer(event("device {name} connected", name="d1"))
    observer(event("chatter", namespace="twisted.web", level=LogLevel.info))  # Twisted's noise: filtered out
    observer(event("a debug line", level=LogLevel.debug))
    assert opened and opened[0][0] == "nanoiot-edge"
    assert [args[-1] for args in sent] == ["[nanoiot.test] device d1 connected"]


def test_the_log_file_rotates_by_size_and_keeps_the_configured_number(tmp_path) -> None:
    from nanoiot.logs import LogTarget

    stream = LogTarget(logfile=str(tmp_path / "nanoiot.log"), rotate_length=200, max_rotated=2).open()
    observer = make_observer(stream=stream)
    for index in range(40):
        observer(event("line {index} of the log, long enough to rotate soon", index=index))
    stream.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["nanoiot.log", "nanoiot.log.1", "nanoiot.log.2"]
    assert "line 39 of the log" in (tmp_path / "nanoiot.log").read_text()


def test_sigusr1_rotates_the_log_file(tmp_path) -> None:
    import os
    import signal

    from twisted.internet.task import Clock

    from nanoiot.logs import LogTarget, rotate_on_signal

    class CallingReactor(Clock):
        def callFromThread(self, f, *args):  # noqa: N802 - Twisted's name
            f(*args)

    stream = LogTarget(logfile=str(tmp_path / "nanoiot.log"), rotate_length=0).open()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        rotate_on_signal(stream, CallingReactor())
        make_observer(stream=stream)(event("before the rotation"))
        os.kill(os.getpid(), signal.SIGUSR1)
        make_observer(stream=stream)(event("after the rotation"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
        stream.close()
    assert "before the rotation" in (tmp_path / "nanoiot.log.1").read_text()
    assert "after the rotation" in (tmp_path / "nanoiot.log").read_text()
