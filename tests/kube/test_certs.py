"""The webhook server picks up renewed certificate files without a restart (what
cert-manager plus the kubelet's Secret mount do): new handshakes get the new
certificate; a half-written pair keeps the old one."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from services.binder.webhook import WebhookServer, WebhookSettings
from shared.config import load


def make_pair(d: Path, cn: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d.mkdir(parents=True, exist_ok=True)
    crt, key = d / "tls.crt", d / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    return crt, key


async def served_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der
        return bytes(der)
    finally:
        writer.close()


def der_of(crt: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(crt.read_text())


async def test_renewed_files_are_served_without_a_restart(tmp_path: Path) -> None:
    live_crt, live_key = make_pair(tmp_path / "live", "first")
    new_crt, new_key = make_pair(tmp_path / "new", "second")
    other_crt, _ = make_pair(tmp_path / "other", "third")
    first = der_of(live_crt)
    server = WebhookServer(WebhookSettings.from_config(load(env={}), False),
                           certfile=str(live_crt), keyfile=str(live_key),
                           host="127.0.0.1", port=0, reload_interval=0.05)
    await server.start()
    try:
        assert await served_cert(server.port) == first
        # Half-written: a new certificate beside the old key. Kept the old pair.
        shutil.copy(other_crt, live_crt)
        assert not server.reload_if_changed()
        assert await served_cert(server.port) == first
        # Both files renewed: the timer loads them; the next handshake shows it.
        shutil.copy(new_key, live_key)
        shutil.copy(new_crt, live_crt)
        async with asyncio.timeout(10):
            while server.reloads < 1:  # noqa: ASYNC110 - the reload timer has no event
                await asyncio.sleep(0.02)
        assert await served_cert(server.port) == der_of(new_crt)
    finally:
        await server.stop()
