"""The credentials ``hami up`` makes for itself: a local CA, the server's certificate, an
nkey per role, and the nats-server configuration that admits them.

Everything lives in one directory (``$HAMI_STATE_DIR``, else ``~/.hami``), made once
and reused, every secret file 0600. Revoking a role is deleting its seed file and
restarting ``hami up`` (or rewriting the configuration and reloading the server): the
role's next key is a new one, and the old one no longer authenticates.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from shared import auth

SERVER_NAMES = ("127.0.0.1", "localhost", "::1")


def state_dir() -> Path:
    env = os.environ.get("HAMI_STATE_DIR")
    return Path(env) if env else Path.home() / ".hami"


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Store:
    """The CA, server key pair and role seeds under ``root`` (created on first use)."""

    def __init__(self, root: Path | None = None, *, tls: bool = True) -> None:
        self.root = (root or state_dir()) / "auth"
        self.tls = tls

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    def seed_file(self, role: str) -> Path:
        auth.parse_role(role)
        return self.root / "nkeys" / f"{auth.identity(role)}.nk"

    def seed(self, role: str) -> str:
        """The role's seed, made the first time it is asked for."""
        path = self.seed_file(role)
        if not path.exists():
            _write_secret(path, auth.new_user_seed().encode() + b"\n")
        return path.read_text().strip()

    def tls_files(self) -> auth.TlsFiles:
        """The CA and the server's key pair, made the first time."""
        cert, key = self.root / "server.crt", self.root / "server.key"
        if not (self.ca_file.exists() and cert.exists() and key.exists()):
            ca = auth.new_ca()
            server = auth.new_server_cert(ca, SERVER_NAMES)
            _write_secret(self.root / "ca.key", ca.key)
            _write_secret(key, server.key)
            _write_secret(cert, server.cert)
            _write_secret(self.ca_file, ca.cert)
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
