"""``hami demo --mixed``: a pod per vendor on a cluster of one simulated node per vendor.

Every pod must be placed on cards of the family it asked (and the node that has them),
the two-container pod on the one node with both an A100 and an MLU, each container on its
own family's card; the text names each pod's cards and vendors.
"""

from __future__ import annotations

import json
import subprocess

from hami.demo import mixed_asks, mixed_nodes
from tests.system.test_cli import HAMI


def test_demo_mixed_json_every_pod_on_its_vendors_cards() -> None:
    r = subprocess.run(
        [*HAMI, "demo", "--mixed", "--json"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    asks = mixed_asks()
    assert out["placed"] == out["total"] == len(asks) == len(mixed_nodes()) + 1
    vendor_nodes: dict[str, set[str]] = {}
    for node, specs in out["nodes"].items():
        for spec in ",".join(specs).split(","):
            vendor_nodes.setdefault(spec.split(":")[0], set()).add(node)
    for name, pod in out["pods"].items():
        assert pod["ok"], (name, pod)
        asked = {a["container"]: a["vendor"] for a in pod["asked"]}
        assert asked == {c: a.vendor for c, a in asks[name]}
        for c in pod["containers"]:
            assert c["devices"], (name, c)
            assert {d["vendor"] for d in c["devices"]} == {asked[c["container"]]}, (name, c)
    two = out["pods"]["pod-two-vendors"]
    assert "MLU370-X4" in ",".join(out["nodes"][two["node"]]) and "A100" in ",".join(
        out["nodes"][two["node"]]
    )
    for fam, spec in mixed_nodes():
        pod = out["pods"][f"pod-{fam.lower()}"]
        assert pod["node"] in vendor_nodes[spec.split(":")[0]], (fam, pod["node"])


def test_demo_mixed_text_names_who_got_what() -> None:
    r = subprocess.run([*HAMI, "demo", "--mixed"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == f"{len(mixed_asks())}/{len(mixed_asks())} pods placed"
    npu = next(ln for ln in lines if ln.strip().startswith("pod-ascend910b3 "))
    assert "Ascend910B3" in npu and "->" in npu
    assert any(ln.strip().startswith("pod-two-vendors/mlu -> ") and " MLU " in ln for ln in lines)
