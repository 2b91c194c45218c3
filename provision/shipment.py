"""What the operator's side ships to nodes besides the secrets: the proxies' and the control plane's TLS
certificates (from the cluster CA), the control plane's tokens and the mbworker wheelhouse (workers and the system
node install it). All live in the state directory; every provider renders nodes with the same ones.

`Shipment` owns producing them lazily (a plan that creates no proxy issues no certificate, one that creates no
worker builds no wheels) and caches them for one apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mbworker.control.endpoint import ENDPOINT_FILE, server_name, write_endpoint

from . import desired as d
from .render import NodeAddr, NodeContext
from .secrets import control_tokens
from .spec import ClusterSpec
from .tls import LocalCa, load_or_create_ca
from .wheels import Wheelhouse, build_wheelhouse


@dataclass
class Shipment:
    spec: ClusterSpec
    state_dir: Path
    #: A prebuilt wheelhouse (tests); None builds the running mbworker's into the state dir on first use, for
    #: every CPU architecture the spec's servers run on.
    wheelhouse_override: Wheelhouse | None = None
    _wheels: Wheelhouse | None = field(default=None, init=False, repr=False)
    _pem: dict[tuple[str, ...], str] = field(default_factory=dict, init=False, repr=False)

    def ca(self) -> LocalCa:
        return load_or_create_ca(self.state_dir, self.spec.name)

    def proxy_names(self) -> list[str]:
        """The DNS names a proxy's certificate covers: the public domain if any, else the cluster's own name."""
        return [self.spec.proxy.domain] if self.spec.proxy.domain else [f"{self.spec.name}.cluster.internal"]

    def proxy_pem(self, public_ips: tuple[str, ...] = ()) -> str:
        """Certificate chain + key for a proxy, valid for `proxy_names()` and the given public addresses."""
        key = tuple(public_ips)
        if key not in self._pem:
            self._pem[key] = self.ca().issue(self.proxy_names(), list(public_ips))
        return self._pem[key]

    def control_pem(self, public_ips: tuple[str, ...] = ()) -> str:
        """Certificate chain + key for the control plane: its DNS name (`control.endpoint.server_name`, what the
        CLI verifies) and the system node's public address when it is known before the server exists."""
        return self.ca().issue([server_name(self.spec.name)], list(public_ips))

    def record_control(self, public_ip: str | None) -> None:
        """Tell the CLI where the control plane is (`<state dir>/control.json`): the system node's public address,
        the cluster CA and the certificate's name; with no system node, forget it."""
        if public_ip is None:
            (self.state_dir / ENDPOINT_FILE).unlink(missing_ok=True)
            return
        write_endpoint(
            self.state_dir,
            f"https://{public_ip}" + ("" if d.CONTROL_PUBLIC_PORT == 443 else f":{d.CONTROL_PUBLIC_PORT}"),
            ca_file=self.ca().cert_path,
            name=server_name(self.spec.name),
        )

    def control_tokens(self) -> tuple[str, str]:
        """(control token, node token)."""
        return control_tokens(self.state_dir)

    def wheels(self) -> Wheelhouse:
        if self._wheels is None:
            self._wheels = self.wheelhouse_override or build_wheelhouse(self.state_dir, d.architectures(self.spec))
        return self._wheels

    def node_context(
        self,
        want: d.DesiredServer,
        *,
        workers: tuple[NodeAddr, ...],
        nodes: tuple[NodeAddr, ...],
        public_ip: str | None = None,
        floating_ip: str = "",
    ) -> NodeContext:
        """What `render.user_data` needs for `want`: only what its role uses is produced (certificates, wheels).
        Proxies' certificates name their public address and the floating IP, which every proxy owns."""
        ips = tuple(ip for ip in (public_ip, floating_ip if want.role == "proxy" else "") if ip)
        control, node = self.control_tokens() if want.role in ("system", "proxy", "worker") else ("", "")
        return NodeContext(
            workers=workers,
            nodes=nodes,
            tls_pem=self.proxy_pem(ips) if want.role == "proxy" else "",
            wheels=self.wheels() if want.role in ("worker", "system") else None,
            control_pem=self.control_pem(ips) if want.role == "system" else "",
            control_token=control if want.role == "system" else "",
            node_token=node,
            floating_ip=floating_ip if want.role == "proxy" else "",
        )
