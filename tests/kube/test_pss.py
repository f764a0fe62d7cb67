"""A GPU pod mutated by our webhook still passes the Pod Security Standards.

The checks below are the published Pod Security Standards (kubernetes.io, "Pod Security
Standards"), one checker per control, ``baseline`` and ``restricted``: a restricted-compliant
GPU pod, once mutated by :func:`services.binder.webhook.mutate_pod`, must pass all of them
(so it is admitted in a namespace labelled ``pod-security.kubernetes.io/enforce:
restricted``). Each checker is also shown a pod that breaks its control, so none of them
passes everything.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from services.binder.webhook import WebhookSettings, mutate_pod

Obj = dict[str, Any]

CONTAINER_GROUPS = ("initContainers", "containers", "ephemeralContainers")

# baseline: capabilities a container may add.
BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# restricted: the only volume types allowed.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}


def containers(pod: Obj) -> Iterator[Obj]:
    spec = pod.get("spec") or {}
    for g in CONTAINER_GROUPS:
        yield from spec.get(g) or []


def psc(pod: Obj) -> Obj:
    return (pod.get("spec") or {}).get("securityContext") or {}


def csc(c: Obj) -> Obj:
    return c.get("securityContext") or {}


def contexts(pod: Obj) -> Iterator[Obj]:
    """The pod's security context, then every container's."""
    yield psc(pod)
    for c in containers(pod):
        yield csc(c)


# --------------------------------------------------------------------------- baseline


def host_process(pod: Obj) -> bool:
    return all(not (sc.get("windowsOptions") or {}).get("hostProcess") for sc in contexts(pod))


def host_namespaces(pod: Obj) -> bool:
    spec = pod.get("spec") or {}
    return not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))


def privileged(pod: Obj) -> bool:
    return all(not csc(c).get("privileged") for c in containers(pod))


def capabilities_baseline(pod: Obj) -> bool:
    return all(
        set((csc(c).get("capabilities") or {}).get("add") or []) <= BASELINE_CAPS
        for c in containers(pod)
    )


def host_path(pod: Obj) -> bool:
    return all("hostPath" not in v for v in (pod.get("spec") or {}).get("volumes") or [])


def host_ports(pod: Obj) -> bool:
    return all(not p.get("hostPort") for c in containers(pod) for p in c.get("ports") or [])


def apparmor(pod: Obj) -> bool:
    ok_types = {None, "RuntimeDefault", "Localhost"}
    if any((sc.get("appArmorProfile") or {}).get("type") not in ok_types for sc in contexts(pod)):
        return False
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    return all(
        v == "runtime/default" or v.startswith("localhost/")
        for k, v in ann.items()
        if k.startswith("container.apparmor.security.beta.kubernetes.io/")
    )


def selinux(pod: Obj) -> bool:
    for sc in contexts(pod):
        o = sc.get("seLinuxOptions") or {}
        if o.get("type", "") not in SELINUX_TYPES or o.get("user") or o.get("role"):
            return False
    return True


def proc_mount(pod: Obj) -> bool:
    return all(csc(c).get("procMount") in (None, "Default") for c in containers(pod))


def seccomp_baseline(pod: Obj) -> bool:
    return all((sc.get("seccompProfile") or {}).get("type") != "Unconfined" for sc in contexts(pod))


def sysctls(pod: Obj) -> bool:
    return all(s.get("name") in SAFE_SYSCTLS for s in psc(pod).get("sysctls") or [])


# ------------------------------------------------------------------------- restricted


def volume_types(pod: Obj) -> bool:
    for v in (pod.get("spec") or {}).get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds or not kinds <= RESTRICTED_VOLUMES:
            return False
    return True


def privilege_escalation(pod: Obj) -> bool:
    return all(csc(c).get("allowPrivilegeEscalation") is False for c in containers(pod))


def run_as_non_root(pod: Obj) -> bool:
    pod_level = psc(pod).get("runAsNonRoot")
    if pod_level is False:
        return False
    for c in containers(pod):
        v = csc(c).get("runAsNonRoot")
        if v is False or (v is None and pod_level is not True):
            return False
    return True


def run_as_user(pod: Obj) -> bool:
    return all(sc.get("runAsUser", 1) != 0 for sc in contexts(pod))


def seccomp_restricted(pod: Obj) -> bool:
    ok = {"RuntimeDefault", "Localhost"}
    pod_type = (psc(pod).get("seccompProfile") or {}).get("type")
    for c in containers(pod):
        t = (csc(c).get("seccompProfile") or {}).get("type")
        if t is None:
            t = pod_type
        if t not in ok:
            return False
    return pod_type is None or pod_type in ok


def capabilities_restricted(pod: Obj) -> bool:
    for c in containers(pod):
        caps = csc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            return False
        if not set(caps.get("add") or []) <= {"NET_BIND_SERVICE"}:
            return False
    return True


# --------------------------------------------------------------------------- the table


def set_in(path: str, value: Any) -> Callable[[Obj], None]:
    """Set a dotted path (``spec.hostPID``, ``c0.securityContext.privileged`` for the
    first GPU container) to ``value``."""

    def apply(pod: Obj) -> None:
        keys = path.split(".")
        obj: Any = pod["spec"]["containers"][0] if keys[0] == "c0" else pod
        for k in keys[1 if keys[0] == "c0" else 0 : -1]:
            obj = obj.setdefault(k, {})
        obj[keys[-1]] = value

    return apply


def add_volume(v: Obj) -> Callable[[Obj], None]:
    return lambda pod: pod["spec"].setdefault("volumes", []).append(v)


@dataclass(frozen=True)
class Rule:
    level: str
    control: str
    check: Callable[[Obj], bool]
    violate: Callable[[Obj], None]


RULES = [
    Rule("baseline", "HostProcess", host_process, set_in("c0.securityContext.windowsOptions", {"hostProcess": True})),
    Rule("baseline", "Host Namespaces", host_namespaces, set_in("spec.hostPID", True)),
    Rule("baseline", "Privileged Containers", privileged, set_in("c0.securityContext.privileged", True)),
    Rule("baseline", "Capabilities", capabilities_baseline, set_in("c0.securityContext.capabilities.add", ["SYS_ADMIN"])),
    Rule("baseline", "HostPath Volumes", host_path, add_volume({"name": "h", "hostPath": {"path": "/usr/local/vgpu/containers"}})),
    Rule("baseline", "Host Ports", host_ports, set_in("c0.ports", [{"containerPort": 80, "hostPort": 80}])),
    Rule("baseline", "AppArmor", apparmor, set_in("c0.securityContext.appArmorProfile", {"type": "Unconfined"})),
    Rule("baseline", "SELinux", selinux, set_in("spec.securityContext.seLinuxOptions", {"type": "spc_t"})),
    Rule("baseline", "/proc Mount Type", proc_mount, set_in("c0.securityContext.procMount", "Unmasked")),
    Rule("baseline", "Seccomp", seccomp_baseline, set_in("c0.securityContext.seccompProfile", {"type": "Unconfined"})),
    Rule("baseline", "Sysctls", sysctls, set_in("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}])),
    Rule("restricted", "Volume Types", volume_types, add_volume({"name": "n", "nfs": {"server": "s", "path": "/"}})),
    Rule("restricted", "Privilege Escalation", privilege_escalation, set_in("c0.securityContext.allowPrivilegeEscalation", True)),
    Rule("restricted", "Running as Non-root", run_as_non_root, set_in("c0.securityContext.runAsNonRoot", False)),
    Rule("restricted", "Running as Non-root user", run_as_user, set_in("c0.securityContext.runAsUser", 0)),
    Rule("restricted", "Seccomp", seccomp_restricted, set_in("spec.securityContext.seccompProfile", {"type": "Unconfined"})),
    Rule("restricted", "Capabilities", capabilities_restricted, set_in("c0.securityContext.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]})),
]
IDS = [f"{r.level}:{r.control}" for r in RULES]


def restricted_container(name: str, **limits: str) -> Obj:
    c: Obj = {
        "name": name,
        "image": "cuda-app",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if limits:
        c["resources"] = {"limits": {f"nvidia.com/{k}": v for k, v in limits.items()}}
    return c


def restricted_gpu_pod() -> Obj:
    """A pod a restricted namespace admits: two GPU containers (one init), one plain."""
    return {
        "metadata": {"name": "train", "namespace": "ml"},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": [restricted_container("warm", gpu="1")],
            "containers": [
                restricted_container("main", gpu="2", gpumem="4000"),
                restricted_container("log"),
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def mutated() -> Obj:
    out = mutate_pod(restricted_gpu_pod(), WebhookSettings(overwrite_env=True))
    assert out is not None
    return out


def test_the_original_pod_is_restricted_compliant() -> None:
    pod = restricted_gpu_pod()
    assert [r.control for r in RULES if not r.check(pod)] == []


def test_the_mutated_gpu_pod_passes_every_rule() -> None:
    pod = mutated()
    # The webhook did wire the slices (else the test would prove nothing).
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["data", "hami-slice-0", "hami-slice-1"]
    failed = [f"{r.level}:{r.control}" for r in RULES if not r.check(pod)]
    assert failed == []


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_each_checker_catches_its_violation(rule: Rule) -> None:
    pod = copy.deepcopy(mutated())
    rule.violate(pod)
    assert not rule.check(pod)


def test_the_former_hostpath_wiring_fails_baseline() -> None:
    pod = mutated()
    pod["spec"]["volumes"].append(
        {"name": "hami-slices", "hostPath": {"path": "/usr/local/vgpu/containers", "type": "DirectoryOrCreate"}}
    )
    failed = {r.control for r in RULES if not r.check(pod)}
    assert failed == {"HostPath Volumes", "Volume Types"}
