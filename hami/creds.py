"""The credentials ``hami up`` makes for itself: a local CA, the server's certificate, an
nkey per role, and the nats-server configuration that admits them.

Everything lives in ``auth/`` beside the state file (``~/.hami/auth`` by default,
``$HAMI_STATE_FILE``'s directory otherwise), made once and reused, every secret file
0600. Revoking a role (``hami creds --revoke ROLE``) deletes its seed, rewrites the
server's configuration without it and reloads the running server: the server closes
the role's connections; the role's next seed is a new key.

``python -m hami.creds init DIR`` makes a deployment's credentials once (compose, the
chart) and ``python -m hami.creds secret DIR --name NAME`` prints them as the Kubernetes
Secret the chart mounts (``auth.secretName``), without the CA's private key.

The one-shot commands find their ``cli`` identity the same way, or from
``$HAMI_NATS_SEED`` (a seed file), ``$HAMI_NATS_ROLE`` and ``$HAMI_NATS_CA``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from shared import auth, pki, subjects
from shared.files import replace_file

SERVER_NAMES = ("127.0.0.1", "localhost", "::1")


def default_dir() -> Path:
    from hami import state

    return state.path().parent / "auth"


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    replace_file(path, data, 0o600)


def _make_tls(root: Path, ca_file: Path, cert: Path, key: Path, names: Iterable[str]) -> None:
    """A CA (its key kept beside it, as ``ca.key``) and a server key pair for ``names``,
    unless all three files are there already: reruns never rotate."""
    if ca_file.exists() and cert.exists() and key.exists():
        return
    ca = pki.new_ca()
    server = pki.new_server_cert(ca, names, common_name="nats")
    _write_secret(root / "ca.key", ca.key)
    _write_secret(key, server.key)
    _write_secret(cert, server.cert)
    _write_secret(ca_file, ca.cert)


class Store:
    """The CA, server key pair and role seeds under ``root`` (created on first use)."""

    def __init__(self, root: Path | None = None, *, tls: bool = True) -> None:
        self.root = root or default_dir()
        self.tls = tls

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    def seed_file(self, role: str) -> Path:
        auth.parse_role(role)
        return self.root / "nkeys" / f"{auth.identity(role)}.nk"

    def _mkdir(self) -> None:
        # Made 0700 before anything goes in: nobody else lists the roles or the keys.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def seed(self, role: str) -> str:
        """The role's seed, made the first time it is asked for."""
        self._mkdir()
        path = self.seed_file(role)
        if not path.exists():
            _write_secret(path, auth.new_user_seed().encode() + b"\n")
        return path.read_text().strip()

    def tls_files(self) -> auth.TlsFiles:
        """The CA and the server's key pair, made the first time."""
        self._mkdir()
        cert, key = self.root / "server.crt", self.root / "server.key"
        _make_tls(self.root, self.ca_file, cert, key, SERVER_NAMES)
        return auth.TlsFiles(ca=str(self.ca_file), cert=str(cert), key=str(key))

    def credentials(self, role: str) -> auth.Credentials:
        self.seed(role)
        return auth.Credentials(
            role=role,
            seed_file=str(self.seed_file(role)),
            tls_ca=str(self.ca_file) if self.tls else "",
        )

    def server_config(self, roles: Iterable[str], port: int = 4222) -> str:
        """The server configuration admitting exactly ``roles`` (TLS if switched on)."""
        users = {role: auth.public_key(self.seed(role)) for role in roles}
        return auth.server_config(
            users, tls=self.tls_files() if self.tls else None, port=port
        )


def roles_for(nodes: Iterable[str]) -> list[str]:
    """Every role of a ``hami up`` with these node agents."""
    return [*auth.FIXED_ROLES, *(f"{auth.NODEAGENT}:{n}" for n in nodes)]


def client_credentials(role: str = auth.CLI) -> auth.Credentials | None:
    """The identity a one-shot command connects with; None where there is none (a
    server without authorization, ``hami up --no-auth``)."""
    seed = os.environ.get("HAMI_NATS_SEED")
    if seed:
        return auth.Credentials(role=os.environ.get("HAMI_NATS_ROLE", role), seed_file=seed,
                                tls_ca=os.environ.get("HAMI_NATS_CA", ""))
    from hami import state

    try:
        st = state.read()
    except state.StateError:
        return None
    root = st.get("auth_dir")
    if not root:
        return None
    return Store(Path(root), tls=bool(st.get("tls", True))).credentials(role)


def revoke(store: Store, role: str, nats_pid: int | None, config: Path) -> None:
    """Forget ``role``'s key and have the running server drop it (SIGHUP reload)."""
    import signal

    path = store.seed_file(role)
    path.unlink(missing_ok=True)
    roles = [r.stem for r in (store.root / "nkeys").glob("*.nk")]
    text = config.read_text()
    port = _port_of(text)
    # Roles are stored by identity; the file name is the role (":" kept by token()).
    new = store.server_config(roles, port=port)
    _write_secret(config, new.encode())
    if nats_pid:
        os.kill(nats_pid, signal.SIGHUP)


def _port_of(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("port:"):
            return int(line.split(":", 1)[1])
    return 4222


# ---------------------------------------------------------------- the hami command


def up_store(no_auth: bool, external_nats: bool) -> Store | None:
    """``hami up``'s credentials: on for its embedded server unless ``--no-auth``
    (an outside server has its own authorization, given by ``$HAMI_NATS_SEED``)."""
    return None if no_auth or external_nats else Store()


def up_state(store: Store | None, nats_config: Path | None) -> dict[str, object]:
    """What the state file records so the other commands find their identity."""
    if store is None:
        return {}
    return {"auth_dir": str(store.root), "tls": store.tls,
            "nats_config": str(nats_config) if nats_config else None}


def up_lines(store: Store | None, url: str) -> list[str]:
    if store is None:
        return ["Auth:    off (--no-auth): any client on the port may do anything"]
    ca = store.ca_file
    return [
        f"Auth:    nkeys + TLS (CA {ca}); a read-only identity of the event stream:",
        "         hami creds reader > reader.nk",
        f"         nats -s {url} --nkey reader.nk --tlsca {ca} --inbox-prefix _INBOX.reader \\",
        f"              sub --stream {auth.EVENTS} 'hami.evt.>'",
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", help="reader, cli, admin, a service, or nodeagent:<node>")
    p.add_argument("--revoke", action="store_true",
                   help="forget the role's key and cut its connections off (reloads the server)")


def cmd_creds(args: argparse.Namespace) -> int:
    """Print a role's nkey seed (the secret a client connects with), or revoke it."""
    from hami import state

    try:
        auth.parse_role(args.role)
    except ValueError as exc:
        print(f"hami creds: {exc}", file=sys.stderr)
        return 2
    try:
        st = state.read()
    except state.StateError:
        st = {}
    store = Store(Path(st["auth_dir"])) if st.get("auth_dir") else Store()
    if args.revoke:
        config = st.get("nats_config")
        if not config:
            print("hami creds: no running 'hami up' with authorization to revoke from",
                  file=sys.stderr)
            return 1
        revoke(store, args.role, st.get("nats_pid"), Path(config))
        print(f"revoked {args.role}", file=sys.stderr)
        return 0
    if not store.seed_file(args.role).exists() and st.get("auth_dir"):
        print(f"hami creds: the running server does not know {args.role}; "
              "it admits the roles it started with", file=sys.stderr)
        return 1
    print(store.seed(args.role))
    return 0


# ------------------------------------------------ a deployment's credentials, made once


def init(out: Path, nodes: Iterable[str], server_names: Iterable[str], *,
         host: str = "0.0.0.0", port: int = 4222, store_dir: str = "/data",
         mount: str | None = None) -> Path:
    """Write a deployment's credentials under ``out``: the CA, the server's certificate
    for ``server_names``, one seed per role (``nkeys/<role>.nk``) and
    ``nats-server.conf`` (its file paths under ``mount``, where the server will see
    ``out``). Existing keys are kept: running it again adds roles, never rotates."""
    store = Store(out)
    store._mkdir()
    names = [*server_names, *SERVER_NAMES]
    cert, key = out / "server.crt", out / "server.key"
    _make_tls(out, store.ca_file, cert, key, names)
    at = Path(mount) if mount else out
    users = {role: auth.public_key(store.seed(role)) for role in roles_for(nodes)}
    tls = auth.TlsFiles(ca=str(at / "ca.crt"), cert=str(at / "server.crt"), key=str(at / "server.key"))
    conf = out / "nats-server.conf"
    _write_secret(conf, auth.server_config(users, tls=tls, host=host, port=port,
                                           store_dir=store_dir).encode())
    return conf


# Kubernetes Secret keys: what `kubectl create secret` accepts (no ':' as in a node
# agent's file name, nkeys/nodeagent:<node>.nk).
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
# What a deployment's NATS server and services need; ca.key is left out on purpose: the
# CA's private key signs server certificates and stays with the operator.
SECRET_FILES = ("ca.crt", "server.crt", "server.key", "nats-server.conf")
# Where the chart mounts the Secret in the NATS pod (helm/hami-bus/templates/nats.yaml):
# init --mount must name it, the server's TLS paths are read from there.
CHART_MOUNT = "/etc/hami/auth"


def secret_key(role: str) -> str:
    """A role's seed as a Secret key: ``nodeagent:sim-1`` -> ``nodeagent.sim-1.nk``."""
    auth.parse_role(role)
    key = role.replace(":", ".") + ".nk"
    if not _SECRET_KEY.fullmatch(key) or len(key) > 253:
        raise ValueError(f"{role}: {key!r} is not a valid Kubernetes Secret key "
                         "(a node name must be a DNS subdomain)")
    return key


def secret_data(out: Path) -> dict[str, bytes]:
    """Secret key -> content for what :func:`init` wrote under ``out`` (never ca.key)."""
    missing = [name for name in SECRET_FILES if not (out / name).is_file()]
    if missing:
        raise ValueError(f"{out}: no {', '.join(missing)}: run 'python -m hami.creds init' first")
    data = {name: (out / name).read_bytes() for name in SECRET_FILES}
    seeds = sorted((out / "nkeys").glob("*.nk"))
    if not seeds:
        raise ValueError(f"{out}/nkeys: no seeds: run 'python -m hami.creds init' first")
    for path in seeds:
        # The file is named by the role's subject token; a node name with dots was escaped.
        role = subjects.unescape(path.stem)
        if auth.identity(role) != path.stem:
            raise ValueError(f"{path}: not a seed file init wrote")
        data[secret_key(role)] = path.read_bytes()
    return data


def secret_manifest(out: Path, name: str, namespace: str | None = None) -> dict[str, object]:
    """A Kubernetes Secret holding :func:`secret_data`, ready for ``kubectl apply -f -``."""
    if not _DNS_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        raise ValueError(f"--name {name!r}: a Secret's name is a DNS subdomain "
                         "(lower case letters, digits, '-' and '.')")
    meta: dict[str, object] = {"name": name,
                               "labels": {"app.kubernetes.io/part-of": "hami-bus"}}
    if namespace:
        if not _DNS_LABEL.fullmatch(namespace) or len(namespace) > 63:
            raise ValueError(f"--namespace {namespace!r}: not a valid namespace name")
        meta["namespace"] = namespace
    data = secret_data(out)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _cmd_secret(args: argparse.Namespace) -> int:
    try:
        doc = secret_manifest(args.dir, args.name, args.namespace)
    except ValueError as exc:
        print(f"hami.creds secret: {exc}", file=sys.stderr)
        return 2
    conf = (args.dir / "nats-server.conf").read_text()
    if f'"{CHART_MOUNT}/server.crt"' not in conf:
        # Not an error: the Secret may serve a NATS run outside the chart.
        print(f"hami.creds secret: note: nats-server.conf's TLS files are not under "
              f"{CHART_MOUNT}, where the chart's NATS pod reads them "
              f"(init --mount {CHART_MOUNT})", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        import yaml

        print("# " + f"python -m hami.creds secret {args.dir} --name {args.name}: "
              "keep it out of version control (it holds every role's seed)")
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hami.creds",
        description="make a deployment's NATS credentials (compose, the chart's Secrets)")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="CA, server certificate, a seed per role, nats-server.conf")
    i.add_argument("out", type=Path, help="directory to write (kept: keys are never rotated)")
    i.add_argument("--node", action="append", default=[], help="a node agent's node, repeatable")
    i.add_argument("--server-name", action="append", default=[],
                   help="a DNS name or IP of the server, repeatable (e.g. nats)")
    i.add_argument("--mount", default=None, help="where the server sees OUT (default: OUT)")
    i.add_argument("--store-dir", default="/data", help="the server's JetStream directory")
    s = sub.add_parser("secret", help="print a Kubernetes Secret of what init wrote (no ca.key)")
    s.add_argument("dir", type=Path, help="the directory init wrote")
    s.add_argument("--name", required=True, help="the Secret's name (the chart's auth.secretName)")
    s.add_argument("--namespace", default=None, help="the Secret's namespace (the release's)")
    s.add_argument("--output", "-o", choices=("yaml", "json"), default="yaml")
    args = p.parse_args(argv)
    if args.cmd == "secret":
        return _cmd_secret(args)
    conf = init(args.out, args.node, args.server_name, mount=args.mount, store_dir=args.store_dir)
    print(conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
