"""The admission webhook against HAMi v2.10's, case by case.

Each row is worked out from HAMi's source (``pkg/scheduler/webhook.go``: the handler and
``fitResourceQuota``; ``pkg/device/nvidia/device.go``: ``MutateAdmission``,
``mutateContainerResource``, ``defaultExclusiveCoreIfNeeded``,
``validateMemoryPercentage``, ``GenerateResourceRequests``; ``pkg/device/quota.go``:
``FitQuota``): an input pod (and settings, and the namespace's quota), and either the
fields HAMi's patch leaves on the pod or HAMi's refusal (code and exact message). Every
row goes through the real :func:`review`, the patch applied as the API server would; the
last test sends one through the HTTPS server reading a ResourceQuota and a running
pod's allocation from the fake API server.
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.binder.webhook import NamespaceQuota, WebhookServer, WebhookSettings, review
from shared.config import NodeSettings
from shared.hami import annotations as ann
from shared.kube import Kube
from shared.schemas import Quota
from tests.fakekube import FakeKube
from tests.fakekube.patch import json_patch as apply_patch

G, M, P, C, PRIO = (
    "nvidia.com/gpu",
    "nvidia.com/gpumem",
    "nvidia.com/gpumem-percentage",
    "nvidia.com/gpucores",
    "nvidia.com/priority",
)
PCT_MSG = "invalid nvidia.com/gpumem-percentage value {v} in container {c}: must be an integer between 0 and 100"


def ctr(
    name: str = "main",
    limits: dict[str, Any] | None = None,
    requests: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "image": "x", **extra}
    res: dict[str, Any] = {}
    if limits is not None:
        res["limits"] = {k: str(v) for k, v in limits.items()}
    if requests is not None:
        res["requests"] = {k: str(v) for k, v in requests.items()}
    if res:
        out["resources"] = res
    return out


def pod(
    *containers: dict[str, Any], init: list[dict[str, Any]] | None = None, **spec: Any
) -> dict[str, Any]:
    s: dict[str, Any] = {"containers": list(containers), **spec}
    if init:
        s["initContainers"] = init
    return {"metadata": {"name": "p", "namespace": "team", "uid": "u-1"}, "spec": s}


PRIV: dict[str, Any] = {"securityContext": {"privileged": True}}


@dataclass
class Case:
    name: str
    pod: dict[str, Any]
    settings: dict[str, Any] = field(
        default_factory=dict
    )  # WebhookSettings fields; "node" = NodeSettings kwargs
    quota: NamespaceQuota | None = None
    # admitted: container name -> its limits after the patch (only the containers named)
    limits: dict[str, dict[str, str]] | None = None
    env: dict[str, dict[str, str]] | None = (
        None  # container -> env entries that must be there (value)
    )
    no_env: dict[str, list[str]] | None = None  # container -> env names that must not be there
    spec: dict[str, Any] | None = None  # top-level spec fields after the patch (None value: absent)
    untouched: bool = False  # admitted with no patch at all
    refused: tuple[int, str] | None = None  # (code, exact message)


def q(
    mem: int | None = None, cores: int | None = None, used_mem: int = 0, used_cores: int = 0
) -> NamespaceQuota:
    return NamespaceQuota(
        limit=Quota(memory_mib=mem, cores=cores), used_mem=used_mem, used_cores=used_cores
    )


CASES = [
    # ------------------------------------------------ whole cards: gpucores 100 in the spec
    Case(
        "bare gpu gets gpucores 100",
        pod(ctr(limits={G: 1})),
        limits={"main": {G: "1", C: "100"}},
        spec={"schedulerName": "hami-scheduler"},
    ),
    Case(
        "bare gpu: 2 cards, each exclusive",
        pod(ctr(limits={G: 2})),
        limits={"main": {G: "2", C: "100"}},
    ),
    Case(
        "gpu 0 still counts as a count",
        pod(ctr(limits={G: 0})),
        limits={"main": {G: "0", C: "100"}},
        spec={"schedulerName": "hami-scheduler"},
    ),
    Case(
        "gpumem given: shared, no cores written",
        pod(ctr(limits={G: 1, M: 3000})),
        limits={"main": {G: "1", M: "3000"}},
    ),
    Case(
        "percentage 100: exclusive",
        pod(ctr(limits={G: 1, P: 100})),
        limits={"main": {G: "1", P: "100", C: "100"}},
    ),
    Case(
        "percentage 50: shared", pod(ctr(limits={G: 1, P: 50})), limits={"main": {G: "1", P: "50"}}
    ),
    Case(
        "percentage 100 decides even with gpumem",
        pod(ctr(limits={G: 1, M: 1000, P: 100})),
        limits={"main": {G: "1", M: "1000", P: "100", C: "100"}},
    ),
    Case(
        "cores given: kept as they are",
        pod(ctr(limits={G: 1, C: 30})),
        limits={"main": {G: "1", C: "30"}},
    ),
    Case(
        "cores 0 given: not exclusive",
        pod(ctr(limits={G: 1, C: 0})),
        limits={"main": {G: "1", C: "0"}},
    ),
    Case(
        "percentage only: defaultGPUNum, then exclusive",
        pod(ctr(limits={P: 100})),
        limits={"main": {P: "100", G: "1", C: "100"}},
    ),
    Case(
        "gpumem only: defaultGPUNum, shared",
        pod(ctr(limits={M: 2000})),
        limits={"main": {M: "2000", G: "1"}},
    ),
    Case(
        "cores only: defaultGPUNum",
        pod(ctr(limits={C: 20})),
        settings={"node": {"default_gpu_num": 2}},
        limits={"main": {C: "20", G: "2"}},
    ),
    Case(
        "defaultCores does not apply to a bare count",
        pod(ctr(limits={G: 1})),
        settings={"node": {"default_cores": 30}},
        limits={"main": {G: "1", C: "100"}},
    ),
    Case(
        "init containers are mutated too",
        pod(ctr("app", limits={G: 1, M: 1000}), init=[ctr("warm", limits={G: 1})]),
        limits={"warm": {G: "1", C: "100"}, "app": {G: "1", M: "1000"}},
    ),
    # ------------------------------------------------ limits, not requests
    Case("gpumem in requests only: not ours", pod(ctr(requests={M: 2000})), untouched=True),
    Case(
        "priority in requests only: no env",
        pod(ctr(limits={G: 1, M: 100}, requests={PRIO: 0})),
        no_env={"main": ["CUDA_TASK_PRIORITY"]},
    ),
    Case(
        "priority from limits",
        pod(ctr(limits={G: 1, M: 100, PRIO: 0})),
        env={"main": {"CUDA_TASK_PRIORITY": "0"}},
    ),
    # ------------------------------------------------ gpumem-percentage range
    Case(
        "percentage 150 refused",
        pod(ctr(limits={G: 1, P: 150})),
        refused=(500, PCT_MSG.format(v=150, c="main")),
    ),
    Case(
        "negative percentage refused",
        pod(ctr("c1", limits={G: 1, P: -5})),
        refused=(500, PCT_MSG.format(v=-5, c="c1")),
    ),
    Case(
        "percentage in requests checked too",
        pod(ctr(limits={G: 1}, requests={P: 101})),
        refused=(500, PCT_MSG.format(v=101, c="main")),
    ),
    Case(
        "percentage of a container without a count checked",
        pod(ctr("side", limits={P: 200})),
        refused=(500, PCT_MSG.format(v=200, c="side")),
    ),
    Case("percentage 0 accepted", pod(ctr(limits={G: 1, P: 0})), limits={"main": {G: "1", P: "0"}}),
    # ------------------------------------------------ refusals
    Case("no containers", pod(), refused=(403, "pod has no containers")),
    Case(
        "no containers, even with only init containers",
        pod(init=[ctr("i", limits={G: 1})]),
        refused=(403, "pod has no containers"),
    ),
    Case(
        "privileged gpu container",
        pod(ctr(limits={G: 1}, **PRIV)),
        refused=(403, "container main is privileged"),
    ),
    Case(
        "privileged init container named",
        pod(ctr("app", limits={G: 1}), init=[ctr("setup", **PRIV)]),
        refused=(403, "container setup is privileged"),
    ),
    Case(
        "privileged sidecar without gpu still refuses the pod",
        pod(ctr("a", limits={G: 1}), ctr("side", **PRIV)),
        refused=(403, "container side is privileged"),
    ),
    Case("privileged pod without our resources admitted", pod(ctr("root", **PRIV)), untouched=True),
    Case(
        "node assigned",
        pod(ctr(limits={G: 1}), nodeName="n1"),
        refused=(403, "pod has node assigned"),
    ),
    Case("node assigned without our resources admitted", pod(ctr(), nodeName="n1"), untouched=True),
    # ------------------------------------------------ scheduler name
    Case(
        "no schedulerName: ours",
        pod(ctr(limits={G: 1, M: 1})),
        spec={"schedulerName": "hami-scheduler"},
    ),
    Case(
        "default-scheduler taken over (forceOverwriteDefaultScheduler)",
        pod(ctr(limits={G: 1, M: 1}), schedulerName="default-scheduler"),
        spec={"schedulerName": "hami-scheduler"},
    ),
    Case(
        "default-scheduler kept without forceOverwriteDefaultScheduler",
        pod(ctr(limits={G: 1}), schedulerName="default-scheduler"),
        settings={"force_overwrite_default_scheduler": False},
        untouched=True,
    ),
    Case(
        "another scheduler's pod left alone",
        pod(ctr(limits={G: 1}), schedulerName="volcano"),
        untouched=True,
    ),
    Case(
        "another scheduler's pod is not checked either",
        pod(ctr(limits={G: 1, P: 300}, **PRIV), schedulerName="volcano"),
        untouched=True,
    ),
    # ------------------------------------------------ runtimeClassName
    Case(
        "runtimeClassName set on a gpu pod",
        pod(ctr(limits={G: 1, M: 1})),
        settings={"runtime_class_name": "nvidia"},
        spec={"runtimeClassName": "nvidia"},
    ),
    Case(
        "runtimeClassName the pod sets is kept",
        pod(ctr(limits={G: 1, M: 1}), runtimeClassName="kata"),
        settings={"runtime_class_name": "nvidia"},
        spec={"runtimeClassName": "kata"},
    ),
    Case(
        "runtimeClassName not set on a pod without our resources",
        pod(ctr()),
        settings={"runtime_class_name": "nvidia"},
        untouched=True,
    ),
    # ------------------------------------------------ GPU_CORE_UTILIZATION_POLICY
    Case(
        "gpuCorePolicy force: every container",
        pod(ctr("a", limits={G: 1, M: 1}), ctr("plain")),
        settings={"node": {"gpu_core_policy": "force"}},
        env={
            "a": {"GPU_CORE_UTILIZATION_POLICY": "force"},
            "plain": {"GPU_CORE_UTILIZATION_POLICY": "force"},
        },
    ),
    Case(
        "gpuCorePolicy disable",
        pod(ctr(limits={G: 1, M: 1})),
        settings={"node": {"gpu_core_policy": "disable"}},
        env={"main": {"GPU_CORE_UTILIZATION_POLICY": "disable"}},
    ),
    Case(
        "gpuCorePolicy default: no env",
        pod(ctr(limits={G: 1, M: 1})),
        no_env={"main": ["GPU_CORE_UTILIZATION_POLICY"]},
    ),
    # ------------------------------------------------ overwriteEnv
    Case(
        "overwriteEnv hides cards from a container without ours",
        pod(ctr("a", limits={G: 1}), ctr("plain")),
        settings={"overwrite_env": True},
        env={"plain": {"NVIDIA_VISIBLE_DEVICES": "none"}},
        no_env={"a": ["NVIDIA_VISIBLE_DEVICES"]},
    ),
    # ------------------------------------------------ namespace quota (memory and cores x cards)
    Case(
        "quota: fits",
        pod(ctr(limits={G: 1, M: 100})),
        quota=q(mem=2000, cores=400, used_mem=1000, used_cores=200),
        limits={"main": {G: "1", M: "100"}},
    ),
    Case(
        "quota: memory exceeded",
        pod(ctr(limits={G: 1, M: 1024})),
        quota=q(mem=2000, used_mem=1000),
        refused=(403, "exceeding resource quota"),
    ),
    Case(
        "quota: memory counts every card",
        pod(ctr(limits={G: 2, M: 600})),
        quota=q(mem=2000, used_mem=1000),
        refused=(403, "exceeding resource quota"),
    ),
    Case(
        "quota: two cards within",
        pod(ctr(limits={G: 2, M: 400})),
        quota=q(mem=2000, used_mem=1000),
        limits={"main": {G: "2", M: "400"}},
    ),
    Case(
        "quota: bare cards book 100 cores each",
        pod(ctr(limits={G: 3})),
        quota=q(cores=400, used_cores=200),
        refused=(403, "exceeding resource quota"),
    ),
    Case(
        "quota: init and app containers add up",
        pod(ctr("a", limits={G: 1, M: 600}), init=[ctr("i", limits={G: 1, M: 500})]),
        quota=q(mem=2000, used_mem=1000),
        refused=(403, "exceeding resource quota"),
    ),
    Case(
        "quota: a percentage ask counts 0 MiB",
        pod(ctr(limits={G: 1, P: 50, C: 10})),
        quota=q(mem=100, used_mem=100),
        limits={"main": {G: "1", P: "50", C: "10"}},
    ),
    Case(
        "quota: a limit of 0 does not limit",
        pod(ctr(limits={G: 1, M: 5000})),
        quota=q(mem=0, cores=0, used_mem=9),
        limits={"main": {G: "1", M: "5000"}},
    ),
    # memoryFactor 1000: a ResourceQuota of 2 is 2000 MiB (NamespaceQuota holds it so), gpumem 3 is 3000 MiB
    Case(
        "quota: memoryFactor applies to the ask",
        pod(ctr(limits={G: 1, M: 3})),
        settings={"node": {"memory_factor": 1000}},
        quota=q(mem=2000),
        refused=(403, "exceeding resource quota"),
    ),
    Case(
        "quota: memoryFactor, within",
        pod(ctr(limits={G: 1, M: 2})),
        settings={"node": {"memory_factor": 1000}},
        quota=q(mem=2000),
        limits={"main": {G: "1", M: "2"}},
    ),
    Case(
        "quota: defaultMemory counts",
        pod(ctr(limits={G: 1})),
        settings={"node": {"default_memory": 4096}},
        quota=q(mem=4000),
        refused=(403, "exceeding resource quota"),
    ),
]


def settings_of(over: dict[str, Any]) -> WebhookSettings:
    over = dict(over)
    node = NodeSettings(**over.pop("node", {}))
    return WebhookSettings(node=node, **over)


def adm(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "r-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "team",
            "object": p,
        },
    }


def containers(p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = p.get("spec") or {}
    return {
        c["name"]: c for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
    }


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in c.get("env") or []}


def check(case: Case, resp: dict[str, Any]) -> None:
    if case.refused is not None:
        code, message = case.refused
        assert resp["allowed"] is False, resp
        assert (resp["status"]["code"], resp["status"]["message"]) == (code, message)
        return
    assert resp["allowed"] is True, resp
    assert resp["status"]["code"] == 200
    if case.untouched:
        assert "patch" not in resp, resp
        return
    out = apply_patch(case.pod, json.loads(base64.b64decode(resp["patch"])))
    got = containers(out)
    for name, want in (case.limits or {}).items():
        assert got[name]["resources"]["limits"] == want, name
    for name, want_env in (case.env or {}).items():
        e = env_of(got[name])
        assert {k: e.get(k) for k in want_env} == want_env, name
    for name, absent in (case.no_env or {}).items():
        assert not set(absent) & set(env_of(got[name])), name
    for key, value in (case.spec or {}).items():
        assert out["spec"].get(key) == value, key


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hami_case(case: Case) -> None:
    check(case, review(adm(case.pod), settings_of(case.settings), case.quota)["response"])


def test_what_we_add_keeps_hamis_patch() -> None:
    """Our slice wiring (env, CSI volume) comes on top of HAMi's fields and is the only
    extra: a bare card's container gets HAMi's limits and scheduler, plus our three env
    vars and one mount."""
    resp = review(adm(pod(ctr(limits={G: 1}))), WebhookSettings())["response"]
    out = apply_patch(pod(ctr(limits={G: 1})), json.loads(base64.b64decode(resp["patch"])))
    main = out["spec"]["containers"][0]
    assert set(env_of(main)) == {"HAMI_POD_UID", "HAMI_CONTAINER_NAME", "HAMI_SLICE_FILE"}
    assert set(out["spec"]) == {"containers", "schedulerName", "volumes"}


def test_what_the_codec_cannot_read_is_refused_with_its_words() -> None:
    """A deliberate difference (docs/hami-compat.md): HAMi admits these and the pod then
    gets no card; we refuse at once, saying what to write instead."""
    resp = review(adm(pod(ctr(limits={G: 1, M: "16Gi"}))), WebhookSettings())["response"]
    assert resp["allowed"] is False and resp["status"]["code"] == 403
    assert "must be at most 2147483647" in resp["status"]["message"]
    assert "write 16384 for 16 GiB" in resp["status"]["message"]


def test_invalid_numa_bind_and_fractional_percentage_are_ignored() -> None:
    from shared.hami.codec import pod_request

    p = pod(ctr(limits={G: 1, P: "50.5", C: 10}))
    p["metadata"]["annotations"] = {"nvidia.com/numa-bind": "yes"}
    assert review(adm(p), WebhookSettings())["response"]["allowed"]
    req = pod_request(p)
    assert req.constraints.numa_bind is False
    d = req.containers[0].devices[0]
    assert (d.mem, d.mem_percent, d.cores) == (
        0,
        100,
        10,
    )  # 50.5 % ignored: the whole card's memory
    p["metadata"]["annotations"] = {"nvidia.com/numa-bind": "TRUE"}
    assert pod_request(p).constraints.numa_bind is True  # Go's ParseBool takes TRUE


async def test_quota_through_https_and_the_api_server(cert: tuple[Path, Path]) -> None:
    """The server reads the namespace's ResourceQuota and what its running pods hold from
    the API server: 3000 of 4000 MiB are held, so 2000 more is refused and 1000 fits."""
    crt, key = cert
    async with FakeKube() as fake:
        fake.add_namespace("team")
        fake.create(
            "resourcequotas",
            {"metadata": {"name": "gpu"}, "spec": {"hard": {"limits.nvidia.com/gpumem": "4000"}}},
            "team",
        )
        fake.add_pod(
            "running", "team", annotations={ann.DEVICES_ALLOCATED: "GPU-a,NVIDIA,3000,0:;"}
        )
        # a pod in another namespace holds nothing of team's quota
        fake.add_pod(
            "elsewhere", "default", annotations={ann.DEVICES_ALLOCATED: "GPU-b,NVIDIA,3000,0:;"}
        )
        kube = await Kube.connect(host=fake.url)
        server = WebhookServer(
            WebhookSettings(),
            certfile=str(crt),
            keyfile=str(key),
            host="127.0.0.1",
            port=0,
            kube=kube,
        )
        await server.start()
        try:
            ctx = ssl.create_default_context(cafile=str(crt))
            async with aiohttp.ClientSession(trust_env=False) as http:
                url = f"https://127.0.0.1:{server.port}/mutate"
                answers = []
                for mem in (2000, 1000):
                    async with http.post(
                        url, json=adm(pod(ctr(limits={G: 1, M: mem}))), ssl=ctx
                    ) as r:
                        assert r.status == 200
                        answers.append((await r.json())["response"])
            assert answers[0]["allowed"] is False
            assert answers[0]["status"] == {
                "code": 403,
                "reason": "Forbidden",
                "message": "exceeding resource quota",
            }
            assert answers[1]["allowed"] is True and "patch" in answers[1]
        finally:
            await server.stop()
            await kube.close()


def test_another_schedulers_pod_is_allowed_with_hamis_reason() -> None:
    for p, s in (
        (pod(ctr(limits={G: 1}), schedulerName="volcano"), WebhookSettings()),
        (
            pod(ctr(limits={G: 1}), schedulerName="default-scheduler"),
            WebhookSettings(force_overwrite_default_scheduler=False),
        ),
    ):
        resp = review(adm(p), s)["response"]
        assert resp == {
            "uid": "r-1",
            "allowed": True,
            "status": {"code": 200, "message": "pod already has different scheduler assigned"},
        }


def test_quota_keys_follow_the_resource_names_and_skip_fractions() -> None:
    """HAMi's quota keys are ``limits.`` + the configured memory and cores names, read
    with ``AsInt64`` (a fractional value is not a limit)."""
    from shared.config import ResourceNames
    from shared.hami.codec import quota_from_resource_quotas

    names = ResourceNames(memory="example.com/vmem", cores="example.com/vcores")
    rqs = [
        {"spec": {"hard": {"limits.example.com/vmem": "3000", "limits.example.com/vcores": "1.5"}}}
    ]
    assert quota_from_resource_quotas(rqs, None, names) == Quota(memory_mib=3000)
    assert quota_from_resource_quotas(rqs) is None  # the default names are not these


def test_what_a_namespace_holds_counts_live_pods_only() -> None:
    """HAMi's quota manager drops a pod's usage when it ends; a pod whose annotation
    cannot be read is left to the binder to report, not counted."""
    from services.binder.webhook import held_by_pods

    def p(value: str, phase: str = "Running") -> dict[str, Any]:
        return {
            "metadata": {"annotations": {ann.DEVICES_ALLOCATED: value}},
            "status": {"phase": phase},
        }

    pods = [
        p("GPU-a,NVIDIA,1000,10:GPU-b,NVIDIA,1000,10:;GPU-a,NVIDIA,500,0:;"),
        p("GPU-c,NVIDIA,7000,70:;", phase="Succeeded"),
        p("GPU-c,NVIDIA,7000,70:;", phase="Failed"),
        p("GPU-d,NVIDIA,x,1:;"),
        {"metadata": {}},
    ]
    assert held_by_pods(pods) == (2500, 20)
