"""shared.kube: client construction (host, kubeconfig), typed errors, raw calls, watch;
and ``python -m services.binder --kube`` wiring."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from services.binder.__main__ import KubeMode, parser
from shared.bus import Bus
from shared.config import Config
from shared.kube import (
    Conflict,
    Gone,
    Invalid,
    Kube,
    KubeError,
    NotFound,
    kube_errors,
    path,
    translate,
)
from tests.fakekube import FakeKube


def test_translate_keeps_the_api_status() -> None:
    body = '{"kind":"Status","status":"Failure","reason":"AlreadyExists","message":"pods \\"p\\" already exists","code":409,"details":{"name":"p"}}'
    err = translate(ApiException(status=409, reason="Conflict", body=body))
    assert isinstance(err, Conflict) and err.already_exists
    assert (err.status, err.message, err.details) == (409, 'pods "p" already exists', {"name": "p"})
    assert isinstance(translate(ApiException(status=410, body="{}")), Gone)
    assert isinstance(translate(ApiException(status=422, body="")), Invalid)
    other = translate(ApiException(status=500, reason="Internal", body="oops"))
    assert type(other) is KubeError and other.message == "oops" and other.reason == "Internal"


async def test_raw_calls_errors_and_kubeconfig(tmp_path: Path) -> None:
    async with FakeKube() as fake:
        kc = tmp_path / "kubeconfig"
        kc.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake.url}"}}}}]
users: [{{name: me, user: {{token: abc}}}}]
contexts: [{{name: ctx, context: {{cluster: fake, user: me}}}}]
current-context: ctx
""")
        kube = await Kube.connect(kubeconfig=str(kc))
        try:
            fake.add_pod("p1")
            got = await kube.get(path("pods", "default", "p1"))
            assert got["metadata"]["name"] == "p1"
            with pytest.raises(NotFound):
                await kube.get(path("pods", "default", "nope"))
            with pytest.raises(Conflict) as err:
                await kube.post(path("pods", "default"), {"metadata": {"name": "p1"}, "spec": {"containers": [{"name": "a", "image": "x"}]}})
            assert err.value.already_exists
            # the typed client through the context manager
            with pytest.raises(NotFound):
                async with kube_errors():
                    await client.CoreV1Api(kube.api).read_namespaced_pod("zz", "default")
            # watch: events, then 410 once history is compacted
            rv = str(fake.resource_version)
            fake.add_pod("p2")
            seen = []
            async for ev in kube.watch(path("pods", "default"), resourceVersion=rv, timeoutSeconds=1):
                seen.append((ev["type"], ev["object"]["metadata"]["name"]))
            assert ("ADDED", "p2") in seen
            fake.compact()
            with pytest.raises(Gone):
                async for _ in kube.watch(path("pods"), resourceVersion=rv):
                    pass
        finally:
            await kube.close()


def test_exactly_one_source_is_required() -> None:
    with pytest.raises(ValueError):
        asyncio.run(Kube.connect())
    with pytest.raises(ValueError):
        asyncio.run(Kube.connect(host="http://x", in_cluster=True))


async def test_binder_main_kube_mode_watches_and_serves_the_webhook(
    nats_url: str, cfg: Config, cert: tuple[Path, Path]
) -> None:
    crt, key = cert
    async with FakeKube() as fake:
        args = parser().parse_args(["--kube", "--kube-host", fake.url, "--no-api",
                                    "--webhook-cert", str(crt), "--webhook-key", str(key),
                                    "--webhook-host", "127.0.0.1", "--webhook-port", "0"])
        bus = await Bus.connect(nats_url, "binder")
        mode = KubeMode(bus, cfg, args)
        await mode.start()
        try:
            # Leader election is on by default: the watches follow the Lease.
            async with asyncio.timeout(15):
                while fake.watch_count < 2:  # pods and resourcequotas  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            lease = fake.get("leases.coordination.k8s.io", "default", "hami-binder")
            assert lease is not None and lease["spec"]["holderIdentity"]
            hook = mode.parts[-1]
            assert hook.port > 0  # type: ignore[attr-defined]
        finally:
            await mode.stop()
            await bus.close()
