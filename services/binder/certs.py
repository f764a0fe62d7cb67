"""The binder's self-managed webhook certificate (``--webhook-cert-mode=self-managed``).

Without cert-manager the binder keeps its own CA and serving certificate in one
``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``, ``ca.crt``) and the CA in the
``caBundle`` of every webhook of its MutatingWebhookConfiguration, so the API server
trusts what the webhook serves.

Pure parts: :func:`dns_names`, :func:`check` (is a stored bundle usable for these names
and not expiring within the renew window) and :func:`generate` (a new CA plus serving
certificate). :class:`CertManager` is the thin I/O: read the configuration (it names the
Service), read or create/update the Secret with the read ``resourceVersion`` as
precondition (a 409 means another replica wrote first: read theirs and use it, so
replicas converge on one certificate), patch the caBundles, write the pair to private
files that :class:`~services.binder.webhook.WebhookServer` reloads, and repeat on a timer.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from shared import pki
from shared.files import replace_file
from shared.kube import JSON_PATCH, Conflict, Kube, KubeError, NotFound, path

log = logging.getLogger("hami.binder.certs")

ADMISSION = "admissionregistration.k8s.io"
CA_DAYS = 3650
CERT_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=30)
SECRET_TYPE = "kubernetes.io/tls"

Obj = dict[str, Any]


# ------------------------------------------------------------------------------ pure


@dataclass(frozen=True)
class Bundle:
    """PEM bytes as stored in the Secret; ``ca`` may hold more than one certificate."""

    ca: bytes
    crt: bytes
    key: bytes

    def secret_data(self) -> dict[str, str]:
        return {k: base64.b64encode(v).decode() for k, v in
                (("ca.crt", self.ca), ("tls.crt", self.crt), ("tls.key", self.key))}

    @classmethod
    def from_secret(cls, secret: Obj) -> Bundle | None:
        """The bundle in a Secret's ``.data``, or None when a key is missing or not base64."""
        data = secret.get("data") or {}
        try:
            return cls(*(base64.b64decode(data[k], validate=True)
                         for k in ("ca.crt", "tls.crt", "tls.key")))
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def ca_bundle(self) -> str:
        """The configuration's ``caBundle``: base64 of the CA PEM."""
        return base64.b64encode(self.ca).decode()


def dns_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def check(b: Bundle | None, names: list[str], now: dt.datetime,
          renew_before: dt.timedelta = RENEW_BEFORE) -> str | None:
    """Why the bundle cannot be kept (a short reason), or None when it is good."""
    if b is None:
        return "missing or not base64"
    try:
        crt = x509.load_pem_x509_certificate(b.crt)
        cas = x509.load_pem_x509_certificates(b.ca)
        key = serialization.load_pem_private_key(b.key, password=None)
    except ValueError as exc:
        return f"unparseable ({exc})"
    if key.public_key() != crt.public_key():
        return "tls.key does not match tls.crt"
    try:
        sans = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    missing = set(names) - set(sans.value.get_values_for_type(x509.DNSName))
    if missing:
        return f"subjectAltName lacks {sorted(missing)}"
    issuer = next((ca for ca in cas if _issued_by(crt, ca)), None)
    if issuer is None:
        return "tls.crt is not signed by ca.crt"
    end = min(crt.not_valid_after_utc, issuer.not_valid_after_utc)
    if end - now <= renew_before:
        return f"expires {end:%Y-%m-%d}, within the renew window"
    if crt.not_valid_before_utc > now + dt.timedelta(minutes=5):
        return "not valid yet"
    return None


def _issued_by(crt: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        crt.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def generate(names: list[str], now: dt.datetime, *, previous: Bundle | None = None,
             ca_days: int = CA_DAYS, cert_days: int = CERT_DAYS) -> Bundle:
    """A new CA (its key is thrown away: the next rotation makes a new CA) and a serving
    certificate for ``names``. ``previous``'s first CA, while still valid, stays in
    ``ca.crt`` so handshakes with the old certificate keep verifying until every
    replica has loaded the new one."""
    ca = pki.new_ca(f"hami-webhook-ca@{int(now.timestamp())}", days=ca_days, now=now)
    served = pki.new_server_cert(ca, names, days=cert_days, now=now)
    ca_pem = ca.cert
    if previous is not None:
        try:
            old = x509.load_pem_x509_certificates(previous.ca)[0]
            if old.not_valid_after_utc > now:
                ca_pem += old.public_bytes(serialization.Encoding.PEM)
        except (ValueError, IndexError):
            pass  # garbage: nothing worth trusting
    return Bundle(ca_pem, served.cert, served.key)


def service_of(config: Obj) -> tuple[str, str] | None:
    """(name, namespace) of the first webhook that calls a Service."""
    for w in config.get("webhooks") or []:
        svc = (w.get("clientConfig") or {}).get("service") or {}
        if svc.get("name") and svc.get("namespace"):
            return str(svc["name"]), str(svc["namespace"])
    return None


def ca_bundle_patch(config: Obj, ca_bundle: str) -> list[Obj]:
    """JSON patch ops setting every webhook's caBundle that differs; each guarded by a
    ``test`` of the webhook's name, so a reordered list fails instead of being mixed up."""
    ops: list[Obj] = []
    for i, w in enumerate(config.get("webhooks") or []):
        if (w.get("clientConfig") or {}).get("caBundle") == ca_bundle:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": w.get("name")})
        # "add" replaces an existing member and creates a missing one (RFC 6902).
        ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_bundle})
    return ops


# ------------------------------------------------------------------------------- I/O


class CertManager:
    """Keeps the Secret, the caBundles and the served files in step."""

    def __init__(self, kube: Kube, namespace: str, secret: str, config: str, *,
                 service: str | None = None, interval: float = 3600.0,
                 renew_before: dt.timedelta = RENEW_BEFORE, directory: str | None = None) -> None:
        self.kube = kube
        self.namespace, self.secret, self.config = namespace, secret, config
        self.service = service
        self.interval = interval
        self.renew_before = renew_before
        self.dir = Path(directory or tempfile.mkdtemp(prefix="hami-webhook-tls-"))
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # mkdtemp already does; a given directory may not
        self.bundle: Bundle | None = None
        self.syncs = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def certfile(self) -> str:
        return str(self.dir / "tls.crt")

    @property
    def keyfile(self) -> str:
        return str(self.dir / "tls.key")

    def _secret_path(self, named: bool = True) -> str:
        return path("secrets", self.namespace, self.secret if named else None)

    def _config_path(self) -> str:
        return path("mutatingwebhookconfigurations", name=self.config, group=ADMISSION)

    async def put(self, resource_path: str, body: Obj) -> Any:
        # Kube has no PUT shortcut; an update with the read resourceVersion.
        return await self.kube.request("PUT", resource_path, body=body)

    async def sync(self) -> Bundle:
        """One round: Secret, caBundles, files. Raises KubeError."""
        config = await self.kube.get(self._config_path())
        found = service_of(config)
        if self.service:
            found = (self.service, found[1] if found else self.namespace)
        if found is None:
            raise KubeError(0, "NoService", f"mutatingwebhookconfiguration {self.config} "
                            "has no webhook with clientConfig.service")
        names = dns_names(*found)
        bundle = await self._ensure_secret(names)
        ops = ca_bundle_patch(config, bundle.ca_bundle)
        if ops:
            await self.kube.patch(self._config_path(), ops, JSON_PATCH)
            log.info("caBundle of %d webhook(s) in %s updated", len(ops) // 2, self.config)
        self._write(bundle)
        self.bundle = bundle
        self.syncs += 1
        return bundle

    async def _ensure_secret(self, names: list[str]) -> Bundle:
        now = dt.datetime.now(dt.UTC)
        try:
            secret: Obj | None = await self.kube.get(self._secret_path())
        except NotFound:
            secret = None
        if secret is None:
            bundle = generate(names, now)
            body = {"apiVersion": "v1", "kind": "Secret", "type": SECRET_TYPE,
                    "metadata": {"name": self.secret, "namespace": self.namespace},
                    "data": bundle.secret_data()}
            try:
                await self.kube.post(self._secret_path(named=False), body)
                log.info("webhook certificate created in secret %s/%s", self.namespace, self.secret)
                return bundle
            except Conflict:
                return await self._theirs()  # another replica created it first
        old = Bundle.from_secret(secret)
        why = check(old, names, now, self.renew_before)
        if why is None and old is not None:
            return old
        bundle = generate(names, now, previous=old)
        body = dict(secret, type=SECRET_TYPE, data=bundle.secret_data())
        body.pop("stringData", None)
        try:
            await self.put(self._secret_path(), body)  # carries the read resourceVersion
        except Conflict:
            return await self._theirs()  # another replica rotated it first
        log.info("webhook certificate in secret %s/%s renewed: %s", self.namespace, self.secret, why)
        return bundle

    async def _theirs(self) -> Bundle:
        bundle = Bundle.from_secret(await self.kube.get(self._secret_path()))
        if bundle is None:
            raise KubeError(0, "Invalid", f"secret {self.namespace}/{self.secret} holds no TLS data")
        return bundle

    def _write(self, b: Bundle) -> None:
        if self.bundle == b and Path(self.certfile).exists():
            return  # unchanged: the webhook's reload sees nothing new
        # Key first, each file replaced whole: the webhook's reload sees either pair, and
        # a mismatched moment is refused by its scratch-context check until both land.
        for name, data in (("tls.key", b.key), ("tls.crt", b.crt)):
            replace_file(self.dir / name, data, 0o600)

    async def start(self) -> None:
        """The first round (its errors are raised) and the timer."""
        await self.sync()
        if self.interval > 0:
            self._task = asyncio.create_task(self._loop(), name="webhook-cert-rotate")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync()
            except KubeError as exc:
                log.warning("webhook certificate not checked (retry in %.0fs): %s", self.interval, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        shutil.rmtree(self.dir, ignore_errors=True)
