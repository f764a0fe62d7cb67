"""The admission webhook: HAMi's mutations and refusals (pure), and the HTTPS server
with a self-signed certificate made by the openssl CLI."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.binder.webhook import (
    SLICE_DRIVER,
    WebhookServer,
    WebhookSettings,
    json_patch,
    mutate_pod,
    review,
)
from shared.config import NodeSettings
from tests.fakekube.patch import json_patch as apply_patch

S = WebhookSettings()


def pod(*containers: dict[str, Any], labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "default", "labels": labels or {}},
            "spec": {"containers": list(containers), **spec}}


def c(name: str = "main", **limits: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "image": "x"}
    if limits:
        out["resources"] = {"limits": {("nvidia.com/" + k if k not in ("cpu", "memory") else k): str(v)
                                       for k, v in limits.items()}}
    return out


def adm(p: dict[str, Any], op: str = "CREATE") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "r-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": op, "namespace": "default", "object": p}}


def admitted(p: dict[str, Any], s: WebhookSettings = S) -> dict[str, Any]:
    """The pod as the API server would store it after our patch."""
    resp = review(adm(p), s)["response"]
    assert resp["allowed"], resp
    if "patch" not in resp:
        return p
    assert resp["patchType"] == "JSONPatch"
    return apply_patch(p, json.loads(base64.b64decode(resp["patch"])))  # type: ignore[no-any-return]


def env(ctr: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in ctr.get("env") or []}


def test_gpu_pod_gets_scheduler_slice_wiring_and_priority() -> None:
    out = admitted(pod(c("train", gpu=1, gpumem=3000, priority=0), c("sidecar", cpu=1)))
    spec = out["spec"]
    assert spec["schedulerName"] == "hami-scheduler"
    train, side = spec["containers"]
    assert env(train) == {
        "CUDA_TASK_PRIORITY": "0",
        "HAMI_POD_UID": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}},
        "HAMI_CONTAINER_NAME": "train",
        "HAMI_SLICE_FILE": "/usr/local/vgpu/slice/env",
    }
    assert train["volumeMounts"] == [{"name": "hami-slice-0", "mountPath": "/usr/local/vgpu/slice"}]
    assert "env" not in side and "volumeMounts" not in side
    # A CSI ephemeral inline volume, not a hostPath: Pod Security baseline/restricted allow it.
    assert spec["volumes"] == [{"name": "hami-slice-0", "csi": {
        "driver": "slices.hami.io", "volumeAttributes": {"container": "train"}}}]


def test_every_gpu_container_gets_its_own_volume() -> None:
    out = admitted(pod(c("a", gpu=1), c("b", gpu=2), initContainers=[c("i", gpu=1)]))
    spec = out["spec"]
    mounted = {ct["name"]: [m["name"] for m in ct["volumeMounts"]]
               for ct in spec["initContainers"] + spec["containers"]}
    assert mounted == {"i": ["hami-slice-0"], "a": ["hami-slice-1"], "b": ["hami-slice-2"]}
    attrs = {v["name"]: v["csi"]["volumeAttributes"]["container"] for v in spec["volumes"]}
    assert attrs == {"hami-slice-0": "i", "hami-slice-1": "a", "hami-slice-2": "b"}


def test_a_pod_cannot_mount_another_containers_slice() -> None:
    # The pod declares a volume of our driver for container b and mounts it in a (and in
    # a plain container): replaced by the webhook's own wiring.
    forged = {"name": "peek", "csi": {"driver": SLICE_DRIVER, "volumeAttributes": {"container": "b"}}}
    a = c("a", gpu=1) | {"volumeMounts": [{"name": "peek", "mountPath": "/peek"},
                                          {"name": "data", "mountPath": "/data"}]}
    plain = c("plain") | {"volumeMounts": [{"name": "peek", "mountPath": "/x"}]}
    out = admitted(pod(a, c("b", gpu=1), plain,
                       volumes=[forged, {"name": "data", "emptyDir": {}}]))
    spec = out["spec"]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "data", "mountPath": "/data"},
        {"name": "hami-slice-0", "mountPath": "/usr/local/vgpu/slice"}]
    assert "volumeMounts" not in spec["containers"][2]
    assert [(v["name"], (v.get("csi") or {}).get("volumeAttributes")) for v in spec["volumes"]] == [
        ("data", None), ("hami-slice-0", {"container": "a"}), ("hami-slice-1", {"container": "b"})]


def test_the_legacy_hostpath_volume_is_replaced() -> None:
    old = c("a", gpu=1) | {"volumeMounts": [{"name": "hami-slices", "mountPath": "/usr/local/vgpu/slice",
                                             "subPathExpr": "$(HAMI_POD_UID)_a"}]}
    out = admitted(pod(old, volumes=[{"name": "hami-slices", "hostPath": {"path": "/usr/local/vgpu/containers"}}]))
    assert [v["name"] for v in out["spec"]["volumes"]] == ["hami-slice-0"]
    assert out["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "hami-slice-0", "mountPath": "/usr/local/vgpu/slice"}]


def test_the_driver_name_is_the_node_agents() -> None:
    from services.binder.webhook import SLICE_CONTAINER_ATTR
    from services.nodeagent.csi.volume import CONTAINER_ATTR, DRIVER

    assert (SLICE_DRIVER, SLICE_CONTAINER_ATTR) == (DRIVER, CONTAINER_ATTR)


def test_init_containers_are_wired_too_and_reinvocation_is_idempotent() -> None:
    p = pod(c("app", gpu=1), initContainers=[c("warm", gpucores=20)],
            volumes=[{"name": "data", "emptyDir": {}}])
    once = admitted(p)
    warm = once["spec"]["initContainers"][0]
    assert warm["resources"]["limits"]["nvidia.com/gpu"] == "1"  # defaultGPUNum
    assert env(warm)["HAMI_CONTAINER_NAME"] == "warm"
    assert [v["name"] for v in once["spec"]["volumes"]] == ["data", "hami-slice-0", "hami-slice-1"]
    assert admitted(once) == once  # a second pass changes nothing


def test_default_gpu_num_is_configurable() -> None:
    s = WebhookSettings(node=NodeSettings(default_gpu_num=2))
    out = admitted(pod(c(gpumem=1000)), s)
    assert out["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_overwrite_env_hides_cards_from_other_containers() -> None:
    s = WebhookSettings(overwrite_env=True)
    out = admitted(pod(c("gpu", gpu=1), c("plain")), s)
    assert env(out["spec"]["containers"][1]) == {"NVIDIA_VISIBLE_DEVICES": "none"}
    assert "NVIDIA_VISIBLE_DEVICES" not in env(out["spec"]["containers"][0])
    # without it, a pod with no HAMi resources is not touched at all
    plain = pod(c("plain"))
    assert review(adm(plain), S)["response"] == {"uid": "r-1", "allowed": True, "status": {"code": 200}}


@pytest.mark.parametrize(("p", "words"), [
    # HAMi's own words for these two (tests/kube/test_webhook_hami_cases.py has the rest)
    (pod({**c(gpu=1), "securityContext": {"privileged": True}}), ["container main is privileged"]),
    (pod(c(gpu=1), nodeName="n1"), ["pod has node assigned"]),
    (pod(c(gpu="1.5")), ["nvidia.com/gpu must be a whole number"]),
    ({**pod(c(gpu=1)), "metadata": {"name": "p", "annotations": {"hami.io/device-scoring-weights": "slot=1"}}},
     ["hami.io/device-scoring-weights", "example: slot=1,core=1,memory=3"]),
])
def test_refusals_say_what_to_change(p: dict[str, Any], words: list[str]) -> None:
    resp = review(adm(p), S)["response"]
    assert resp["allowed"] is False and resp["uid"] == "r-1"
    assert resp["status"]["code"] == 403
    for w in words:
        assert w in resp["status"]["message"]


def test_privileged_without_our_resources_is_fine() -> None:
    p = pod({**c("root"), "securityContext": {"privileged": True}})
    assert review(adm(p), S)["response"]["allowed"]


def test_ignored_other_scheduler_and_non_create_are_left_alone() -> None:
    for p in (pod(c(gpu=1), labels={"hami.io/webhook": "ignore"}),
              pod(c(gpu=1), schedulerName="volcano")):
        assert mutate_pod(p, S) is None
        assert "patch" not in review(adm(p), S)["response"]
    assert review(adm(pod(c(gpu=1)), op="UPDATE"), S)["response"] == {"uid": "r-1", "allowed": True}


def test_json_patch_replaces_and_removes() -> None:
    before = {"spec": {"a": 1, "b": 2}}
    after = {"spec": {"a": 1, "c": 3}}
    assert apply_patch(before, json_patch(before, after)) == after


# ------------------------------------------------------------------------ HTTPS server


async def test_https_admission_review_round_trip(cert: tuple[Path, Path]) -> None:
    crt, key = cert
    server = WebhookServer(S, certfile=str(crt), keyfile=str(key), host="127.0.0.1", port=0)
    await server.start()
    try:
        ctx = ssl.create_default_context(cafile=str(crt))
        async with aiohttp.ClientSession(trust_env=False) as http:
            url = f"https://127.0.0.1:{server.port}/mutate"
            async with http.post(url, json=adm(pod(c(gpu=1))), ssl=ctx) as r:
                assert r.status == 200
                body = await r.json()
            assert body["kind"] == "AdmissionReview" and body["response"]["allowed"]
            ops = json.loads(base64.b64decode(body["response"]["patch"]))
            assert {"op": "add", "path": "/spec/schedulerName", "value": "hami-scheduler"} in ops
            async with http.post(url, json=adm(pod(c(gpu=1), nodeName="n")), ssl=ctx) as r:
                assert (await r.json())["response"]["allowed"] is False
            async with http.post(url, data=b"nonsense", ssl=ctx) as r:
                assert r.status == 400
            # plain HTTP to the TLS port does not get an answer
            with pytest.raises(aiohttp.ClientError):
                async with http.post(f"http://127.0.0.1:{server.port}/mutate", json={}) as r:
                    await r.read()
    finally:
        await server.stop()
