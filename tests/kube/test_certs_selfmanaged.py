"""Self-managed webhook certificates against the fake API server: replicas converge on
one Secret, the caBundle verifies what the webhook serves, and a certificate expiring
within the renew window or garbage in the Secret is replaced."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.binder.certs import Bundle, CertManager, check, dns_names, generate
from services.binder.webhook import WebhookServer, WebhookSettings
from shared.config import load
from shared.kube import Kube
from tests.fakekube import FakeKube

NS, SVC, SECRET, CONFIG = "hami-system", "hami-webhook", "hami-webhook-tls", "hami-webhook"
NAMES = dns_names(SVC, NS)
MWC = "mutatingwebhookconfigurations.admissionregistration.k8s.io"


@pytest.fixture
async def fake() -> AsyncIterator[FakeKube]:
    async with FakeKube(namespaces=("default", NS)) as f:
        f.create(MWC, {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": CONFIG},
            "webhooks": [
                {"name": f"{n}.hami.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"service": {"name": SVC, "namespace": NS, "path": "/mutate"}}}
                for n in ("pods", "other")],
        })
        yield f


async def manager(fake: FakeKube, tmp: Path, name: str) -> tuple[Kube, CertManager]:
    kube = await Kube.connect(host=fake.url)
    return kube, CertManager(kube, NS, SECRET, CONFIG, interval=0, directory=str(tmp / name))


def content(p: str) -> bytes:
    return Path(p).read_bytes()


def mode(p: str | Path) -> int:
    return Path(p).stat().st_mode & 0o777


def stored(fake: FakeKube) -> Bundle:
    b = Bundle.from_secret(fake.get("secrets", NS, SECRET) or {})
    assert b is not None
    return b


def ca_bundles(fake: FakeKube) -> list[str]:
    cfg = fake.get(MWC, None, CONFIG) or {}
    return [w["clientConfig"].get("caBundle", "") for w in cfg["webhooks"]]


async def handshake(m: CertManager, fake: FakeKube, host: str = f"{SVC}.{NS}.svc") -> bytes:
    """Serve the manager's files; connect trusting only the configuration's caBundle."""
    (bundle,) = set(ca_bundles(fake))
    ctx = ssl.create_default_context(cadata=base64.b64decode(bundle).decode())
    server = WebhookServer(WebhookSettings.from_config(load(env={}), False),
                           certfile=m.certfile, keyfile=m.keyfile, host="127.0.0.1", port=0)
    await server.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx,
                                                  server_hostname=host)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return bytes(der)
    finally:
        await server.stop()


async def test_two_replicas_converge_and_the_ca_bundle_verifies_the_served_cert(
        fake: FakeKube, tmp_path: Path) -> None:
    (ka, a), (kb, b) = await manager(fake, tmp_path, "a"), await manager(fake, tmp_path, "b")
    try:
        await asyncio.gather(a.sync(), b.sync())
        assert a.bundle == b.bundle == stored(fake)
        assert content(a.certfile) == content(b.certfile) == stored(fake).crt
        assert mode(a.keyfile) == 0o600
        assert mode(Path(a.certfile).parent) == 0o700
        assert ca_bundles(fake) == [base64.b64encode(stored(fake).ca).decode()] * 2
        served = await handshake(a, fake)
        assert served == ssl.PEM_cert_to_DER_cert(stored(fake).crt.decode())
        # Again: nothing to change, no write.
        rv = fake.get("secrets", NS, SECRET)["metadata"]["resourceVersion"]  # type: ignore[index]
        await b.sync()
        assert fake.get("secrets", NS, SECRET)["metadata"]["resourceVersion"] == rv  # type: ignore[index]
        # The wrong name does not verify.
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(a, fake, host="elsewhere.example")
    finally:
        for m in (a, b):
            await m.stop()
        for k in (ka, kb):
            await k.close()


@pytest.mark.parametrize("data", ["expiring", "garbage", "wrong-names"])
async def test_a_bad_secret_is_replaced(fake: FakeKube, tmp_path: Path, data: str) -> None:
    now = dt.datetime.now(dt.UTC)
    if data == "expiring":  # 25 days left, inside the 30-day window
        old = generate(NAMES, now - dt.timedelta(days=340))
        body = old.secret_data()
    elif data == "wrong-names":
        old = generate(dns_names("someone-else", NS), now)
        body = old.secret_data()
    else:
        body = {"tls.crt": base64.b64encode(b"garbage").decode(), "tls.key": "!!", "ca.crt": ""}
    assert check(Bundle.from_secret({"data": body}), NAMES, now) is not None
    fake.create("secrets", {"metadata": {"name": SECRET}, "type": "kubernetes.io/tls",
                            "data": body}, namespace=NS)
    kube, m = await manager(fake, tmp_path, "m")
    try:
        await m.sync()
        new = stored(fake)
        assert new.secret_data()["tls.crt"] != body["tls.crt"]
        assert check(new, NAMES, now) is None
        await handshake(m, fake)
    finally:
        await m.stop()
        await kube.close()


async def test_the_timer_picks_up_another_replicas_rotation(fake: FakeKube, tmp_path: Path) -> None:
    kube, m = await manager(fake, tmp_path, "m")
    m.interval = 0.05
    try:
        await m.start()
        first = content(m.certfile)
        other = generate(NAMES, dt.datetime.now(dt.UTC))
        secret = fake.get("secrets", NS, SECRET) or {}
        fake.update("secrets", dict(secret, data=other.secret_data()))
        async with asyncio.timeout(10):
            while content(m.certfile) == first:  # noqa: ASYNC110 - timer, no event
                await asyncio.sleep(0.02)
        assert content(m.certfile) == other.crt
        await handshake(m, fake)
    finally:
        await m.stop()
        await kube.close()


async def test_the_binder_flags_start_it_and_a_missing_configuration_is_one_line(
        fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.binder.__main__ import KubeMode, parser

    monkeypatch.setenv("POD_NAMESPACE", NS)
    kube = await Kube.connect(host=fake.url)
    try:
        for config, ok in (("absent", False), (CONFIG, True)):
            args = parser().parse_args(["--kube", "--webhook-cert-mode=self-managed",
                                        f"--webhook-secret={SECRET}", f"--webhook-config={config}"])
            mode_ = KubeMode(None, load(env={}), args)  # type: ignore[arg-type]
            mode_.kube = kube
            if not ok:
                with pytest.raises(SystemExit, match="absent") as err:
                    await mode_._self_managed_certs()
                assert "\n" not in str(err.value)
                continue
            certfile, _ = await mode_._self_managed_certs()
            assert content(certfile) == stored(fake).crt
            for p in mode_.parts:
                await p.stop()  # type: ignore[attr-defined]
    finally:
        await kube.close()
