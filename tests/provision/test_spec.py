"""Spec validation (one clear line per problem) and cluster secrets (0600, generated once, never shown)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from mbworker.provision.errors import ProvisionError, SpecError
from mbworker.provision.secrets import load_or_create_secrets
from mbworker.provision.spec import load_spec, parse_spec

from .conftest import SPEC_TOML, spec_dict

INVALID = [
    ({"state": {"type": "ccx13", "count": 2}}, "state.count: state count must be 1, 3 or 5"),
    ({"state": {"type": "ccx13", "count": 4}}, "state count must be 1, 3 or 5"),
    ({"proxy": {"type": "cx23", "count": 0}}, "proxy count must be between 1 and 100, got 0"),
    ({"proxy": {"type": "cx23", "count": 101}}, "proxy count must be between 1 and 100, got 101"),
    ({"worker": {"type": "cx33", "count": 0}}, "worker count must be at least 1"),
    ({"worker": {"type": "cx99", "count": 1}}, "worker.type: unknown server type 'cx99'"),
    ({"system": {"type": "cx23", "count": 2}}, "system.count"),
    ({"location": "mars1"}, "location: unknown location 'mars1'"),
    ({"network": "10.0.0.1/16"}, "network: network '10.0.0.1/16' is not a valid IPv4 CIDR"),
    ({"network": "8.8.0.0/16"}, "not a private (RFC 1918) range"),
    ({"subnet": "10.1.0.0/24"}, "subnet 10.1.0.0/24 is outside network 10.0.0.0/16"),
    ({"network": "10.0.0.0/24", "subnet": "10.0.0.0/23"}, "overlaps but is not inside network"),
    ({"ssh_allow": ["203.0.113.0/24", "203.0.113.128/25"]},
     "ssh_allow entries 203.0.113.0/24 and 203.0.113.128/25 overlap"),
    ({"ssh_allow": ["10.0.5.0/24"]}, "ssh_allow 10.0.5.0/24 overlaps the cluster network"),
    ({"ssh_keys": ["not-a-key"]}, "not an OpenSSH public key"),
    ({"name": "Demo_1"}, "name must be"),
    ({"network_zone": "us-east"}, "network_zone 'us-east' does not match location fsn1"),
    ({"load_balancer": {"type": "lb99"}}, "unknown load balancer type 'lb99'"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), INVALID)
def test_invalid_specs_name_the_problem(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict(**changes))
    assert message in str(info.value)
    assert str(info.value).startswith("invalid cluster spec:")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict(state={"type": "ccx13", "count": 2}, proxy={"type": "cx23", "count": 0}))
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 2
    assert {line.split(":")[0].strip() for line in lines} == {"state.count", "proxy.count"}


def test_issue_example_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(SPEC_TOML)
    spec = load_spec(path)
    assert (spec.system.count, spec.proxy.count, spec.worker.count, spec.state.count) == (1, 2, 3, 3)
    assert str(spec.subnet_cidr) == "10.0.1.0/24"
    assert spec.zone == "eu-central"
    assert spec.nat is None
    assert spec.load_balancer is None


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)


def test_with_count_revalidates() -> None:
    spec = parse_spec(spec_dict())
    assert spec.with_count("worker", 7).worker.count == 7
    with pytest.raises(SpecError, match="state count"):
        spec.with_count("state", 2)


def test_secrets_are_generated_once_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_secrets(state)
    path = state / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    again = load_or_create_secrets(state)
    assert again.admin_token.get_secret_value() == first.admin_token.get_secret_value()
    stored = json.loads(path.read_text())
    assert set(stored) == {"postgres_password", "replication_password", "redis_password", "jwt_secret",
                           "admin_token", "grafana_password", "sentinel_password", "patroni_rest_password",
                           "etcd_root_password"}  # fmt: skip
    assert len(set(stored.values())) == len(stored)  # all distinct


def test_a_secrets_file_from_before_a_secret_was_added_keeps_its_values(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_secrets(state)
    path = state / "secrets.json"
    old = json.loads(path.read_text())
    del old["sentinel_password"]
    path.write_text(json.dumps(old))
    again = load_or_create_secrets(state)
    assert again.redis_password.get_secret_value() == first.redis_password.get_secret_value()
    assert len(again.sentinel_password.get_secret_value()) == 48
    assert load_or_create_secrets(state).sentinel_password == again.sentinel_password  # stored once


def test_digest_tells_secrets_apart_without_revealing_them(tmp_path: Path) -> None:
    a = load_or_create_secrets(tmp_path / "a")
    assert a.digest() == load_or_create_secrets(tmp_path / "a").digest()
    assert a.digest() != load_or_create_secrets(tmp_path / "b").digest()
    assert all(v.get_secret_value() not in a.digest() for _, v in a)


SPEC_ERRORS = [
    pytest.param({"ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxvC6p1l0+0vH8Zq3G2pZt6Y3hGkq3Jp7aE9mX0pQ2 x"]},
                 "not valid base64", id="ssh-key-bad-base64"),
    pytest.param({"ssh_keys": ["ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIBxvC6p1l0+0vH8Zq3G2pZt6Y3hGkq3Jp7aE9mX0pQ2a x"]},
                 "does not match its type", id="ssh-key-wrong-type"),
    pytest.param({"image": "ubuntu-24.04"}, "image 'ubuntu-24.04' is not supported", id="image-not-booted"),
    pytest.param({"proxy": {"type": "cx23", "tls": "acme"}}, "needs both domain and acme_email", id="acme-no-domain"),
    pytest.param({"proxy": {"type": "cx23", "domain": "Not A Domain"}}, "not a DNS name", id="bad-domain"),
    pytest.param({"worker": {"type": "cx33", "count": 200}}, "does not fit subnet", id="too-many-workers"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "match"), SPEC_ERRORS)
def test_spec_errors_are_clear(changes: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(spec_dict(**changes))


def test_tls_source_follows_the_domain() -> None:
    assert parse_spec(spec_dict()).proxy.tls_source == "local-ca"
    acme = parse_spec(spec_dict(proxy={"type": "cx23", "domain": "edge.example.com", "acme_email": "ops@example.com"}))
    assert acme.proxy.tls_source == "acme"


def test_secrets_never_show_in_reprs(tmp_path: Path) -> None:
    secrets = load_or_create_secrets(tmp_path / "s")
    shown = repr(secrets) + str(secrets) + secrets.model_dump_json()
    for _, value in secrets:
        assert value.get_secret_value() not in shown


def test_secrets_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s"
    load_or_create_secrets(state)
    (state / "secrets.json").chmod(0o644)
    with pytest.raises(ProvisionError, match="readable by others"):
        load_or_create_secrets(state)
