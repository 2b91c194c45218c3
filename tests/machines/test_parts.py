"""The machines provider's pure parts: label selectors as the planner writes them, cloud rules as nftables."""

from __future__ import annotations

from mbworker.provision.facts import Rule
from mbworker.provision.machines import _selects
from mbworker.provision.machines_image import template_packages
from mbworker.provision.machines_net import _nft_rule


def test_label_selectors_match_like_hetzner() -> None:
    proxy = {"cluster": "c", "role": "proxy"}
    assert _selects("cluster=c,role in (proxy,system)", proxy)
    assert not _selects("cluster=c,role in (system)", proxy)
    assert not _selects("cluster=d,role in (proxy,system)", proxy)
    assert _selects("cluster=c,role=proxy", proxy)
    assert not _selects("cluster=c,role=nat", proxy)


def test_cloud_rules_become_nftables_matches() -> None:
    anywhere = ("0.0.0.0/0", "::/0")
    assert _nft_rule("198.18.0.3", Rule("in", "tcp", "443", anywhere)) == "ip daddr 198.18.0.3 tcp dport 443"
    assert _nft_rule("198.18.0.3", Rule("in", "icmp", None, anywhere)) == "ip daddr 198.18.0.3 ip protocol icmp"
    ssh = Rule("in", "tcp", "22", ("203.0.113.0/24", "2001:db8::/32"))
    assert _nft_rule("198.18.0.3", ssh) == "ip daddr 198.18.0.3 ip saddr { 203.0.113.0/24 } tcp dport 22"
    assert _nft_rule("198.18.0.3", Rule("in", "tcp", "8000-8010", anywhere)).endswith("tcp dport 8000-8010")


def test_the_image_follows_the_templates_packages() -> None:
    packages = template_packages()
    assert "prometheus-node-exporter" in packages  # listed with a trailing comment in nat.yaml
    assert {"postgresql", "patroni", "etcd-server", "redis-sentinel", "haproxy", "nftables"} <= set(packages)
    assert not [p for p in packages if not p or " " in p or "#" in p]
