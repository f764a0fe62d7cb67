"""``python -m services.binder``: run the binder service alone against a NATS server.

Standalone (default): decisions are bound at once; direct clients are served.

Kubernetes mode (``--kube``): watch pods with our scheduler name, write HAMi's
annotations, create Bindings (see :mod:`services.binder.kube`). The API server is found
by ``--kube-host URL`` (no auth; tests), ``--in-cluster`` (service account),
``--kubeconfig PATH`` (or ``$KUBECONFIG``, or ``~/.kube/config``), else in-cluster.

``scheduler.mode`` (configuration) chooses how pending pods are scheduled: ``direct``
(default here; the binder requests every pending pod with our schedulerName itself) or
``extender`` (the upstream kube-scheduler calls the binder's HTTP extender, ``POST
/filter`` and ``POST /bind`` on ``--extender-host``:``--extender-port``, default
0.0.0.0:``scheduler.extenderPort`` = 8888; see :mod:`services.binder.extender`).

Admission webhook: ``--webhook-cert FILE --webhook-key FILE`` serves HTTPS on
``--webhook-port`` (9443) at ``/mutate`` (see :mod:`services.binder.webhook`).
``--webhook-cert-mode=self-managed --webhook-secret S --webhook-config C`` (with
``--kube``) makes and rotates the certificate itself (see :mod:`services.binder.certs`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from services.binder.service import BinderService
from shared import runner
from shared.bus import Bus
from shared.config import Config


class KubeMode:
    """The Kubernetes binder and/or the webhook, started and stopped as one service."""

    def __init__(self, bus: Bus, cfg: Config, args: argparse.Namespace) -> None:
        self.bus, self.cfg, self.args = bus, cfg, args
        self.parts: list[object] = []
        self.kube: object | None = None

    async def start(self) -> None:
        from services.binder.kube import KubeBinder
        from services.binder.webhook import WebhookServer, WebhookSettings
        from shared.kube import connect_from

        a = self.args
        if a.kube:
            kube = await connect_from(a)
            self.kube = kube
            binder = KubeBinder(self.bus, self.cfg, kube, extender_host=a.extender_host,
                                extender_port=a.extender_port)
            await binder.start(serve_api=not a.no_api, leader=leader_for(a, kube, binder))
            self.parts.append(binder)
        else:
            svc = BinderService(self.bus, self.cfg)
            await svc.start()
            self.parts.append(svc)
        certfile, keyfile = a.webhook_cert, a.webhook_key
        if a.webhook_cert_mode == "self-managed":
            certfile, keyfile = await self._self_managed_certs()
        if certfile:
            if not keyfile:
                raise SystemExit("binder: --webhook-cert needs --webhook-key")
            hook = WebhookServer(WebhookSettings.from_config(self.cfg, a.overwrite_env),
                                 certfile=certfile, keyfile=keyfile,
                                 host=a.webhook_host, port=a.webhook_port,
                                 kube=self.kube)  # type: ignore[arg-type]
            await hook.start()
            self.parts.append(hook)

    async def _self_managed_certs(self) -> tuple[str, str]:
        """Start the certificate manager (Secret + caBundle); the files it writes."""
        from services.binder.certs import CertManager
        from shared.kube import KubeError
        from shared.leader import pod_namespace

        a = self.args
        if self.kube is None or not a.webhook_secret or not a.webhook_config:
            raise SystemExit("binder: --webhook-cert-mode=self-managed needs --kube, "
                             "--webhook-secret and --webhook-config")
        certs = CertManager(self.kube, pod_namespace(), a.webhook_secret,  # type: ignore[arg-type]
                            a.webhook_config, service=a.webhook_service,
                            interval=a.webhook_cert_check)
        try:
            await certs.start()
        except KubeError as exc:
            await certs.stop()
            raise SystemExit(f"binder: self-managed webhook certificate: {exc}") from None
        self.parts.append(certs)  # stopped after the webhook (parts stop in reverse)
        return certs.certfile, certs.keyfile

    def ready_checks(self) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        for p in self.parts:
            checks = getattr(p, "ready_checks", None)
            if callable(checks):
                out.extend(checks())
        return out

    async def stop(self) -> None:
        for p in reversed(self.parts):
            await p.stop()  # type: ignore[attr-defined]
        self.parts.clear()
        if self.kube is not None:
            await self.kube.close()  # type: ignore[attr-defined]


def leader_for(a: argparse.Namespace, kube: Any, binder: Any) -> Any:
    """The Lease elector gating the binder's watches (None: --no-leader-elect)."""
    if not a.leader_elect:
        return None
    from shared.election import Timing
    from shared.leader import LeaderElector, pod_namespace

    timing = Timing(a.lease_duration, a.renew_deadline, a.retry_period)
    return LeaderElector(kube, a.lease_namespace or pod_namespace(), a.lease_name,
                         on_start=binder.start_watches, on_stop=binder.stop_watches,
                         timing=timing)


def parser() -> argparse.ArgumentParser:
    p = runner.common_args("python -m services.binder")
    k = p.add_argument_group("Kubernetes mode")
    k.add_argument("--kube", action="store_true", help="watch pods and bind them in Kubernetes")
    runner.kube_flags(k)
    k.add_argument("--no-api", action="store_true", help="do not serve hami.api.submit/release")
    k.add_argument("--extender-host", default="0.0.0.0",
                   help="scheduler.mode extender: address of the kube-scheduler extender")
    k.add_argument("--extender-port", type=int, default=None,
                   help="scheduler.mode extender: its port (default scheduler.extenderPort, 8888)")
    le = p.add_argument_group("leader election (--kube: the pod watch runs on one replica)")
    le.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                    help="hold a coordination.k8s.io Lease while watching (default on)")
    le.add_argument("--lease-name", default="hami-binder")
    le.add_argument("--lease-namespace", default=None,
                    help="default: the pod's namespace (service account, $POD_NAMESPACE)")
    le.add_argument("--lease-duration", type=float, default=15.0, help="seconds")
    le.add_argument("--renew-deadline", type=float, default=10.0, help="seconds")
    le.add_argument("--retry-period", type=float, default=2.0, help="seconds")
    w = p.add_argument_group("admission webhook")
    w.add_argument("--webhook-cert", default=None, help="TLS certificate file (enables the webhook)")
    w.add_argument("--webhook-key", default=None, help="TLS key file")
    w.add_argument("--webhook-cert-mode", choices=("files", "self-managed"), default="files",
                   help="self-managed: keep a CA and certificate in --webhook-secret and the CA "
                        "in --webhook-config's caBundle, renewed before expiry (needs --kube)")
    w.add_argument("--webhook-secret", default=None, help="self-managed: the TLS Secret's name")
    w.add_argument("--webhook-config", default=None,
                   help="self-managed: the MutatingWebhookConfiguration's name")
    w.add_argument("--webhook-service", default=None,
                   help="self-managed: the Service name (default: from the configuration)")
    w.add_argument("--webhook-cert-check", type=float, default=3600.0,
                   help="self-managed: seconds between checks of the Secret (rotation)")
    w.add_argument("--webhook-host", default="0.0.0.0")
    w.add_argument("--webhook-port", type=int, default=9443)
    w.add_argument("--overwrite-env", action="store_true",
                   help="NVIDIA_VISIBLE_DEVICES=none for containers without HAMi resources")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    async def make(bus: Bus, cfg: Config) -> KubeMode:
        return KubeMode(bus, cfg, args)

    return runner.run("binder", args, make)


if __name__ == "__main__":
    sys.exit(main())
