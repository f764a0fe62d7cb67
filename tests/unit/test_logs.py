"""The rate-limited logger: the first of a kind at once, the rest counted per interval."""

from __future__ import annotations

import logging

import pytest

from shared.logs import RateLimited


def test_once_per_interval_with_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    rl = RateLimited(logging.getLogger("hami.test.rl"), interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="hami.test.rl"):
        assert rl.warning("bad-ledger", "garbage ledger entry %s", "n1")
        for _ in range(41):
            now[0] += 1.0
            assert not rl.warning("bad-ledger", "garbage ledger entry %s", "n1")
        assert rl.suppressed("bad-ledger") == 41
        assert rl.warning("other", "another kind")  # kinds are counted apart
        now[0] += 60.0
        assert rl.warning("bad-ledger", "garbage ledger entry %s", "n1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "garbage ledger entry n1",
        "another kind",
        "garbage ledger entry n1 (41 more like this in the last 60 s)",
    ]
    assert rl.suppressed("bad-ledger") == 0


def test_kinds_remembered_are_bounded() -> None:
    rl = RateLimited(logging.getLogger("hami.test.rl2"), clock=lambda: 0.0, max_keys=10)
    for i in range(1000):
        rl.error(f"k{i}", "x")
    assert len(rl._seen) <= 10
