"""Shared fixtures of the rule-engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nanoiot.rules.scripts import InlineScriptRunner
from tests.unit.rules.fakes import FakeContext


@pytest.fixture(scope="module")
def inline_scripts() -> Iterator[InlineScriptRunner]:
    """Scripts run on the test thread (one V8 isolate per test module)."""
    runner = InlineScriptRunner(timeout_ms=1000)
    yield runner
    runner.stop()


@pytest.fixture
def ctx(inline_scripts: InlineScriptRunner) -> FakeContext:
    return FakeContext(scripts=inline_scripts)
