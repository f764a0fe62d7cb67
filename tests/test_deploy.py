"""Deployment artefacts: Dockerfile, compose/, helm/hami-bus — fast, offline checks.

No docker engine or helm binary is needed (nor available in CI): these parse what can be
parsed as plain YAML and check what the templates reference against the code — modules,
flags, configuration fields, values — and that RBAC stays least-privilege.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from shared import runner

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
CHART = ROOT / "helm" / "hami-bus"
TEMPLATES = CHART / "templates"
SERVICES = ("inventory", "placement", "binder", "metrics", "nodeagent")
DEPLOYMENTS = ("inventory", "placement", "binder", "metrics")  # the node agent is a DaemonSet
MODULE_RE = re.compile(r"\bservices\.([a-z_]+)\b")


def module_exists(name: str) -> bool:
    return (ROOT / "services" / name / "__main__.py").is_file()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def template_texts() -> dict[str, str]:
    files = sorted(TEMPLATES.glob("*.yaml")) + sorted(TEMPLATES.glob("*.tpl"))
    files += sorted(TEMPLATES.glob("*.txt"))
    return {p.name: p.read_text() for p in files}


def encode_names(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(struct)}


# ------------------------------------------------------------------------------ compose


def compose() -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def service_commands() -> dict[str, list[str]]:
    """Compose service -> command, for the services that run one of ours."""
    out = {}
    for name, svc in compose()["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd[:2] == ["python", "-m"] and str(cmd[2]).startswith("services."):
            out[name] = [str(c) for c in cmd]
    return out


def test_compose_runs_nats_with_jetstream() -> None:
    nats = compose()["services"]["nats"]
    assert nats["image"].split(":")[0] == "nats"
    # JetStream, TLS and the users come from the file creds writes (run for real in
    # tests/system/test_compose.py).
    assert nats["command"][nats["command"].index("-c") + 1] == "/auth/nats-server.conf"
    assert nats["depends_on"]["creds"]["condition"] == "service_completed_successfully"
    assert "4222:4222" in nats["ports"]


def test_compose_commands_name_existing_modules() -> None:
    cmds = service_commands()
    modules = {c[2] for c in cmds.values()}
    assert modules == {f"services.{s}" for s in SERVICES}
    for name, cmd in cmds.items():
        assert module_exists(cmd[2].removeprefix("services.")), f"{name}: {cmd[2]}"


def test_compose_topology() -> None:
    services = compose()["services"]
    assert services["placement"]["deploy"]["replicas"] == 2
    assert "9394:9394" in services["metrics"]["ports"]
    nodes = sorted(
        c[c.index("--node") + 1]
        for c in service_commands().values()
        if c[2] == "services.nodeagent"
    )
    assert nodes == ["sim-1", "sim-2", "sim-3"]
    for name, cmd in service_commands().items():
        env = services[name]["environment"]
        assert env["HAMI_NATS_URL"] == "nats://nats:4222", name
        if cmd[2] == "services.nodeagent":
            assert cmd[cmd.index("--sim-gpus") + 1] == "A100-80GB:4:81920"


# Flags the deployment needs that a service does not accept yet. Remove the entry when it
# lands (strict: the test then fails as XPASS until this is cleaned up).
PENDING_FLAGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=PENDING_FLAGS[n], strict=True))
        if n in PENDING_FLAGS
        else n
        for n in sorted(service_commands())
    ],
)
def test_compose_flags_are_accepted(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each compose command parses with the service's own argument parser."""
    cmd = service_commands()[name]
    main = importlib.import_module(f"{cmd[2]}.__main__").main
    seen: list[Any] = []

    def fake_run(svc: str, args: Any, make: Any) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(runner, "run", fake_run)
    try:
        assert main(cmd[3:]) == 0
    except SystemExit as exc:  # argparse: unknown flag
        pytest.fail(f"{name}: `{' '.join(cmd)}` is rejected by {cmd[2]} (exit {exc.code})")
    assert len(seen) == 1


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_builds_limiter_and_copies_what_exists() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "python:3.11-slim" in text
    assert "make" in text and "gcc" in text
    assert re.search(r"COPY --from=\w+ \S*libvgpu\.so /usr/local/vgpu/libvgpu\.so", text)
    assert "pip wheel" in text or "pip install" in text
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        path = src.rstrip("/")
        assert (ROOT / path).exists(), f"COPY {src}: not in the repository"
        assert path not in ignored, f"COPY {src}: excluded by .dockerignore"


# ------------------------------------------------------------------------------ helm
# The chart is linted, rendered and validated by real Helm in tests/test_helm.py; these
# are the checks of values.yaml and the template sources a render does not make.


def values() -> dict[str, Any]:
    doc = load_yaml(CHART / "values.yaml")
    assert isinstance(doc, dict)
    return doc


def test_chart_needs_nothing_from_the_network() -> None:
    """Helm refuses to install a chart whose dependencies are not under charts/; NATS is
    part of the chart instead (templates/nats.yaml)."""
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "hami-bus"
    for dep in chart.get("dependencies") or []:
        assert not dep.get("repository", "").startswith(("http", "oci:")), dep
    nats = values()["nats"]
    assert nats["enabled"] is True
    assert (TEMPLATES / "nats.yaml").is_file()


def test_values_every_service_switchable_and_scalable() -> None:
    v = values()
    for svc in SERVICES:
        assert isinstance(v[svc]["enabled"], bool), svc
        assert "resources" in v[svc], svc
    for svc in DEPLOYMENTS:
        assert isinstance(v[svc]["replicas"], int) and v[svc]["replicas"] >= 1, svc
    assert v["placement"]["replicas"] >= 2
    assert v["schedulerName"] == "hami-scheduler"
    assert v["nodeagent"]["nodeSelector"] == {"gpu": "on"}
    assert v["binder"]["webhook"]["failurePolicy"] == "Ignore"


def test_template_values_references_exist() -> None:
    """A misspelt .Values path renders as empty without an error: every one must exist."""
    v = values()
    for name, text in template_texts().items():
        for ref in set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text)):
            node: Any = v
            for part in ref.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: .Values.{ref}"
                node = node[part]
