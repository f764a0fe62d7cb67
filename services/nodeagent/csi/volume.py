"""Which slice directory a CSI publish is for, checked before anything touches the disk.

Pure. The webhook declares, per GPU container, an ephemeral inline volume of our driver
with ``volumeAttributes: {container: <name>}``; with ``podInfoOnMount`` the kubelet adds
the pod's UID (its own value wins over anything the pod spec says). Both end up in a
host path, so both are checked to be one plain path component of the shapes Kubernetes
gives them; the target path must be the kubelet's, for that same pod.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass

from services.nodeagent.csi.v1 import EPHEMERAL, POD_UID
from services.nodeagent.slices import dir_name

DRIVER = "slices.hami.io"
"""Our CSI driver name (the CSIDriver object's name; the volumes' ``csi.driver``)."""
CONTAINER_ATTR = "container"

# Pod UIDs are UUIDs; accept any single component of letters, digits, '-' and '_'
# (so no '/', no '.', nothing that could climb out of the containers directory).
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Container names are RFC 1123 labels.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class PublishError(ValueError):
    """The request cannot be for one of our slices (answered INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class SliceVolume:
    pod_uid: str
    container: str
    target: str

    @property
    def dir_name(self) -> str:
        return dir_name(self.pod_uid, self.container)


def check_target(target: str) -> str:
    if not target or not target.startswith("/"):
        raise PublishError(f"target_path must be an absolute path, not {target!r}")
    if posixpath.normpath(target) != target or "\0" in target:
        raise PublishError(f"target_path {target!r} is not a normalised path")
    return target


def parse_publish(volume_context: Mapping[str, str], target_path: str) -> SliceVolume:
    """The slice a NodePublishVolume asks for; :class:`PublishError` if it is not one."""
    if volume_context.get(EPHEMERAL) != "true":
        raise PublishError(
            f"{DRIVER} serves only ephemeral inline volumes (the webhook declares them); "
            "is the CSIDriver's volumeLifecycleModes [Ephemeral] with podInfoOnMount: true?"
        )
    uid = volume_context.get(POD_UID, "")
    if not _UID.fullmatch(uid):
        raise PublishError(f"{POD_UID} {uid!r} is missing or not a pod UID (podInfoOnMount?)")
    container = volume_context.get(CONTAINER_ATTR, "")
    if not _LABEL.fullmatch(container):
        raise PublishError(
            f"volume attribute {CONTAINER_ATTR!r} {container!r} is missing or not a container name"
        )
    target = check_target(target_path)
    # The kubelet's target is <root>/pods/<podUID>/volumes/kubernetes.io~csi/<vol>/mount:
    # a volume is only ever published into its own pod.
    if f"/pods/{uid}/volumes/" not in target:
        raise PublishError(f"target_path {target!r} is not a volume path of pod {uid}")
    return SliceVolume(uid, container, target)
