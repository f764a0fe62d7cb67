"""Background.stop: it ends tasks that lose their cancel, and never waits forever."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.lifecycle import Background


async def test_a_task_that_loses_its_cancel_once_is_cancelled_again() -> None:
    # What a 3.11 wait_for does when the cancel meets its inner future finishing: the
    # CancelledError never reaches the loop, which goes on.
    lost: list[int] = []

    async def loop_on() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not lost:
                    lost.append(1)
                    continue
                raise

    bg = Background()
    task = bg.spawn(loop_on(), "loop-on")
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await bg.stop()
    assert lost and task.cancelled()
    assert bg.tasks == []


async def test_a_task_that_never_ends_is_named_and_left(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    async def quick() -> None:
        await asyncio.sleep(3600)

    bg = Background()
    task = bg.spawn(stubborn(), "stubborn-watch")
    other = bg.spawn(quick(), "quick")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="hami.lifecycle"):
        async with asyncio.timeout(5):
            await bg.stop(timeout=1.0)
    assert other.cancelled()
    assert not task.done()
    assert "stubborn-watch" in caplog.text and "quick" not in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()


async def test_a_failed_task_does_not_fail_the_stop() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    bg = Background()
    bg.spawn(fails(), "fails")
    await asyncio.sleep(0)
    await bg.stop()
    assert bg.tasks == []
