"""What the operator's side ships to nodes besides the secrets: the proxies' TLS certificate (from the cluster CA)
and the worker wheelhouse. Both live in the state directory; every provider renders nodes with the same ones.

`Shipment` owns producing them lazily (a plan that creates no proxy issues no certificate, one that creates no
worker builds no wheels) and caches them for one apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import desired as d
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

    def wheels(self) -> Wheelhouse:
        if self._wheels is None:
            self._wheels = self.wheelhouse_override or build_wheelhouse(self.state_dir, d.architectures(self.spec))
        return self._wheels
