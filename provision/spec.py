"""The cluster spec: a TOML file validated by pydantic.

The shape in the issue is a contract (name, location, network, image, ssh_keys, ssh_allow, [system], [proxy],
[worker], [state]); everything else is optional with defaults that work. `load_spec` owns reading the file and
turns every validation problem into one `SpecError` whose message lists them all, one per line.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError

#: Locations and their network zones (reference §4). A location outside this map is rejected offline.
LOCATIONS: dict[str, str] = {
    "fsn1": "eu-central",
    "nbg1": "eu-central",
    "hel1": "eu-central",
    "ash": "us-east",
    "hil": "us-west",
    "sin": "ap-southeast",
}

#: Server types known offline (the 2025 generation). Online, the provider also checks `GET /server_types`
#: (existence, deprecation, availability in the location).
SERVER_TYPES: frozenset[str] = frozenset(
    [f"cx{n}3" for n in (2, 3, 4, 5)]
    + [f"cpx{n}2" for n in (1, 2, 3, 4, 5, 6)]
    + [f"cax{n}1" for n in (1, 2, 3, 4)]
    + [f"ccx{n}3" for n in (1, 2, 3, 4, 5, 6)]
)

#: The first worker's host number in the subnet (provision/desired.py owns the address layout).
WORKER_BASE = 128

LOAD_BALANCER_TYPES: frozenset[str] = frozenset({"lb11", "lb21", "lb31"})

DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
#: The images the templates are written for and booted with in tests (Debian's packages: postgresql 15, ...).
IMAGES: frozenset[str] = frozenset({"debian-12"})
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,22}[a-z0-9]$|^[a-z]$")
SSH_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh.com) [A-Za-z0-9+/=]+( .*)?$"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_type(value: str) -> str:
    if value not in SERVER_TYPES:
        known = ", ".join(sorted(SERVER_TYPES))
        raise ValueError(f"unknown server type {value!r} (known: {known})")
    return value


class SystemSpec(_Model):
    """The system node: always exactly one; scaled vertically by changing `type`."""

    type: str
    count: Literal[1] = 1

    _type = field_validator("type")(_check_type)


class ProxySpec(_Model):
    type: str
    count: int = Field(default=1)
    #: Where the proxies' TLS certificate comes from: "acme" (certbot through HAProxy's :80, needs `domain` and
    #: `acme_email`) or "local-ca" (the cluster's own CA in the operator's state dir; clients trust its ca.pem).
    #: Unset: "acme" when a domain is given, else "local-ca".
    tls: Literal["acme", "local-ca"] | None = None
    domain: str | None = None
    acme_email: str | None = None

    _type = field_validator("type")(_check_type)

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        if v is not None and not DOMAIN_RE.match(v):
            raise ValueError(f"domain {v!r} is not a DNS name")
        return v

    @field_validator("acme_email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is not None and not EMAIL_RE.match(v):
            raise ValueError(f"acme_email {v!r} is not an e-mail address")
        return v

    @model_validator(mode="after")
    def _acme_needs(self) -> ProxySpec:
        if self.tls == "acme" and (self.domain is None or self.acme_email is None):
            raise ValueError('tls = "acme" needs both domain and acme_email')
        if self.tls is None and self.domain is not None and self.acme_email is None:
            raise ValueError('a domain gets an ACME certificate, which needs acme_email (or set tls = "local-ca")')
        return self

    @property
    def tls_source(self) -> Literal["acme", "local-ca"]:
        return self.tls or ("acme" if self.domain is not None else "local-ca")

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if not 1 <= v <= 100:
            raise ValueError(f"proxy count must be between 1 and 100, got {v}")
        return v


class WorkerSpec(_Model):
    type: str
    count: int = 1

    _type = field_validator("type")(_check_type)

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"worker count must be at least 1, got {v}")
        return v


class StateSpec(_Model):
    type: str
    count: int = 1

    _type = field_validator("type")(_check_type)

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if v not in (1, 3, 5):
            raise ValueError(f"state count must be 1, 3 or 5 (odd, for etcd/Sentinel quorum), got {v}")
        return v


class NatSpec(_Model):
    """An optional NAT gateway: a small public server that masquerades the private zone's egress."""

    type: str = "cx23"

    _type = field_validator("type")(_check_type)


class LoadBalancerSpec(_Model):
    """An optional Hetzner load balancer in front of the proxies (TCP passthrough on 80 and 443)."""

    type: str = "lb11"

    @field_validator("type")
    @classmethod
    def _lb_type(cls, v: str) -> str:
        if v not in LOAD_BALANCER_TYPES:
            raise ValueError(f"unknown load balancer type {v!r} (known: {', '.join(sorted(LOAD_BALANCER_TYPES))})")
        return v


class DaemonSpec(_Model):
    """How worker nodes run mbworker: the operator's own mbworker, shipped as wheels (provision/wheels.py)."""

    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    admin_port: Annotated[int, Field(ge=1, le=65535)] = 8081


class LocalSpec(_Model):
    """Settings only the local provider reads."""

    #: argv prefix for a worker; the provider appends `serve --host … --port … --admin-port … --data-dir …`.
    #: Tests point this at a stand-in; unset runs this Python's own daemon (`python -m mbworker.cli.main`), so
    #: `up` works from a venv that is not on PATH.
    worker_command: list[str] | None = None
    redis_server: str = "redis-server"
    host: str = "127.0.0.1"
    #: First port used; redis, the gateway and each worker's HTTP/admin ports are allocated upwards from here.
    base_port: Annotated[int, Field(ge=1024, le=65000)] = 54300
    #: Run the gateway proxy in front of the workers.
    gateway: bool = True
    #: A venv holding mbworker (installed from wheels) that each worker runs from a copy of, under the upgrade
    #: supervisor (provision/local_supervisor.py): then `mbworker cluster upgrade` works here as on a cloud worker.
    worker_venv: Path | None = None


class ClusterSpec(_Model):
    name: str
    location: str
    network_zone: str | None = None
    network: ipaddress.IPv4Network
    #: The cloud subnet servers live in; defaults to the second /24 of `network` (10.0.1.0/24 for 10.0.0.0/16).
    subnet: ipaddress.IPv4Network | None = None
    image: str = "debian-12"
    ssh_keys: list[str] = []
    ssh_allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    #: Who may open the control plane (HTTPS on the system node's public address): the operators' CIDRs. Empty (the
    #: default) opens it to no public address at all: list your own before `mbworker deploy --cluster` can reach it.
    control_allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    #: DNS resolvers of private-only nodes (no DHCP there): Hetzner's by default; another provider sets its own.
    resolvers: list[ipaddress.IPv4Address] = [
        ipaddress.IPv4Address("185.12.64.1"),
        ipaddress.IPv4Address("185.12.64.2"),
    ]
    system: SystemSpec
    proxy: ProxySpec
    worker: WorkerSpec
    state: StateSpec
    nat: NatSpec | None = None
    load_balancer: LoadBalancerSpec | None = None
    floating_ip: bool = False
    daemon: DaemonSpec = DaemonSpec()
    local: LocalSpec = LocalSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("name must be 1-24 chars of a-z, 0-9 and '-', starting with a letter")
        return v

    @field_validator("location")
    @classmethod
    def _location(cls, v: str) -> str:
        if v not in LOCATIONS:
            raise ValueError(f"unknown location {v!r} (known: {', '.join(LOCATIONS)})")
        return v

    @field_validator("network", mode="before")
    @classmethod
    def _strict_network(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                ipaddress.IPv4Network(v)
            except ValueError as exc:
                raise ValueError(f"network {v!r} is not a valid IPv4 CIDR (host bits set?): {exc}") from None
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if v not in IMAGES:
            raise ValueError(
                f"image {v!r} is not supported (the templates are written for and booted on: "
                f"{', '.join(sorted(IMAGES))})"
            )
        return v

    @field_validator("ssh_keys")
    @classmethod
    def _ssh_keys(cls, v: list[str]) -> list[str]:
        for key in v:
            if not SSH_KEY_RE.match(key.strip()):
                raise ValueError(f"not an OpenSSH public key: {key[:40]!r}")
            try:
                blob = base64.b64decode(key.split()[1], validate=True)
            except binascii.Error:
                raise ValueError(f"SSH key body is not valid base64: {key[:40]!r}") from None
            if not blob.startswith(len(key.split()[0]).to_bytes(4, "big") + key.split()[0].encode()):
                raise ValueError(f"SSH key body does not match its type {key.split()[0]}: {key[:40]!r}")
        if len({k.split()[1] for k in v}) != len(v):
            raise ValueError("the same SSH key is listed twice")
        return [k.strip() for k in v]

    @model_validator(mode="after")
    def _cross_checks(self) -> ClusterSpec:
        problems: list[str] = []
        zone = LOCATIONS[self.location]
        if self.network_zone is not None and self.network_zone != zone:
            problems.append(f"network_zone {self.network_zone!r} does not match location {self.location} ({zone})")
        if not self.network.is_private:
            problems.append(f"network {self.network} is not a private (RFC 1918) range")
        if self.network.prefixlen > 24:
            problems.append(f"network {self.network} is too small (use /24 or larger)")
        subnet = self.subnet_cidr
        if not subnet.subnet_of(self.network):
            problems.append(
                f"subnet {subnet} overlaps but is not inside network {self.network}"
                if subnet.overlaps(self.network)
                else f"subnet {subnet} is outside network {self.network}"
            )
        if subnet.prefixlen > 24:
            problems.append(f"subnet {subnet} is too small: the address layout needs a /24 or larger")
        elif self.worker.count > subnet.num_addresses - 1 - WORKER_BASE:
            problems.append(
                f"worker count {self.worker.count} does not fit subnet {subnet} "
                f"(at most {subnet.num_addresses - 1 - WORKER_BASE}: use a larger subnet)"
            )
        for what, cidrs in (("ssh_allow", self.ssh_allow), ("control_allow", self.control_allow)):
            problems.extend(_overlaps(cidrs, what))
            for cidr in cidrs:
                if isinstance(cidr, ipaddress.IPv4Network) and cidr.overlaps(self.network):
                    problems.append(
                        f"{what} {cidr} overlaps the cluster network {self.network}: Cloud Firewalls only see public "
                        "traffic, list public addresses"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def zone(self) -> str:
        return self.network_zone or LOCATIONS[self.location]

    @property
    def subnet_cidr(self) -> ipaddress.IPv4Network:
        if self.subnet is not None:
            return self.subnet
        if self.network.prefixlen >= 24:
            return self.network
        return next(itertools.islice(self.network.subnets(new_prefix=24), 1, None))

    def count(self, role: str) -> int:
        return int(getattr(self, role).count)

    def with_count(self, role: str, count: int) -> ClusterSpec:
        """A copy with one pillar's count changed (validated like the file would be)."""
        data = self.model_dump(mode="json")
        data[role]["count"] = count
        return parse_spec(data)


def _overlaps(cidrs: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], what: str) -> list[str]:
    seen: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    problems = []
    for c in cidrs:
        for s in seen:
            if c.version == s.version and c.overlaps(s):
                problems.append(f"{what} entries {s} and {c} overlap")
        seen.append(c)
    return problems


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "invalid cluster spec:\n  " + "\n  ".join(lines)


def parse_spec(data: dict[str, Any]) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format(exc)) from None


def load_spec(path: str | Path, *, defaults: Mapping[str, Any] | None = None) -> ClusterSpec:
    """Read and validate a cluster spec file; any problem raises SpecError with a readable message.

    `defaults` fills what the file leaves out, table by table (the local provider's: a local-only spec needs
    no Hetzner location or server types)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{p} is not valid TOML: {exc}") from None
    for key, value in (defaults or {}).items():
        if isinstance(value, Mapping) and isinstance(data.get(key), dict):
            data[key] = {**value, **data[key]}
        else:
            data.setdefault(key, value)
    return parse_spec(data)
