"""The Helm chart through real Helm: lint, render, an offline install, schema validation.

Helm is the Go SDK itself, embedded by ``helm-python-sdk`` (no helm binary). Each value
set below is linted and rendered; every rendered object is validated against the
Kubernetes OpenAPI schema of two Kubernetes versions in strict mode (an unknown field
fails), cert-manager's and the Prometheus Operator's objects against small schemas of
our own (no built-in schema exists for custom resources). Then the wiring: NATS in the
chart (its config accepted by the real nats-server), webhook certificate modes, health
probes, PodDisruptionBudgets and anti-affinity, values.schema.json, and an RBAC table
that ties every granted verb to the code that uses it. In extender mode, the
kube-scheduler sidecar's configuration file is checked against a table of upstream's
field names and types and against the services' own configuration, and its RBAC
against what upstream grants a second scheduler. With auth.enabled, the Secret made by
``hami.creds init`` + ``secret`` is checked against what each pod mounts (its own role's
seed only), and nats-server, started from the chart's config with the Secret's files,
admits the placement Deployment's seed and refuses an unknown one.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate as kv
import msgspec
import pytest
import yaml

from shared import config as hami_config
from shared import health, natsserver, runner
from shared.hami import codec
from shared.region import POLICIES as CORE_POLICIES

# Lint and install read Helm's config and cache directories (repositories, registry
# credentials); point them at an empty place so nothing on the developer's machine, and
# no network, enters the result. Set before the first Helm call: Go reads the
# environment once.
_HELM_HOME = tempfile.mkdtemp(prefix="helm-home-")
for _var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
    os.environ[_var] = os.path.join(_HELM_HOME, _var.lower())

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "hami-bus"
RELEASE, NS = "hami", "hami-system"
KUBE_VERSIONS = ("1.30", "1.33")  # the oldest we support (Chart.yaml kubeVersion) and a newer one
SERVICES = ("inventory", "placement", "binder", "metrics", "nodeagent")

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-nats": {
        "nats": {"enabled": False},
        "natsUrl": "nats://nats.messaging:4222",
        "natsStreamReplicas": 3,
    },
    "ha": {
        "inventory": {"replicas": 2},
        "placement": {"replicas": 2},
        "binder": {"replicas": 2},
        "metrics": {"replicas": 2},
        "nats": {"replicas": 3},
    },
    "ha-hard": {"placement": {"replicas": 3}, "podAntiAffinity": "hard"},
    "cert-manager": {
        "binder": {"webhook": {"certs": {"mode": "cert-manager"}}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    "provided": {
        "binder": {
            "webhook": {
                "certs": {"mode": "provided", "cert": "CERT", "key": "KEY", "caBundle": CA_PEM}
            }
        }
    },
    "scheduler-direct": {"scheduler": {"mode": "direct"}},
    "auth": {"auth": {"enabled": True, "secretName": "hami-nats-auth",
                      "nodes": ["gpu-1", "gpu-2.example.com"]},
             "nats": {"replicas": 3}},
    "minimal": {
        "metrics": {"enabled": False},
        "nodeagent": {"enabled": False},
        "inventory": {"enabled": False},
        "binder": {"webhook": {"enabled": False}},
    },
}

Obj = dict[str, Any]


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@functools.cache
def values() -> Obj:
    doc = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def render_raw(vals: Obj) -> dict[str, str]:
    return chart().render(copy.deepcopy(vals), name=RELEASE, namespace=NS, is_install=True)


@functools.cache
def _render(name: str) -> str:
    return json.dumps(render_raw(VALUE_SETS[name]))


def render(name: str) -> list[Obj]:
    """The objects of one value set (a fresh copy: tests may change them)."""
    out = []
    for path, text in sorted(json.loads(_render(name)).items()):
        if path.endswith(".yaml"):
            out += [d for d in yaml.safe_load_all(text) if d]
    return out


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def component_name(component: str) -> str:
    return f"{RELEASE}-hami-bus-{component}"


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def our_containers(objs: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(workload, container) for every container running the hami-bus image."""
    image = f"{values()['image']['repository']}:{chart().metadata['appVersion']}"
    return [
        (w, c)
        for w in workloads(objs)
        for c in w["spec"]["template"]["spec"]["containers"]
        if c["image"] == image
    ]


def env(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------ lint, install, render


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name: str, version: str) -> None:
    report = helm.lint(CHART, copy.deepcopy(VALUE_SETS[name]), strict=True, namespace=NS,
                       kube_version=f"v{version}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings, errors
    assert not problems and not report["errors"], report


def test_install_offline_with_defaults() -> None:
    """What `helm install` checks before it creates anything: dependencies present, values
    valid, templates rendering, objects parseable. Client-side dry run: no cluster."""
    for dep in chart().metadata.get("dependencies") or []:
        assert dep["name"] in {d["name"] for d in chart().dependencies}, f"{dep}: not vendored"
    cfg = helm.Config(storage_driver="memory", namespace=NS)
    try:
        rel = cfg.install(chart(), RELEASE, namespace=NS, dry_run="client")
    finally:
        cfg.close()
    installed = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rel["manifest"]) if d}
    rendered = {(o["kind"], o["metadata"]["name"]) for o in render("defaults")}
    assert installed == rendered
    assert ("StatefulSet", component_name("nats")) in installed  # NATS comes with the chart
    assert RELEASE in rel["notes"] and "nats://" in rel["notes"]
    assert "Scheduling (extender mode): registry.k8s.io/kube-scheduler:v" in rel["notes"]
    assert "WARNING: NATS authentication is OFF" in rel["notes"]
    assert "WARNING: binder" not in rel["notes"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_render_is_deterministic(name: str) -> None:
    """Nothing is generated at render time (no per-render CA): a GitOps tool rendering the
    same values twice sees no change."""
    assert render_raw(VALUE_SETS[name]) == render_raw(VALUE_SETS[name])


# --------------------------------------------------------------- Kubernetes schema (strict)

_QUANTITY = {"type": ["string", "integer"]}
_NAME = {"type": "string", "minLength": 1}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "namespace": _NAME, "labels": {"type": "object"},
                   "annotations": {"type": "object"}},
    "additionalProperties": False,
}


def _crd(spec: Obj) -> Obj:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                       "metadata": _META, "spec": spec},
        "additionalProperties": False,
    }


# The fields of cert-manager v1 and Prometheus Operator v1 that the chart sets, with their
# upstream types: no built-in schema exists for custom resources.
CUSTOM_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("cert-manager.io/v1", "Issuer"): _crd({
        "type": "object",
        "properties": {"selfSigned": {"type": "object"}},
        "additionalProperties": False,
        "minProperties": 1,
    }),
    ("cert-manager.io/v1", "Certificate"): _crd({
        "type": "object",
        "required": ["secretName", "issuerRef"],
        "properties": {
            "secretName": _NAME,
            "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": {"type": "array", "items": _NAME, "minItems": 1},
            "duration": {"type": "string"},
            "renewBefore": {"type": "string"},
            "privateKey": {
                "type": "object",
                "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                },
                "additionalProperties": False,
            },
            "issuerRef": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": _NAME, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                               "group": {"type": "string"}},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd({
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}},
                         "additionalProperties": False},
            "endpoints": {"type": "array", "items": {
                "type": "object",
                "properties": {"port": _NAME, "path": {"type": "string"},
                               "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                               "scrapeTimeout": {"type": "string"}},
                "additionalProperties": False,
            }},
        },
        "additionalProperties": False,
    }),
}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_objects_valid_against_kubernetes_schema(name: str, version: str) -> None:
    failures = []
    for obj in render(name):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        custom = CUSTOM_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if custom is not None:
                jsonschema.Draft202012Validator(custom).validate(obj)
            else:
                kv.validate(obj, version, strict=True)
        except kv.SchemaNotFoundError:
            failures.append(f"{where}: no schema for {obj['apiVersion']} in {version}")
        except jsonschema.ValidationError as exc:
            failures.append(f"{where}: {exc.message} at {list(exc.absolute_path)}")
    assert not failures, "\n".join(failures)


def test_strict_validation_rejects_unknown_fields() -> None:
    """The validation above is strict: a misspelt field fails rather than being dropped."""
    dep = one(render("defaults"), "Deployment", component_name("binder"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    for version in KUBE_VERSIONS:
        with pytest.raises(kv.ValidationError):
            kv.validate(dep, version, strict=True)
    cert = one(render("cert-manager"), "Certificate")
    cert["spec"]["dnsName"] = ["x"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(
            CUSTOM_SCHEMAS[("cert-manager.io/v1", "Certificate")]
        ).validate(cert)


# ------------------------------------------------------------------------ values.schema.json


def schema() -> Obj:
    doc = json.loads((CHART / "values.schema.json").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize(
    "expr, where",
    [
        ("placement.replicas=two", "/placement/replicas"),
        ("config.scheduler.nodePolicy=worstfit", "/config/scheduler/nodePolicy"),
        ("config.scheduler.gpuPolicy=binpack;numa", "/config/scheduler/gpuPolicy"),
        ("config.node.gpuCorePolicy=sometimes", "/config/node/gpuCorePolicy"),
        ("config.node.deviceSplitCount=0", "/config/node/deviceSplitCount"),
        ("config.node.deviceSplitCout=4", "/config/node"),
        ("binder.webhook.certs.mode=generated", "/binder/webhook/certs/mode"),
        ("binder.webhook.failurePolicy=Sometimes", "/binder/webhook/failurePolicy"),
        ("nats.replicas=2", "/nats/replicas"),
        ("nats.jetstream.storageSize=lots", "/nats/jetstream/storageSize"),
        ("natsUrl=http://nats:4222", "/natsUrl"),
        ("health.port=0", "/health/port"),
        ("podAntiAffinity=always", "/podAntiAffinity"),
        ("scheduler.mode=both", "/scheduler/mode"),
        ("scheduler.extenderPort=0", "/scheduler/extenderPort"),
        ("scheduler.extenderReservationTimeout=0", "/scheduler/extenderReservationTimeout"),
        ("scheduler.kubeScheduler.verbosity=-1", "/scheduler/kubeScheduler/verbosity"),
        ("scheduler.kubeScheduler.image.tag=v1.30.4+k3s1", "/scheduler/kubeScheduler/image/tag"),
        ("scheduler.kubeScheduler.extraArgs={v=4}", "/scheduler/kubeScheduler/extraArgs/0"),
        ("scheduler.kubeSchedulr.verbosity=4", "/scheduler"),
        ("nodeagent.kubeletDir=var/lib/kubelet", "/nodeagent/kubeletDir"),
        ("placment.replicas=3", ""),
        ("auth.enabled=true", "/auth/secretName"),
        ("auth.enabled=true,auth.secretName=", "/auth/secretName"),
        ("auth.nodes={GPU_1}", "/auth/nodes/0"),
    ],
)
def test_schema_rejects_wrong_values(expr: str, where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as exc:
        render_raw(helm.parse_set_string(expr))
    assert f"'{where}'" in exc.value.detail or (not where and "placment" in exc.value.detail)


def test_schema_enums_are_the_codes() -> None:
    props = schema()["properties"]["config"]["properties"]
    assert props["scheduler"]["properties"]["nodePolicy"]["enum"] == list(codec.NODE_POLICIES)
    assert props["node"]["properties"]["gpuCorePolicy"]["enum"] == list(CORE_POLICIES)
    for policy in codec.GPU_POLICIES:  # every card policy, alone and in a chain, renders
        render_raw({"config": {"scheduler": {"gpuPolicy": f"{policy},numa"}}})
    for policy in codec.NODE_POLICIES:
        render_raw({"config": {"scheduler": {"nodePolicy": policy}}})


def _encode_names(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)}


def test_schema_config_keys_are_config_fields() -> None:
    """What the schema lets into the ConfigMap, shared/config.py reads."""
    cfg = schema()["properties"]["config"]["properties"]
    top = {k for k, v in cfg.items() if "properties" not in v}
    assert top <= _encode_names(hami_config.Config)
    for section, struct in (("node", hami_config.NodeSettings),
                            ("scheduler", hami_config.SchedulerSettings),
                            ("resources", hami_config.ResourceNames)):
        assert set(cfg[section]["properties"]) <= _encode_names(struct), section


def test_schema_types_every_value() -> None:
    """Every key of values.yaml is declared (with a type) in values.schema.json, down to
    the objects left free-form on purpose (resources, selectors, security contexts).
    Sections open to keys other changes are adding (additionalProperties: true) still
    type the keys they declare."""
    missing = []

    def walk(node: Any, sch: Obj, where: str) -> None:
        assert "type" in sch, f"{where}: no type"
        if isinstance(node, dict) and "properties" in sch:
            for key, val in node.items():
                if key not in sch["properties"]:
                    if sch.get("additionalProperties") is not True:
                        missing.append(f"{where}.{key}")
                else:
                    walk(val, sch["properties"][key], f"{where}.{key}")

    walk(values(), schema(), "values")
    assert not missing


@pytest.mark.parametrize("name, mode", [("defaults", "extender"), ("scheduler-direct", "direct")])
def test_rendered_config_loads(name: str, mode: str) -> None:
    """The ConfigMap every service reads loads with shared/config.py, every value taken."""
    cm = one(render(name), "ConfigMap", f"{RELEASE}-hami-bus-config")
    raw = yaml.safe_load(cm["data"]["config.yaml"])
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    loaded = msgspec.to_builtins(hami_config.load(path, env={}))
    for section in ("node", "scheduler", "resources"):
        for key, val in raw[section].items():
            assert loaded[section][key] == val, f"config.{section}.{key}"
    assert loaded["scheduler"]["schedulerName"] == values()["schedulerName"]
    assert loaded["scheduler"]["mode"] == mode
    for key in ("extenderPort", "extenderReservationTimeout"):
        assert loaded["scheduler"][key] == values()["scheduler"][key], key
    for _, c in our_containers(render(name)):
        assert env(c)["HAMI_CONFIG"] == "/etc/hami/config.yaml"


# ----------------------------------------------------------------------------------- NATS


def test_nats_comes_with_the_chart() -> None:
    objs = render("defaults")
    nats = values()["nats"]
    sts = one(objs, "StatefulSet", component_name("nats"))
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"{nats['image']['repository']}:{nats['image']['tag']}"
    assert nats["image"]["tag"] not in ("", "latest")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == nats["jetstream"]["storageSize"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    svc = one(objs, "Service", component_name("nats"))
    assert matches(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    assert {"name": "client", "port": 4222, "targetPort": "client"} in svc["spec"]["ports"]
    assert one(objs, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    url = f"nats://{component_name('nats')}.{NS}.svc:4222"
    for w, c in our_containers(objs):
        assert env(c)["HAMI_NATS_URL"] == url, w["metadata"]["name"]
        assert env(c)["HAMI_NATS_REPLICAS"] == "1"


@pytest.mark.parametrize("name, servers", [("defaults", 1), ("ha", 3)])
def test_nats_config_accepted_by_nats_server(name: str, servers: int, tmp_path: Path) -> None:
    objs = render(name)
    conf = one(objs, "ConfigMap", f"{component_name('nats')}-config")["data"]["nats.conf"]
    (tmp_path / "nats.conf").write_text(conf)
    proc = subprocess.run(
        [natsserver.find_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        env={"SERVER_NAME": f"{component_name('nats')}-0"},
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "jetstream" in conf
    assert conf.count(".svc:6222") == (servers if servers > 1 else 0)  # a route to each server
    for _, c in our_containers(objs):
        assert env(c)["HAMI_NATS_REPLICAS"] == str(servers)


def test_external_nats() -> None:
    objs = render("external-nats")
    assert not find(objs, "StatefulSet") and not [
        o for o in objs if o["metadata"]["name"].startswith(component_name("nats"))
    ]
    for _, c in our_containers(objs):
        assert env(c)["HAMI_NATS_URL"] == "nats://nats.messaging:4222"
        assert env(c)["HAMI_NATS_REPLICAS"] == "3"
    with pytest.raises(helm.HelmRenderError, match="set natsUrl"):
        render_raw({"nats": {"enabled": False}})


# ------------------------------------------------------------- health, HA, service wiring


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_service_has_health_probes(name: str) -> None:
    objs = render(name)
    port = values()["health"]["port"]
    seen = set()
    for _w, c in our_containers(objs):
        seen.add(c["name"])
        assert {"name": "health", "containerPort": port} in c["ports"], c["name"]
        assert f"--health-port={port}" in c["args"], c["name"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    enabled = {s for s in SERVICES if (VALUE_SETS[name].get(s) or {}).get("enabled", True)}
    assert seen == enabled


def test_health_port_is_the_services_default() -> None:
    assert values()["health"]["port"] == health.DEFAULT_PORT


# Flags the chart passes for changes other workers are landing (self-managed webhook
# certificates and the Lease name in the binder). While a service rejects them, the test checks the rest
# of the command line and reports the pending flags as an expected failure.
@pytest.mark.parametrize("name", ["defaults", "cert-manager"])
def test_container_args_accepted_by_the_services(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rendered command line parses with the service's own argument parser."""
    seen: list[Any] = []

    def run(svc: Any, args: Any, make: Any) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(runner, "run", run)
    for _, c in our_containers(render(name)):
        assert c["command"][:2] == ["python", "-m"], c["name"]
        main = importlib.import_module(f"{c['command'][2]}.__main__").main
        try:
            assert main(c["args"]) == 0
        except SystemExit as exc:
            pytest.fail(f"{c['name']}: {c['args']} rejected by {c['command'][2]} ({exc.code})")
    assert len(seen) == len(our_containers(render(name)))


@pytest.mark.parametrize("name", ["ha", "ha-hard"])
def test_replicated_services_get_pdb_and_anti_affinity(name: str) -> None:
    objs = render(name)
    vals = VALUE_SETS[name]
    pdbs = find(objs, "PodDisruptionBudget")
    replicated = {w["metadata"]["name"]: w for w in workloads(objs) if w["spec"].get("replicas", 1) > 1}
    assert {c for c in ("inventory", "placement", "binder") if (vals.get(c) or {}).get("replicas", 1) > 1} \
        <= {n.removeprefix(component_name("")) for n in replicated}
    assert {p["metadata"]["name"] for p in pdbs} == set(replicated)
    for pdb in pdbs:
        w = replicated[pdb["metadata"]["name"]]
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
        assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
        # and only this workload's pods
        for other in workloads(objs):
            if other is not w:
                assert not matches(pdb["spec"]["selector"]["matchLabels"],
                                   other["spec"]["template"]["metadata"]["labels"])
        anti = w["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        if vals.get("podAntiAffinity") == "hard":
            (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        else:
            (pref,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
            term = pref["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert matches(term["labelSelector"]["matchLabels"], pod_labels)


def test_single_replicas_get_neither() -> None:
    objs = render("defaults")
    for w in workloads(objs):
        if w["spec"].get("replicas", 1) == 1 and w["kind"] != "DaemonSet":
            assert "affinity" not in w["spec"]["template"]["spec"], w["metadata"]["name"]
            assert not find(objs, "PodDisruptionBudget", w["metadata"]["name"])
    own = render_raw({"placement": {"affinity": {"nodeAffinity": {}}}})
    dep = next(d for d in yaml.safe_load_all(own["hami-bus/templates/placement.yaml"])
               if d and d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {}}


def test_only_the_services_that_call_the_api_mount_a_token() -> None:
    objs = render("defaults")
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        mounts = pod.get("automountServiceAccountToken", True)
        sa = pod.get("serviceAccountName")
        if sa:
            mounts = mounts and one(objs, "ServiceAccount", sa).get("automountServiceAccountToken", True)
        wants = w["metadata"]["name"] in (component_name("binder"), component_name("nodeagent"),
                                          component_name("inventory"))
        assert mounts == wants, w["metadata"]["name"]


# ----------------------------------------------------------------------- webhook certificates


def binder(objs: list[Obj]) -> Obj:
    dep = one(objs, "Deployment", component_name("binder"))
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "binder"]
    return {"pod": dep["spec"]["template"]["spec"], "c": c, "args": c["args"]}


def webhook_config(objs: list[Obj]) -> Obj:
    return one(objs, "MutatingWebhookConfiguration")


def webhook_service_is_the_binders(objs: list[Obj]) -> str:
    (wh,) = webhook_config(objs)["webhooks"]
    ref = wh["clientConfig"]["service"]
    svc = one(objs, "Service", ref["name"])
    assert ref["namespace"] == NS and svc["spec"]["ports"][0]["port"] == ref["port"]
    b = binder(objs)
    pod_labels = one(objs, "Deployment", component_name("binder"))["spec"]["template"]["metadata"]["labels"]
    assert matches(svc["spec"]["selector"], pod_labels)
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in b["c"]["ports"]}
    return str(ref["name"])


def test_webhook_self_managed_is_the_default() -> None:
    objs = render("defaults")
    assert values()["binder"]["webhook"]["certs"]["mode"] == "self-managed"
    assert not find(objs, "Secret") and not find(objs, "Certificate")
    mwc = webhook_config(objs)
    (wh,) = mwc["webhooks"]
    # left out, so that an upgrade or a GitOps sync never resets what the binder patched
    assert "caBundle" not in wh["clientConfig"]
    webhook_service_is_the_binders(objs)
    b = binder(objs)
    secret = f"{RELEASE}-hami-bus-webhook-tls"
    for arg in ("--webhook-cert-mode=self-managed", f"--webhook-secret={secret}",
                f"--webhook-config={mwc['metadata']['name']}"):
        assert arg in b["args"]
    assert not any(a.startswith("--webhook-cert=") for a in b["args"])
    assert "webhook-tls" not in {v["name"] for v in b["pod"]["volumes"]}
    role = one(objs, "Role", component_name("binder"))
    assert {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret],
            "verbs": ["get", "update"]} in role["rules"]
    cluster_role = one(objs, "ClusterRole", component_name("binder"))
    assert {"apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": [mwc["metadata"]["name"]], "verbs": ["get", "patch"]} in cluster_role["rules"]


def test_webhook_cert_manager() -> None:
    objs = render("cert-manager")
    cert = one(objs, "Certificate")
    issuer = one(objs, "Issuer", cert["spec"]["issuerRef"]["name"])
    assert issuer["spec"] == {"selfSigned": {}}
    mwc = webhook_config(objs)
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{NS}/{cert['metadata']['name']}"
    svc = webhook_service_is_the_binders(objs)
    assert f"{svc}.{NS}.svc" in cert["spec"]["dnsNames"]
    b = binder(objs)
    (vol,) = [v for v in b["pod"]["volumes"] if v["name"] == "webhook-tls"]
    assert vol["secret"]["secretName"] == cert["spec"]["secretName"]
    (mount,) = [m for m in b["c"]["volumeMounts"] if m["name"] == "webhook-tls"]
    assert f"--webhook-cert={mount['mountPath']}/tls.crt" in b["args"]
    assert f"--webhook-key={mount['mountPath']}/tls.key" in b["args"]
    assert not any(a.startswith("--webhook-cert-mode") for a in b["args"])
    # cert-manager writes the Secret: the binder needs no access to it, nor to the webhook
    granted = {r for o in find(objs, "Role") + find(objs, "ClusterRole")
               for rule in o["rules"] for r in rule["resources"]}
    assert not granted & {"secrets", "mutatingwebhookconfigurations"}


def test_webhook_provided() -> None:
    objs = render("provided")
    secret = one(objs, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["tls.crt"]).decode() == "CERT"
    (wh,) = webhook_config(objs)["webhooks"]
    assert base64.b64decode(wh["clientConfig"]["caBundle"]).decode() == CA_PEM
    (vol,) = [v for v in binder(objs)["pod"]["volumes"] if v["name"] == "webhook-tls"]
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    existing = render_raw({"binder": {"webhook": {"certs": {
        "mode": "provided", "existingSecret": "mine", "caBundle": CA_PEM}}}})
    assert "kind: Secret" not in existing["hami-bus/templates/webhook.yaml"]
    assert "secretName: mine" in existing["hami-bus/templates/binder.yaml"]
    with pytest.raises(helm.HelmRenderError, match="caBundle"):
        render_raw({"binder": {"webhook": {"certs": {"mode": "provided", "cert": "C", "key": "K"}}}})


# ------------------------------------------------------------------------------------ RBAC

# Every (service, API group, resource, verb) the chart grants, and the module that makes
# that call, with strings of the call that must be found in it. A grant without an entry
# fails, so does an entry whose call is no longer in its module, so does an entry the
# chart no longer grants.
CALL_SITES: dict[tuple[str, str, str, str], tuple[str, tuple[str, ...]]] = {
    ("binder", "", "pods", "get"): ("services/binder/kube.py", ('self.kube.get(path("pods"',)),
    ("binder", "", "pods", "list"): ("services/binder/kube.py", ('list_all(self.kube, path("pods")',)),
    ("binder", "", "pods", "watch"): ("services/binder/kube.py", ("self.kube.watch(", 'path("pods"), self._relist_pods')),
    ("binder", "", "pods", "patch"): ("services/binder/kube.py", ('self.kube.patch(path("pods"',)),
    ("binder", "", "pods/binding", "create"): ("services/binder/kube.py", ('self.kube.post(path("pods", namespace, name, "binding")',)),
    ("binder", "", "pods/eviction", "create"): ("services/binder/defrag.py", ('path("pods", out.namespace, out.name, "eviction")',)),
    ("binder", "", "events", "create"): ("services/binder/kube.py", ("EventSender(self.kube.post)", 'self.events.emit(path("events"')),
    ("binder", "", "resourcequotas", "list"): ("services/binder/kube.py", ('list_all(self.kube, path("resourcequotas"))',)),
    ("binder", "", "resourcequotas", "watch"): ("services/binder/kube.py", ("self.kube.watch(", 'path("resourcequotas"), self._relist_quotas')),
    ("binder", "hami.io", "queues", "list"): ("services/binder/queues.py", ("list_all(self.kube, path(PLURAL, group=GROUP",)),
    ("binder", "hami.io", "queues", "watch"): ("services/binder/queues.py", ("self.watch = ListWatch(", "path(PLURAL, group=GROUP")),
    ("binder", "scheduling.x-k8s.io", "podgroups", "get"): ("services/binder/podgroups.py", ("await self.kube.get(", "path(PLURAL, namespace, name, group=GROUP")),
    ("binder", "scheduling.x-k8s.io", "podgroups", "list"): ("services/binder/podgroups.py", ("list_all(self.kube, path(PLURAL, group=GROUP",)),
    ("binder", "scheduling.x-k8s.io", "podgroups", "watch"): ("services/binder/podgroups.py", ("self.watch = ListWatch(", "path(PLURAL, group=GROUP")),
    ("binder", "coordination.k8s.io", "leases", "get"): ("shared/leader.py", ('path("leases"', "self.kube.get(self._path())")),
    ("binder", "coordination.k8s.io", "leases", "create"): ("shared/leader.py", ('path("leases"', "self.kube.post(self._path(named=False)")),
    ("binder", "coordination.k8s.io", "leases", "update"): ("shared/leader.py", ('path("leases"', 'self.kube.request("PUT", self._path()')),
    ("binder", "", "secrets", "get"): ("services/binder/certs.py", ('"secrets"', ".get(")),
    ("binder", "", "secrets", "create"): ("services/binder/certs.py", ('"secrets"', ".post(")),
    ("binder", "", "secrets", "update"): ("services/binder/certs.py", ('"secrets"', ".put(")),
    ("binder", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "get"): ("services/binder/certs.py", ('"mutatingwebhookconfigurations"', ".get(")),
    ("binder", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch"): ("services/binder/certs.py", ('"mutatingwebhookconfigurations"', ".patch(")),
    ("nodeagent", "", "nodes", "patch"): ("services/nodeagent/kube/annotations.py", ("self.kube.patch(", 'k.path("nodes", name=self.node)')),
    ("inventory", "", "nodes", "list"): ("services/inventory/kube_nodes.py", ('self.kube.get(path("nodes"))',)),
    ("inventory", "", "nodes", "patch"): ("services/inventory/kube_nodes.py", ('self.kube.patch(path("nodes", name=node)',)),
}


def granted_rules() -> set[tuple[str, str, str, str]]:
    """(service, group, resource, verb) over every value set, by who the role is bound to."""
    out = set()
    for name in VALUE_SETS:
        objs = render(name)
        roles = {(o["kind"], o["metadata"]["name"]): o for o in find(objs, "Role") + find(objs, "ClusterRole")}
        for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding"):
            if is_kube_schedulers(b):
                continue  # the upstream binary's grants: test_kube_scheduler_rbac
            role = roles[(b["roleRef"]["kind"], b["roleRef"]["name"])]
            for s in b["subjects"]:
                assert s["kind"] == "ServiceAccount" and s["namespace"] == NS
                service = s["name"].removeprefix(component_name(""))
                out |= {(service, g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                        for r in rule["resources"] for v in rule["verbs"]}
    return out


# Call sites another change is adding (self-managed certificates): the grants are
# rendered for them; the check of their module waits until it lands.
def test_rbac_every_grant_has_a_call_site() -> None:
    granted = granted_rules()
    assert not [g for g in granted if "*" in g], "no wildcards"
    # the others only talk to NATS
    assert {g[0] for g in granted} == {"binder", "nodeagent", "inventory"}
    assert not granted - set(CALL_SITES), f"grants nothing uses: {sorted(granted - set(CALL_SITES))}"
    assert not set(CALL_SITES) - granted, f"stale entries: {sorted(set(CALL_SITES) - granted)}"
    for rule, (module, needles) in CALL_SITES.items():
        text = (ROOT / module).read_text()
        for needle in needles:
            assert needle in text, f"{rule}: {needle!r} not in {module}"


# ------------------------------------------------------------ extender mode (kube-scheduler)

KS = "kube-scheduler"

# The fields of kubescheduler.config.k8s.io/v1 (k8s.io/kube-scheduler/config/v1 and
# k8s.io/component-base/config/v1alpha1) as their Go definitions name and type them:
# the JSON name of each field and its type. A struct's name refers to another entry,
# "[T]" is a list of T, "duration" a metav1.Duration ("30s"). No upstream schema for
# this file exists, and kubernetes-validate cannot see it inside its ConfigMap.
KUBE_SCHEDULER_TYPES: dict[str, dict[str, str]] = {
    "KubeSchedulerConfiguration": {
        "apiVersion": "str", "kind": "str", "parallelism": "int",
        "leaderElection": "LeaderElectionConfiguration",
        "clientConnection": "ClientConnectionConfiguration",
        "enableProfiling": "bool", "enableContentionProfiling": "bool",
        "percentageOfNodesToScore": "int", "podInitialBackoffSeconds": "int",
        "podMaxBackoffSeconds": "int", "profiles": "[KubeSchedulerProfile]",
        "extenders": "[Extender]", "delayCacheUntilActive": "bool",
    },
    "LeaderElectionConfiguration": {
        "leaderElect": "bool", "leaseDuration": "duration", "renewDeadline": "duration",
        "retryPeriod": "duration", "resourceLock": "str", "resourceName": "str",
        "resourceNamespace": "str",
    },
    "ClientConnectionConfiguration": {
        "kubeconfig": "str", "acceptContentTypes": "str", "contentType": "str",
        "qps": "number", "burst": "int",
    },
    "KubeSchedulerProfile": {
        "schedulerName": "str", "percentageOfNodesToScore": "int", "plugins": "object",
        "pluginConfig": "[object]",
    },
    "Extender": {
        "urlPrefix": "str", "filterVerb": "str", "preemptVerb": "str", "prioritizeVerb": "str",
        "weight": "int", "bindVerb": "str", "enableHTTPS": "bool",
        "tlsConfig": "ExtenderTLSConfig", "httpTimeout": "duration", "nodeCacheCapable": "bool",
        "managedResources": "[ExtenderManagedResource]", "ignorable": "bool",
    },
    "ExtenderManagedResource": {"name": "str", "ignoredByScheduler": "bool"},
    "ExtenderTLSConfig": {
        "insecure": "bool", "serverName": "str", "certFile": "str", "keyFile": "str",
        "caFile": "str", "certData": "str", "keyData": "str", "caData": "str",
    },
}
_REQUIRED = {"KubeSchedulerConfiguration": ["apiVersion", "kind"], "Extender": ["urlPrefix"],
             "ExtenderManagedResource": ["name"]}
_SCALARS: dict[str, Obj] = {
    "str": {"type": "string"}, "bool": {"type": "boolean"}, "int": {"type": "integer"},
    "number": {"type": "number"}, "object": {"type": "object"},
    "duration": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"},
}


def kube_scheduler_schema(struct: str = "KubeSchedulerConfiguration") -> Obj:
    """A strict JSON Schema of one struct of KUBE_SCHEDULER_TYPES (unknown fields fail)."""
    def of(t: str) -> Obj:
        if t.startswith("["):
            return {"type": "array", "items": of(t[1:-1])}
        return _SCALARS[t] if t in _SCALARS else kube_scheduler_schema(t)

    return {"type": "object", "additionalProperties": False,
            "required": _REQUIRED.get(struct, []),
            "properties": {k: of(t) for k, t in KUBE_SCHEDULER_TYPES[struct].items()}}


def is_kube_schedulers(obj: Obj) -> bool:
    return bool(obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == KS)


def kube_scheduler_config(objs: list[Obj]) -> Obj:
    cm = one(objs, "ConfigMap", component_name(KS))
    doc = yaml.safe_load(cm["data"]["config.yaml"])
    assert isinstance(doc, dict)
    return doc


def loaded_config(objs: list[Obj]) -> hami_config.Config:
    """The services' configuration as shared/config.py loads it from the rendered ConfigMap."""
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(one(objs, "ConfigMap", f"{RELEASE}-hami-bus-config")["data"]["config.yaml"])
    return hami_config.load(path, env={})


def sidecar(objs: list[Obj]) -> Obj:
    dep = one(objs, "Deployment", component_name("binder"))
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == KS]
    assert isinstance(c, dict)
    return c


def test_extender_is_the_default_mode() -> None:
    sched = values()["scheduler"]
    assert sched["mode"] == "extender"
    assert schema()["properties"]["scheduler"]["properties"]["mode"]["enum"] == \
        list(hami_config.SCHEDULER_MODES)
    defaults = hami_config.SchedulerSettings()
    assert sched["extenderPort"] == defaults.extender_port
    assert sched["extenderReservationTimeout"] == defaults.extender_reservation_timeout


@pytest.mark.parametrize("vals", [
    {},
    {"scheduler": {"extenderPort": 9777}, "schedulerName": "gpu-scheduler",
     "config": {"resources": {"count": "example.com/vgpu", "memory": "example.com/vgpu-mem"}}},
    # two HAMi resources under one name: kube-scheduler refuses a duplicate managed resource
    {"config": {"resources": {"cores": "nvidia.com/gpu"}}},
])
def test_kube_scheduler_config_follows_the_services_config(vals: Obj) -> None:
    objs = [d for path, text in render_raw(vals).items() if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]
    ksc = kube_scheduler_config(objs)
    jsonschema.Draft202012Validator(kube_scheduler_schema()).validate(ksc)
    assert ksc["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert ksc["kind"] == "KubeSchedulerConfiguration"
    cfg = loaded_config(objs)
    (profile,) = ksc["profiles"]
    assert profile["schedulerName"] == cfg.scheduler.scheduler_name == vals.get("schedulerName", "hami-scheduler")
    (ext,) = ksc["extenders"]
    assert ext["urlPrefix"] == f"http://127.0.0.1:{cfg.scheduler.extender_port}"
    assert (ext["filterVerb"], ext["bindVerb"]) == ("filter", "bind")
    assert ext["enableHTTPS"] is False and ext["ignorable"] is False and ext["nodeCacheCapable"] is True
    names = [m["name"] for m in ext["managedResources"]]
    assert len(names) == len(set(names))
    assert set(names) == set(msgspec.to_builtins(cfg.resources).values())
    assert all(m["ignoredByScheduler"] is True for m in ext["managedResources"])
    # the binder listens where the scheduler calls, on the pod's loopback only
    assert "--extender-host=127.0.0.1" in binder(objs)["args"]
    assert not [a for a in binder(objs)["args"] if a.startswith("--extender-port")]  # the config's
    election = ksc["leaderElection"]
    assert election["leaderElect"] is True and election["resourceLock"] == "leases"
    assert election["resourceNamespace"] == NS


@pytest.mark.parametrize("field, value", [
    (("extenders", 0, "urlprefix"), "http://127.0.0.1:8888"),  # misspelt
    (("extenders", 0, "httpTimeout"), 30),  # a Duration is a string
    (("extenders", 0, "managedResources", 0, "ignoredByScheduler"), "true"),
    (("profiles", 0, "scheduler"), "x"),
    (("leaderElection", "resourceNamespaces"), "x"),
])
def test_kube_scheduler_schema_rejects_what_upstream_would(field: tuple[Any, ...], value: Any) -> None:
    """The table above is strict: the check of the rendered file can fail."""
    ksc = kube_scheduler_config(render("defaults"))
    node: Any = ksc
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(kube_scheduler_schema()).validate(ksc)


def test_kube_scheduler_sidecar() -> None:
    objs = render("defaults")
    ks = values()["scheduler"]["kubeScheduler"]
    b, c = binder(objs), sidecar(objs)
    repo, tag = c["image"].rsplit(":", 1)
    assert repo == ks["image"]["repository"] == "registry.k8s.io/kube-scheduler"
    assert tag.startswith("v") and tag.count(".") == 2  # the cluster's version, vX.Y.Z
    (config_arg,) = [a for a in c["args"] if a.startswith("--config=")]
    assert f"--v={ks['verbosity']}" in c["args"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    mount = mounts[str(Path(config_arg.removeprefix("--config=")).parent)]
    (vol,) = [v for v in b["pod"]["volumes"] if v["name"] == mount["name"]]
    cm = one(objs, "ConfigMap", vol["configMap"]["name"])
    assert Path(config_arg).name in cm["data"] and is_kube_schedulers(cm)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        get = probe["httpGet"]
        assert (get["path"], get["scheme"], ports[get["port"]]) == ("/healthz", "HTTPS", 10259)
    assert c["securityContext"] == values()["securityContext"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert b["pod"]["securityContext"]["runAsNonRoot"] is True
    assert c["resources"] == ks["resources"]
    # a change of the scheduler's configuration rolls the binder pod
    annotations = one(objs, "Deployment", component_name("binder"))["spec"]["template"]["metadata"]["annotations"]
    other = render_raw({"scheduler": {"extenderPort": 9000}})["hami-bus/templates/binder.yaml"]
    assert annotations["checksum/kube-scheduler"] not in other


def test_kube_scheduler_tag_override_and_extra_args() -> None:
    out = render_raw({"scheduler": {"kubeScheduler": {
        "image": {"repository": "mirror.example/kube-scheduler", "tag": "v1.31.2"},
        "verbosity": 4, "extraArgs": ["--kube-api-qps=100"]}}})
    dep = next(d for d in yaml.safe_load_all(out["hami-bus/templates/binder.yaml"])
               if d and d["kind"] == "Deployment")
    c = sidecar([dep])
    assert c["image"] == "mirror.example/kube-scheduler:v1.31.2"
    assert c["args"][1:] == ["--v=4", "--kube-api-qps=100"]


@pytest.mark.parametrize("version, tag", [
    ("v1.33.0", "v1.33.0"),
    ("v1.30.4-eks-a737599", "v1.30.4"),
    ("v1.29.6+k3s1", "v1.29.6"),
    ("v1.31.2-gke.1200000", "v1.31.2"),
    ("1.32.1", "v1.32.1"),
])
def test_kube_scheduler_tag_from_the_cluster_version(version: str, tag: str, tmp_path: Path) -> None:
    """The default tag: the version Helm reports for the cluster, without a distribution's
    suffix (registry.k8s.io has only the plain release tags). Rendered by Helm through the
    chart's own helper, in a copy of the chart with one probe template added."""
    import shutil

    shutil.copytree(CHART, tmp_path / "chart")
    (tmp_path / "chart" / "templates" / "tagprobe.yaml").write_text(
        f'tag: {{{{ include "hami-bus.kubeVersionTag" "{version}" }}}}\n'
        'capabilities: {{ include "hami-bus.kubeVersionTag" .Capabilities.KubeVersion.Version }}\n'
        'version: {{ .Capabilities.KubeVersion.Version }}\n'
    )
    out = helm.Chart.load(tmp_path / "chart").render({}, name=RELEASE, namespace=NS, is_install=True)
    probe = yaml.safe_load(out["hami-bus/templates/tagprobe.yaml"])
    assert probe["tag"] == tag
    dep = next(d for d in yaml.safe_load_all(out["hami-bus/templates/binder.yaml"])
               if d and d["kind"] == "Deployment")
    assert sidecar([dep])["image"] == f"registry.k8s.io/kube-scheduler:{probe['capabilities']}"
    assert probe["version"].startswith(probe["capabilities"])


def test_kube_scheduler_tag_needs_a_version(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(CHART, tmp_path / "chart")
    (tmp_path / "chart" / "templates" / "tagprobe.yaml").write_text(
        'tag: {{ include "hami-bus.kubeVersionTag" "latest" }}\n')
    with pytest.raises(helm.HelmRenderError, match="set scheduler.kubeScheduler.image.tag"):
        helm.Chart.load(tmp_path / "chart").render({}, name=RELEASE, namespace=NS, is_install=True)


# What the sidecar is granted, as upstream's "Configure Multiple Schedulers" grants a
# second kube-scheduler: (binding kind, namespace, role kind, role name). These are used
# by the upstream binary, not by our code, so they are listed here instead of in
# CALL_SITES; the lease Role is the one rule of our own.
KUBE_SCHEDULER_GRANTS = {
    ("ClusterRoleBinding", None, "ClusterRole", "system:kube-scheduler"),
    ("ClusterRoleBinding", None, "ClusterRole", "system:volume-scheduler"),
    ("RoleBinding", "kube-system", "Role", "extension-apiserver-authentication-reader"),
    ("RoleBinding", NS, "Role", component_name(KS)),
}


def test_kube_scheduler_rbac() -> None:
    objs = render("defaults")
    bindings = [b for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding") if is_kube_schedulers(b)]
    assert {(b["kind"], b["metadata"].get("namespace"), b["roleRef"]["kind"], b["roleRef"]["name"])
            for b in bindings} == KUBE_SCHEDULER_GRANTS
    assert len(bindings) == len(KUBE_SCHEDULER_GRANTS)
    # the sidecar runs under the binder's ServiceAccount (one per pod)
    sa = one(objs, "Deployment", component_name("binder"))["spec"]["template"]["spec"]["serviceAccountName"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]
    # its Lease, by the name and in the namespace its configuration elects with
    election = kube_scheduler_config(objs)["leaderElection"]
    role = one(objs, "Role", component_name(KS))
    assert role["metadata"]["namespace"] == election["resourceNamespace"]
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": [election["resourceName"]], "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
    # system:kube-scheduler covers only the Lease named kube-scheduler
    assert election["resourceName"] != "kube-scheduler"
    assert {o["metadata"]["name"] for o in find(objs, "Role") + find(objs, "ClusterRole")
            if is_kube_schedulers(o)} == {component_name(KS)}


def test_direct_mode_renders_no_kube_scheduler() -> None:
    objs = render("scheduler-direct")
    assert not [o for o in objs if is_kube_schedulers(o)]
    assert not find(objs, "ConfigMap", component_name(KS))
    assert not [b for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding")
                if b["roleRef"]["name"].startswith(("system:", "extension-apiserver"))]
    b = binder(objs)
    assert [c["name"] for c in b["pod"]["containers"]] == ["binder"]
    assert not [a for a in b["args"] if a.startswith("--extender")]
    assert not [v for v in b["pod"]["volumes"] if KS in v["name"]]
    assert "checksum/kube-scheduler" not in one(objs, "Deployment", component_name("binder"))["spec"]["template"]["metadata"]["annotations"]
    assert loaded_config(objs).scheduler.mode == "direct"


def test_webhookless_binder_keeps_its_sidecar() -> None:
    objs = render("minimal")  # extender mode, binder without its webhook
    assert sidecar(objs) and find(objs, "ConfigMap", component_name(KS))


def test_no_binder_no_kube_scheduler() -> None:
    out = render_raw({"binder": {"enabled": False}})
    assert KS not in "".join(out.values())


# ------------------------------------------------------------------- NATS authentication


def _creds(tmp: Path) -> tuple[Path, Obj]:
    """hami.creds init + secret, run for real as the chart README tells the operator."""
    out = tmp / "creds"
    auth_vals = VALUE_SETS["auth"]["auth"]
    init = ["init", str(out), "--server-name", f"{component_name('nats')}.{NS}.svc",
            "--mount", "/etc/hami/auth", "--store-dir", "/data"]
    for node in auth_vals["nodes"]:
        init += ["--node", node]
    for args in (init, ["secret", str(out), "--name", auth_vals["secretName"], "--namespace", NS]):
        done = subprocess.run([sys.executable, "-m", "hami.creds", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    secret = yaml.safe_load(done.stdout)
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == NS
    for version in KUBE_VERSIONS:
        kv.validate(secret, version, strict=True)
    return out, secret


def _mounted(pod: Obj, container: Obj) -> dict[str, str]:
    """file path in the container -> Secret key, for the auth Secret's items."""
    vols = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in container.get("volumeMounts", []):
        sec = vols.get(m["name"], {}).get("secret")  # a claim template is no volume
        if sec and sec["secretName"] == VALUE_SETS["auth"]["auth"]["secretName"]:
            for item in sec["items"]:
                out[f"{m['mountPath']}/{item['path']}"] = item["key"]
    return out


@pytest.mark.parametrize("args, error", [
    (["--name", "hami-nats-auth"], "run 'python -m hami.creds init' first"),
    (["--name", "Hami_Auth"], "a Secret's name is a DNS subdomain"),
])
def test_creds_secret_refuses_bad_input(args: list[str], error: str, tmp_path: Path) -> None:
    """A directory init did not write, or a name Kubernetes would refuse: one line, exit 2."""
    done = subprocess.run([sys.executable, "-m", "hami.creds", "secret", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and error in done.stderr and not done.stdout


def test_auth_notes() -> None:
    cfg = helm.Config(storage_driver="memory", namespace=NS)
    try:
        rel = cfg.install(chart(), RELEASE, copy.deepcopy(VALUE_SETS["auth"]), namespace=NS,
                          dry_run="client")
    finally:
        cfg.close()
    assert "authentication is OFF" not in rel["notes"]
    assert "get secret hami-nats-auth -o jsonpath='{.data.cli\\.nk}'" in rel["notes"]


def test_auth_off_by_default_mounts_nothing() -> None:
    for _, c in our_containers(render("defaults")):
        assert "HAMI_NATS_SEED" not in env(c)
    conf = one(render("defaults"), "ConfigMap", f"{component_name('nats')}-config")
    assert "include" not in conf["data"]["nats.conf"]


def test_auth_nodeagent_needs_the_nodes() -> None:
    with pytest.raises(Exception, match="auth.nodes"):
        render_raw({"auth": {"enabled": True, "secretName": "s"}})
    render_raw({"auth": {"enabled": True, "secretName": "s"}, "nodeagent": {"enabled": False}})


def test_auth_each_pod_mounts_its_own_seed(tmp_path: Path) -> None:
    _, secret = _creds(tmp_path)
    keys = set(secret["data"])
    assert "ca.key" not in keys and not any(":" in k for k in keys)
    objs = render("auth")
    nodes = VALUE_SETS["auth"]["auth"]["nodes"]
    seen = set()
    for w, c in our_containers(objs):
        pod = w["spec"]["template"]["spec"]
        files = _mounted(pod, c)
        assert set(files.values()) <= keys, w["metadata"]["name"]
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        seeds = {k for k in files.values() if k.endswith(".nk")}
        seed = env(c)["HAMI_NATS_SEED"]
        if component == "nodeagent":
            assert seeds == {f"nodeagent.{n}.nk" for n in nodes}
            for n in nodes:  # Kubernetes' $(VAR) expansion with the pod's spec.nodeName
                path = seed.replace("$(HAMI_NODE_NAME)", n)
                assert files[path] == f"nodeagent.{n}.nk"
        else:
            assert seeds == {f"{component}.nk"}, w["metadata"]["name"]
            assert files[seed] == f"{component}.nk"
        assert files[env(c)["HAMI_NATS_CA"]] == "ca.crt"
        seen.add(component)
    assert seen == set(SERVICES)
    sts = one(objs, "StatefulSet", component_name("nats"))
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    files = _mounted(sts["spec"]["template"]["spec"], c)
    assert set(files.values()) == {"nats-server.conf", "server.crt", "server.key", "ca.crt"}
    conf = one(objs, "ConfigMap", f"{component_name('nats')}-config")["data"]["nats.conf"]
    config_dir = c["command"][c["command"].index("--config") + 1].rsplit("/", 1)[0]
    include = conf.split('include "', 1)[1].split('"', 1)[0]
    assert files[os.path.normpath(f"{config_dir}/{include}")] == "nats-server.conf"
    text = base64.b64decode(secret["data"]["nats-server.conf"]).decode()
    for name in ("server.crt", "server.key", "ca.crt"):  # the TLS paths init wrote are mounted
        assert f'"/etc/hami/auth/{name}"' in text and f"/etc/hami/auth/{name}" in files


def test_auth_nats_server_admits_the_placement_seed(tmp_path: Path) -> None:
    """The chart's nats.conf (including the Secret's file), the Secret's files laid out as
    the pods see them, under tmp_path; placement connects with the seed the chart mounts."""
    import asyncio
    import socket

    import nats
    import nats.errors

    _, secret = _creds(tmp_path)
    objs = render("auth")
    root = tmp_path / "root"
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}

    def remap(text: str) -> str:
        return text.replace("/etc/", f"{root}/etc/").replace("/var/run/", f"{root}/var/run/")

    sts = one(objs, "StatefulSet", component_name("nats"))
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    for path, key in _mounted(sts["spec"]["template"]["spec"], c).items():
        dest = Path(remap(path))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(remap(files[key].decode()).encode())
    conf = one(objs, "ConfigMap", f"{component_name('nats')}-config")["data"]["nats.conf"]
    # One server, not the rendered three-server cluster: its routes name pods that are not here.
    conf = conf.split("cluster {", 1)[0].replace("store_dir: /data", f'store_dir: "{tmp_path}/data"')
    conf_file = Path(remap(c["command"][c["command"].index("--config") + 1]))
    conf_file.parent.mkdir(parents=True, exist_ok=True)
    conf_file.write_text(remap(conf))
    (root / "var/run/nats").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([natsserver.find_binary(), "-c", str(conf_file), "-a", "127.0.0.1",
                             "-p", str(port), "-m", "0"],
                            env={"SERVER_NAME": "nats-0"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        dep = one(objs, "Deployment", component_name("placement"))
        (pc,) = [x for x in dep["spec"]["template"]["spec"]["containers"] if x["name"] == "placement"]
        mounted = _mounted(dep["spec"]["template"]["spec"], pc)
        for path, key in mounted.items():
            Path(remap(path)).parent.mkdir(parents=True, exist_ok=True)
            Path(remap(path)).write_bytes(files[key])
        from shared import bus

        seed, ca = remap(env(pc)["HAMI_NATS_SEED"]), remap(env(pc)["HAMI_NATS_CA"])

        async def connect(seed_file: str) -> None:
            opts = bus.connect_options(auth_creds(seed_file, ca))
            nc = await nats.connect(f"nats://localhost:{port}", connect_timeout=2,
                                    max_reconnect_attempts=0, allow_reconnect=False, **opts)
            try:
                # placement may write the ledger: its permissions came through the include
                await nc.flush(timeout=5)
            finally:
                await nc.close()

        async def attempt() -> None:
            for _ in range(50):
                try:
                    await connect(seed)
                    return
                except Exception:
                    if proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.2)
            await connect(seed)

        asyncio.run(attempt())
        # An unknown seed is refused: the server really checks (authorization included).
        (tmp_path / "other.nk").write_text(auth_new_seed())
        with pytest.raises((nats.errors.Error, OSError)):
            asyncio.run(connect(str(tmp_path / "other.nk")))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def auth_creds(seed_file: str, ca: str) -> Any:
    from shared import auth

    return auth.Credentials(role="placement", seed_file=seed_file, tls_ca=ca)


def auth_new_seed() -> str:
    from shared import auth

    return auth.new_user_seed() + "\n"
