"""The proxy's edges on the shared machines cluster: the spec's floating IP, created before the proxies and routed
to proxy 1 as Hetzner routes it, is owned by the proxy's OS (mbfloating-ip.service), so a client that uses it gets
the proxy's own TLS (its certificate names the address) and the :80 redirect.
"""

from __future__ import annotations

import ssl

import httpx
import pytest

from mbworker.provision import desired as d

from .conftest import Cluster

pytestmark = pytest.mark.slow


def test_the_floating_ip_answers_as_the_proxy(cluster: Cluster) -> None:
    proxy = d.server_name(cluster.spec.name, "proxy", 1)
    assert cluster.wait_cloud_init(proxy) == "status: done"
    fip = cluster.provider.load()["floating_ips"][d.floating_ip_name(cluster.spec)]
    assert fip["server_id"] == cluster.server(proxy)["id"]
    owned = cluster.provider.exec(proxy, ["ip", "-4", "-o", "addr", "show"]).stdout
    assert f" {fip['ip']}/32 " in owned, owned
    tls = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.pem"))
    with httpx.Client(verify=tls, timeout=10) as client:
        # HAProxy's own answer (no worker involved): the address reaches the proxy, with a certificate for it
        assert client.get(f"https://{fip['ip']}/elsewhere").json() == {"code": "not_found", "message": "no route"}
        plain = client.get(f"http://{fip['ip']}/functions/v1/x")
        assert plain.status_code == 301
        assert plain.headers["location"] == f"https://{fip['ip']}/functions/v1/x"
