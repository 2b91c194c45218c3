"""The network policy of Deno children: which `--allow-net` / `--deny-net` flags a function version runs with.

Pure (no I/O) except `node_addresses()` and `resolve_hosts()`, which the daemon calls once at startup (in a
thread) to learn what to deny. Owned by nobody: `NetPolicy` is a frozen value carried by `DenoSettings`.

What Deno 2.9.8 does with these flags (verified with the real binary, see tests/hardening/):
- `--deny-net` beats `--allow-net`. IPv4 CIDR entries (`10.0.0.0/8`) work, and they are checked twice: against
  the host string of the request (numeric spellings such as `127.1`, `0x7f000001`, `2130706433` and
  `[::ffff:127.0.0.1]` are normalised to `127.0.0.1` first) and against every address a name resolves to when
  the connection is made (so `localhost`, or any name pointing at 10.x, is refused at connect time even though
  `Deno.permissions.query` says "granted" for the name).
- IPv6 entries must be single addresses in brackets (`[::1]`); IPv6 CIDR ranges are rejected by Deno 2.9.8's
  parser, so fc00::/7 and fe80::/10 cannot be denied as ranges (documented in docs/security.md).
- A name entry (`localhost`) matches that exact string only; deny-listed names are not resolved by Deno, so the
  daemon resolves the cluster's service names itself (`resolve_hosts`) and denies the addresses too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PRIVATE_V4: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network": 0.0.0.0 connects to the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT (also Hetzner/Tailscale-style private overlays)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, including the cloud metadata service 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, including 255.255.255.255
    )
)
"""IPv4 ranges a function never reaches unless the operator opens an address in them (`allow_private`)."""

DENY_V6 = ("[::1]", "[::]", "[fd00:ec2::254]")
"""IPv6 addresses always denied (loopback, unspecified, the AWS IPv6 metadata address). Ranges are impossible in
Deno 2.9.8: see the module docstring."""

NODE_PROXY_HOST = "mbworker-node.invalid"
"""The host of the bootstrap's requests to a node:http server over its unix socket (bootstrap.ts). Deno checks net
permission on it although it never resolves it; `.invalid` names can't resolve (RFC 6761), so allowing it opens
nothing else."""

DENY_NAMES = ("localhost", "metadata.google.internal", "metadata", "instance-data")
"""Names denied by string: fails early with a clear NotCapable error (connect-time checks would refuse the
addresses anyway, except for names that resolve to IPv6-only private addresses)."""


class NetPolicyError(ValueError):
    """An operator net entry Deno cannot express."""


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """`host` / `host:port` / `[v6]` / `[v6]:port` / `a.b.c.d/nn` → (host, port). Raises NetPolicyError."""
    entry = entry.strip()
    if not entry or any(c in entry for c in " ,\\@?#*"):
        raise NetPolicyError(f"{entry!r}: expected host, host:port or an IPv4 CIDR")
    if entry.startswith("["):
        close = entry.find("]")
        if close < 0:
            raise NetPolicyError(f"{entry!r}: unclosed [")
        host, rest = entry[1:close], entry[close + 1 :]
        if rest and not rest.startswith(":"):
            raise NetPolicyError(f"{entry!r}: expected [ipv6] or [ipv6]:port")
        port_s = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise NetPolicyError(f"{entry!r}: not an IPv6 address (IPv6 ranges are not supported by Deno)") from exc
    else:
        if entry.count(":") > 1:
            raise NetPolicyError(f"{entry!r}: write IPv6 addresses in brackets, e.g. [2001:db8::1]:443")
        host, _, port_s_ = entry.partition(":")
        port_s = port_s_ if ":" in entry else None
    port: int | None = None
    if port_s is not None:
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise NetPolicyError(f"{entry!r}: invalid port")
        port = int(port_s)
    if "/" in host:
        if port is not None:
            raise NetPolicyError(f"{entry!r}: a CIDR range can't have a port")
        try:
            net = ipaddress.ip_network(host, strict=False)
        except ValueError as exc:
            raise NetPolicyError(f"{entry!r}: invalid CIDR range") from exc
        if net.version == 6:
            raise NetPolicyError(f"{entry!r}: Deno 2.9 cannot express IPv6 ranges; list single [addresses]")
    elif not host:
        raise NetPolicyError(f"{entry!r}: empty host")
    return host, port


def normalize_entry(entry: str) -> str:
    """`entry` in Deno's syntax (IPv6 in brackets), or NetPolicyError."""
    host, port = _split_host_port(entry)
    shown = f"[{host}]" if ":" in host else host.lower()
    return shown if port is None else f"{shown}:{port}"


def _as_network(host: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        return None


class NetPolicy(BaseModel):
    """The operator's side of the network policy (the function's side is `FunctionVersion.net_allow`).

    The effective rule for a function: everything its `net_allow` names (default: any host), minus the private
    ranges, minus `deny`, plus the addresses in `allow_private` (carved out of the private ranges).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    deny: tuple[str, ...] = Field(
        (), description="Extra hosts/addresses/IPv4 CIDRs denied to every function: the cluster's own services"
    )
    allow_private: tuple[str, ...] = Field(
        (),
        description="IP addresses (or IPv4 CIDRs, optionally with :port) inside the private ranges that functions "
        "may reach. Deny wins over this. The port only narrows functions that have their own [net] allow list.",
    )

    @field_validator("deny")
    @classmethod
    def _deny(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(normalize_entry(e) for e in v))

    @field_validator("allow_private")
    @classmethod
    def _allow_private(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for e in v:
            host, _ = _split_host_port(e)
            if _as_network(host) is None:
                # a name would be resolved at connect time and its address refused by the private ranges anyway
                raise NetPolicyError(f"{e!r}: allow_private takes IP addresses, not names")
            out.append(normalize_entry(e))
        return tuple(dict.fromkeys(out))

    def deny_entries(self) -> list[str]:
        """Every `--deny-net` entry: private ranges (minus `allow_private` carve-outs), v6 and name entries, `deny`."""
        carve = [n for n in (_as_network(_split_host_port(e)[0]) for e in self.allow_private) if n is not None]
        ranges: list[IPNetwork] = list(PRIVATE_V4)
        for hole in carve:
            nxt: list[IPNetwork] = []
            for r in ranges:
                if hole.version == r.version and hole.subnet_of(r):  # type: ignore[arg-type]
                    nxt.extend(r.address_exclude(hole))  # type: ignore[arg-type]
                elif hole.version == r.version and r.subnet_of(hole):  # type: ignore[arg-type]
                    continue
                else:
                    nxt.append(r)
            ranges = nxt
        v6_holes = {str(h.network_address) for h in carve if h.version == 6}
        out = [str(r) for r in sorted(ranges, key=lambda n: (n.network_address, n.prefixlen))]
        out += [a for a in DENY_V6 if a.strip("[]") not in v6_holes]
        out += list(DENY_NAMES)
        out += [e for e in self.deny if e not in out]
        return out

    def allow_entries(
        self, net_allow: Sequence[str] | None, node_socket: str = "", channel: str = ""
    ) -> list[str] | None:
        """`--allow-net` entries for a function: None means any host (the public internet); an empty list means no
        network (only the bootstrap's node:http proxy name, which reaches nothing).

        Only the function's own entries: an operator opening (`allow_private`) reaches a function with an allow
        list only if that list names it too.
        """
        if net_allow is None:
            return None
        # node:http listens on its unix socket (DENO_SERVE_ADDRESS), which Deno checks as net `unix:<path>`
        # and the bootstrap connects its frame channel (process.py) the same way, then revokes that grant
        own = [NODE_PROXY_HOST, *(f"unix:{s}" for s in (node_socket, channel) if s)]
        return list(dict.fromkeys([*(normalize_entry(e) for e in net_allow), *own]))


def net_flags(
    net_allow: Sequence[str] | None, policy: NetPolicy | None = None, node_socket: str = "", channel: str = ""
) -> list[str]:
    """The `--allow-net` / `--deny-net` flags of one Deno child. Never `--allow-all`; deny always present.
    `node_socket`: the child's node:http unix socket, if it has one; `channel`: its frame channel's socket."""
    policy = policy or NetPolicy()
    allow = policy.allow_entries(net_allow, node_socket, channel)
    flags: list[str] = []
    flags.append("--allow-net" if allow is None else "--allow-net=" + ",".join(allow))
    flags.append("--deny-net=" + ",".join(policy.deny_entries()))
    return flags


# ------------------------------------------------------------------------------------------ startup I/O


def resolve_hosts(hosts: Iterable[str]) -> list[str]:
    """`hosts` (names or addresses, optionally with :port) plus every address the names resolve to, as deny
    entries. Blocking (getaddrinfo): call it in a thread. Names that don't resolve are kept as strings."""
    out: list[str] = []
    for raw in hosts:
        try:
            host, port = _split_host_port(raw)
        except NetPolicyError:
            continue
        out.append(normalize_entry(raw))
        if _as_network(host) is not None:
            continue
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            continue
        for info in infos:
            addr = str(info[4][0]).split("%")[0]
            out.append(normalize_entry(f"[{addr}]" if ":" in addr else addr))
    return list(dict.fromkeys(out))


def node_addresses(proc: Path = Path("/proc/net")) -> list[str]:
    """This node's own interface addresses (IPv4 from fib_trie LOCAL entries, IPv6 from if_inet6), as deny
    entries: a function must not reach the admin listener or a local service through the node's public address
    either. Blocking (reads /proc): call it in a thread. Missing files give fewer addresses, never an error."""
    found: list[str] = []
    try:
        lines = (proc / "fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    last = ""
    for line in lines:
        s = line.strip()
        if s.startswith(("|--", "+--")):
            last = s.split()[1]
        elif s.startswith("/32 host LOCAL") and last:
            ip = ipaddress.IPv4Address(last)
            if not any(ip in r for r in PRIVATE_V4):  # already denied by range (unless deliberately opened)
                found.append(last)
    try:
        v6 = (proc / "if_inet6").read_text().splitlines()
    except OSError:
        v6 = []
    for line in v6:
        parts = line.split()
        if parts and len(parts[0]) == 32:
            addr = ipaddress.IPv6Address(int(parts[0], 16))
            if not addr.is_loopback:
                found.append(f"[{addr.compressed}]")
    return list(dict.fromkeys(found))
