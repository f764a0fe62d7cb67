"""compose/docker-compose.yml run for real, without a container engine.

No docker daemon is available here (nor in CI), so the compose file's own commands and
environments are run as plain processes: the ``creds`` service's command writes the
credentials, nats-server starts from the configuration it wrote, and every service
runs its compose command with its compose environment. Only what a container would
change is mapped: the ``/auth`` and ``/data`` volumes to temporary directories, the
``nats`` host name and port to the local server. A submit with the ``cli`` seed must be
placed through all of them, and a service given another role's seed is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.natsserver import EmbeddedNats

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def remap(text: str, auth: Path, data: Path, url: str) -> str:
    return (text.replace("nats://nats:4222", url)
                .replace("/auth", str(auth)).replace("/data", str(data)))


def hami_env(svc: dict[str, Any], auth: Path, data: Path, url: str) -> dict[str, str]:
    env = {k: remap(str(v), auth, data, url) for k, v in svc.get("environment", {}).items()}
    return {**os.environ, **env, "PYTHONPATH": str(ROOT)}


def test_compose_services_run_under_their_own_credentials(tmp_path: Path) -> None:
    doc = compose()
    services = doc["services"]
    auth, data = tmp_path / "auth", tmp_path / "data"
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    url = server.url

    init = [remap(str(c), auth, data, url) for c in services["creds"]["command"]]
    assert init[:3] == ["python", "-m", "hami.creds"]
    done = subprocess.run([sys.executable, *init[1:]], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    nats_cmd = services["nats"]["command"]
    conf = Path(remap(nats_cmd[nats_cmd.index("-c") + 1], auth, data, url))
    # The local server's own -a/-p apply over the file's; its -sd may not be given twice.
    text = conf.read_text()
    assert f'store_dir: "{data}"' in text
    server.configure(text.replace(f'store_dir: "{data}"', ""))
    server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for svc in services.values():
            cmd = [str(c) for c in svc.get("command", [])]
            if cmd[:2] != ["python", "-m"] or not cmd[2].startswith("services."):
                continue
            replicas = int(svc.get("deploy", {}).get("replicas", 1))
            for _ in range(replicas):
                procs.append(subprocess.Popen(
                    [sys.executable, *cmd[1:], "--health-port", "0"],
                    env=hami_env(svc, auth, data, url), cwd=ROOT,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))
        # The cli's seed, as compose/README.md tells a user to copy it out of the volume.
        cli_env = {**os.environ, "HAMI_NATS_SEED": str(auth / "nkeys" / "cli.nk"),
                   "HAMI_NATS_CA": str(auth / "ca.crt"), "PYTHONPATH": str(ROOT)}
        nodes: set[str] = set()
        for _ in range(60):
            st = subprocess.run([sys.executable, "-m", "hami.cli", "status", "--json", "--nats-url", url],
                env=cli_env, capture_output=True, text=True, timeout=30,
            )
            if st.returncode == 0:
                nodes = {n["node"] for n in yaml.safe_load(st.stdout)["nodes"]}
                if nodes == {"sim-1", "sim-2", "sim-3"}:
                    break
            time.sleep(0.5)
        assert nodes == {"sim-1", "sim-2", "sim-3"}, st.stderr
        sub = subprocess.run([sys.executable, "-m", "hami.cli", "submit", "job-1", "--mem-percent", "25", "--json",
             "--nats-url", url],
            env=cli_env, capture_output=True, text=True, timeout=60,
        )
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert yaml.safe_load(sub.stdout)["node"] in nodes
        for p in procs:
            assert p.poll() is None, f"{p.args} exited {p.returncode}"
        # A node agent with the wrong node's seed cannot register (server-side refusal):
        # compose gives each agent its own.
        wrong = {**hami_env(services["node-1"], auth, data, url),
                 "HAMI_NATS_SEED": str(auth / "nkeys" / "nodeagent:sim-2.nk"),
                 "HAMI_NATS_ROLE": "nodeagent:sim-2"}
        bad = subprocess.Popen(
            [sys.executable, "-m", "services.nodeagent", "--node", "sim-9", "--sim-gpus",
             "A100-80GB:1:81920", "--health-port", "0"],
            env=wrong, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        procs.append(bad)
        time.sleep(3)
        st = subprocess.run([sys.executable, "-m", "hami.cli", "status", "--json", "--nats-url", url],
            env=cli_env, capture_output=True, text=True, timeout=30,
        )
        assert "sim-9" not in {n["node"] for n in yaml.safe_load(st.stdout)["nodes"]}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        server.cleanup()


@pytest.mark.parametrize("name", ["inventory", "placement", "binder", "metrics", "node-1", "node-2", "node-3"])
def test_each_compose_service_gets_its_own_seed(name: str) -> None:
    svc = compose()["services"][name]
    seed = svc["environment"]["HAMI_NATS_SEED"]
    cmd = svc["command"]
    role = f"nodeagent:{cmd[cmd.index('--node') + 1]}" if "--node" in cmd else name
    assert seed == f"/auth/nkeys/{role}.nk"
    assert "auth:/auth:ro" in svc["volumes"]
