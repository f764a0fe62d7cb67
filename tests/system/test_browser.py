"""The page at ``/`` in a real browser: headless Chromium against a running ``hami up``.

What a person sees: every card with who shares it and what is left, the request that
waits and why, and a slice placed after the page opened appearing on its card and in
the event feed without a reload; then a release letting the waiting request in. The
page logs no error. The screenshot goes to ``$HAMI_SCREENSHOT`` when set (that is how
docs/dashboard.png is made).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cdp import chromium, png_size
from tests.debpkg import need

_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]
WIDTH, HEIGHT = 1280, 860


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HAMI, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    env = dict(os.environ, HAMI_STATE_FILE=str(tmp_path / "state.json"), HAMI_LOG_LEVEL="WARNING")
    env.pop("HAMI_NATS_URL", None)
    proc = subprocess.Popen(
        [*HAMI, "up", "--sim-nodes", "2", "--sim-gpus", "A100-80GB:2:81920", "--metrics-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "hami is up" in line:
            break
    state = Path(env["HAMI_STATE_FILE"])
    assert state.exists(), (lines, proc.stderr.read() if proc.poll() is not None else "")
    try:
        yield env, json.loads(state.read_text())["metrics_url"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CARDS = "[...document.querySelectorAll('.card')]"


def card_of(pod: str) -> str:
    """JS: the card element a pod's slice is shown on."""
    return f"document.querySelector('tr.sharer[data-pod=\"{pod}\"]')?.closest('.card')"


async def test_the_page_shows_who_shares_what_and_follows_live(
    up: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    browser = need("chromium", "chromium")
    env, url = up
    # Every card 60 % taken; one more 60 % slice must wait.
    for i, name in enumerate(("train", "infer", "notebook", "batch")):
        r = await asyncio.to_thread(
            run, env, "submit", name, "--mem-percent", "60", "--cores", str(10 + 10 * i)
        )
        assert r.returncode == 0, r.stdout + r.stderr
    waiting = await asyncio.create_subprocess_exec(
        *HAMI,
        "submit",
        "late",
        "--mem-percent",
        "60",
        "--wait",
        "120",
        "--json",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        st = json.loads((await asyncio.to_thread(run, env, "status", "--json")).stdout)
        uuids = sorted(c["uuid"] for n in st["nodes"] for c in n["cards"])
        assert len(uuids) == 4

        async with chromium(browser, tmp_path / "profile", WIDTH, HEIGHT) as page:
            await page.navigate(url + "/")
            # The cards, each with its slice and what is left of it.
            assert await page.wait_for(f"{CARDS}.length === 4")
            shown = await page.evaluate(f"{CARDS}.map(c => c.dataset.uuid).sort()")
            assert shown == uuids
            for pod in ("train", "infer", "notebook", "batch"):
                text = await page.wait_for(f"{card_of(pod)}?.innerText")
                assert "49152 MiB" in text and "free: 32768 MiB" in text, text
            assert (
                await page.evaluate(
                    "document.querySelectorAll('section.node .badge.healthy').length"
                )
                == 2
            )
            # The waiting request, with placement's reason.
            why = await page.wait_for(
                "document.querySelector('tr.pending[data-name=\"late\"]')?.innerText"
            )
            assert "CardInsufficientMemory" in why, why
            assert "4 slices held" in await page.evaluate(
                "document.getElementById('summary').textContent"
            )
            await page.evaluate("window.sameDocument = true")

            # A slice placed now appears on its card and in the feed, without a reload.
            r = await asyncio.to_thread(run, env, "submit", "live-job", "--mem", "8192", "--json")
            assert r.returncode == 0, r.stdout + r.stderr
            placed = json.loads(r.stdout)
            uuid = placed["devices"][0]["uuid"]
            text = await page.wait_for(f"{card_of('live-job')}?.innerText", timeout=10)
            assert await page.evaluate(f"{card_of('live-job')}.dataset.uuid") == uuid
            assert "free: 24576 MiB" in text, text
            feed = await page.wait_for(
                "[...document.querySelectorAll('#events li')].map(li => li.innerText)"
                ".find(t => t.includes('live-job placed on'))"
            )
            assert placed["node"] in feed, feed
            assert await page.evaluate("window.sameDocument") is True
            png = await page.screenshot()
            assert png_size(png) == (WIDTH, HEIGHT)
            (tmp_path / "dashboard.png").write_bytes(png)
            if os.environ.get("HAMI_SCREENSHOT"):
                shutil.copyfile(tmp_path / "dashboard.png", os.environ["HAMI_SCREENSHOT"])

            # A release makes room: the waiting request leaves the pending list for a card.
            rel = await asyncio.to_thread(run, env, "release", "train")
            assert rel.returncode == 0, rel.stdout + rel.stderr
            assert await page.wait_for(
                f"{card_of('late')} != null && {card_of('train')} == null", timeout=10
            )
            assert await page.wait_for("document.querySelector('tr.pending') === null")
            assert await page.evaluate("window.sameDocument") is True
            assert page.errors() == []
        out, err = await asyncio.wait_for(waiting.communicate(), 30)
        assert waiting.returncode == 0, out + err
        assert json.loads(out)["name"] == "late"
    finally:
        if waiting.returncode is None:
            waiting.kill()
            await waiting.wait()
